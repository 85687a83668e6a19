"""`flashops lineage ...`: trace the quickstart pipeline from its deployment back to its datasets with one
command, export Mermaid/DOT, and serve the API as a real process."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from flashops.api.lineage import open_lineage
from flashops.api.spec import load_file, pipeline_stage_run
from flashops.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def record_quickstart(lin):
    """What `flashops run -f examples/quickstart.yaml` records, built from the real specs."""
    pipeline, deployment = load_file(ROOT / "examples" / "quickstart.yaml")
    previous = None
    for i, stage in enumerate(pipeline.spec.stages):
        if stage.is_eval:  # evaluations are not runs
            continue
        run = pipeline_stage_run(pipeline, i, previous)
        rid = lin.start_run(run.name, run.kind, run.spec.stage, run.spec.to_dict(), run.spec_hash(),
                            consumed=[run.spec.data.uri], initialized_from=previous, pipeline=pipeline.name)
        previous = f"file:///store/{run.name}/step-{run.spec.training.steps}"
        lin.add_checkpoint(rid, previous, run.spec.training.steps, "sha256:m", {"loss": 1.0})
        lin.finish_run(rid, "succeeded", {"loss": 1.0})
    served = lin.resolve(deployment.spec.source)  # source: quickstart -> the rl stage's final checkpoint
    assert served["uri"] == previous
    return lin.add_deployment(served["id"], deployment.name, "default", None, 100)


@pytest.fixture
def local_lineage(flashops_home):
    lin = open_lineage()  # the embedded default: SQLite in $FLASHOPS_HOME
    dep = record_quickstart(lin)
    lin.close()
    assert (flashops_home / "lineage.db").is_file()
    return dep


def test_trace_a_deployment_back_to_its_datasets_with_one_command(local_lineage):
    out = runner.invoke(app, ["lineage", "graph", "quickstart-chat", "--up", "--depth", "20"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].startswith("deployment default/quickstart-chat 100%")
    for uri in ("builtin:pretrain-text", "builtin:sft-chat", "builtin:dpo-pairs", "builtin:rl-tasks"):
        assert any(f"<- consumed: dataset {uri}" in line for line in lines), uri
    assert sum("<- produced: run quickstart-" in line for line in lines) == 4
    # the chain is nested, not flat: the pretrain run sits deeper than the rl run
    indent = {name: next(len(l) - len(l.lstrip("│ ├└─")) for l in lines if f"run {name} " in l)
              for name in ("quickstart-rl", "quickstart-pretrain")}
    assert indent["quickstart-pretrain"] > indent["quickstart-rl"]


def test_graph_exports_mermaid_and_dot(local_lineage):
    mer = runner.invoke(app, ["lineage", "graph", "builtin:pretrain-text", "--down", "--format", "mermaid"])
    assert mer.exit_code == 0 and mer.output.startswith("flowchart LR")
    assert "-->|consumed|" in mer.output and "-->|deployed_as|" in mer.output
    dot = runner.invoke(app, ["lineage", "graph", f"lineage:{local_lineage}", "-o", "dot", "-d", "2"])
    assert dot.exit_code == 0 and dot.output.startswith("digraph lineage {")
    assert dot.output.count(" -> ") == 2  # deployment <- checkpoint <- rl run


def test_show_resolve_diff_and_usage_errors(local_lineage):
    out = runner.invoke(app, ["lineage", "show", "quickstart-sft"])
    assert out.exit_code == 0, out.output
    assert "run quickstart-sft sft succeeded" in out.output and "<- consumed: dataset builtin:sft-chat" in out.output
    rl_steps = next(s for s in load_file(ROOT / "examples" / "quickstart.yaml")[0].spec.stages if s.name == "rl").spec.training.steps
    resolved = runner.invoke(app, ["lineage", "resolve", "quickstart"]).output.strip()
    assert resolved == f"file:///store/quickstart-rl/step-{rl_steps}"
    diff = runner.invoke(app, ["lineage", "diff", "quickstart-dpo", "quickstart-rl"])
    assert "stage: \"dpo\" -> \"rl\"" in diff.output
    bad = runner.invoke(app, ["lineage", "show", "no-such-thing"])
    assert bad.exit_code == 2 and "nothing named 'no-such-thing'" in bad.output
    assert runner.invoke(app, ["lineage", "graph", "quickstart", "--format", "png"]).exit_code == 2
    assert runner.invoke(app, ["lineage", "graph", "quickstart", "--depth", "0"]).exit_code == 2


def test_serve_runs_the_api_with_the_configured_tokens(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FLASHOPS_HOME": str(tmp_path), "FLASHOPS_LINEAGE_TOKENS": "r0:read,w0:read+write"}
    env.pop("FLASHOPS_LINEAGE_TOKEN", None)
    proc = subprocess.Popen([str(Path(sys.executable).parent / "flashops"), "lineage", "serve",
                             "--db", f"sqlite:///{tmp_path / 'served.db'}", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
            time.sleep(0.2)
        dep = record_quickstart(open_lineage(url, token="w0"))
        out = runner.invoke(app, ["lineage", "graph", "quickstart-chat", "--lineage", url], env={"FLASHOPS_LINEAGE_TOKEN": "r0"})
        assert out.exit_code == 0, out.output
        assert f"[lineage:{dep}]" in out.output.splitlines()[0] and "builtin:pretrain-text" in out.output
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
