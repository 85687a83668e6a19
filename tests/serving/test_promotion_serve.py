"""`flashops serve -f` applies a deployment's spec.promotion gate like the operator (flashops.api.promotion.decide)
from the evaluations recorded in lineage: a blocked model is not served, the model the previous `flashops serve -f`
of the deployment served is, and the output says which and why; `mtpTokens: auto` picks k from the recorded
acceptance lengths."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from flashops.api.spec import load_text

SUITE = "builtin:rl-heldout"
FLASHOPS = str(Path(sys.executable).parent / "flashops")


def result(accuracy, acceptance=None, cost=None):
    mode = {"mode": "non-thinking", "accuracy": accuracy, "mean_tokens": 10.0,
            "accuracy_per_1k_tokens": 100 * accuracy}
    if acceptance:
        mode["acceptance_length"] = {str(k): v for k, v in acceptance.items()}
    if cost is not None:
        mode["mtp_cost_ratio"] = cost
    return {"suites": [{"name": SUITE, "sha256": "d" * 64, "modes": [mode]}]}


def deployment(source: str, **spec) -> str:
    return yaml.safe_dump({"apiVersion": "flashops.dev/v1alpha1", "kind": "ModelDeployment",
                           "metadata": {"name": "chat"}, "spec": {"source": source, "promotion": {
                               "require": [{"suite": SUITE, "metric": "accuracy", "min": 0.2}]}, **spec}})


@pytest.fixture
def lineage(tmp_path):
    from flashops.api.lineage import open_lineage

    lin = open_lineage(f"sqlite:///{tmp_path}/lineage.db")
    yield lin
    lin.close()


def record_model(lin, uri: str, step: int) -> int:
    run = lin.start_run(f"q-rl-{step}", "TrainingRun", "rl", {"stage": "rl"}, f"sha256:{step}")
    ck = lin.add_checkpoint(run, uri.replace("/models/", "/runs/"), step)
    return lin.add_model(ck, uri, "q", f"v{step}")


def test_the_gate_passes_blocks_and_falls_back_to_the_model_served_before(lineage):
    from flashops.cli.serve_commands import GateBlocked, apply_gate

    m1, m2 = "file:///s/models/q/v1", "file:///s/models/q/v2"
    id1, id2 = record_model(lineage, m1, 1), record_model(lineage, m2, 2)
    said: list[str] = []
    (md,) = load_text(deployment(m1))
    with pytest.raises(GateBlocked, match=r"nothing to serve: .*v1 is blocked .*--ignore-gate"):
        apply_gate(md, m1, lineage=lineage, say=said.append)
    assert f"spec.promotion.require[0].suite: '{SUITE}' was never evaluated for {m1}" in said[-1]
    assert apply_gate(md, m1, lineage=lineage, ignore_gate=True, say=said.append) == (m1, None)

    lineage.add_evaluation(id1, result(0.5))
    assert apply_gate(md, m1, lineage=lineage, say=said.append) == (m1, None)
    assert said[-1].startswith(f"promotion gate passed for {m1} (no model is served yet")
    lineage.close_deployment(lineage.add_deployment(m1, "chat", None, {"uid": "earlier-serve"}))

    lineage.add_evaluation(id2, result(0.4))  # above min 0.2, below the current model's 0.5
    (md2,) = load_text(deployment(m2))
    said.clear()
    assert apply_gate(md2, m2, lineage=lineage, say=said.append) == (m1, None)
    assert "accuracy 0.4 >= min 0.2, < 0.5 (current model 0.5)" in said[0]
    assert said[1].startswith(f"serving the current model {m1} instead")


def test_mtp_tokens_auto_locally(lineage):
    from flashops.cli.serve_commands import apply_gate

    m1 = "file:///s/models/q/v1"
    lineage.add_evaluation(record_model(lineage, m1, 1), result(0.5, acceptance={1: 1.9, 2: 2.8, 3: 3.6}, cost=0.05))
    (md,) = load_text(deployment(m1, speculative={"mtpTokens": "auto"}))
    said: list[str] = []
    assert apply_gate(md, m1, lineage=lineage, say=said.append) == (m1, 3)
    assert said[-1].startswith("mtpTokens auto -> 3")
    (plain,) = load_text(yaml.safe_dump({"apiVersion": "flashops.dev/v1alpha1", "kind": "ModelDeployment",
                                         "metadata": {"name": "other"},
                                         "spec": {"source": "file:///s/models/q/v9", "speculative": {"mtpTokens": "auto"}}}))
    assert apply_gate(plain, "file:///s/models/q/v9", lineage=lineage, say=said.append) == ("file:///s/models/q/v9", 0)
    assert "no recorded evaluation with MTP acceptance lengths" in said[-1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_flashops_serve_f_serves_the_current_model_when_the_new_one_is_blocked(untrained_exports, tmp_path):
    """Through the CLI with real exports: the blocked v2 is not served; v1 (served before) is, and lineage records it."""
    from flashops.api.lineage import open_lineage

    m1, m2 = untrained_exports
    db = f"sqlite:///{tmp_path}/lineage.db"
    lin = open_lineage(db)
    lin.add_evaluation(record_model(lin, m1, 1), result(0.5))
    lin.add_evaluation(record_model(lin, m2, 2), result(0.1))
    lin.close_deployment(lin.add_deployment(m1, "chat", None, {"uid": "earlier-serve"}))
    lin.close()  # the CLI opens the same SQLite file
    (tmp_path / "dep.yaml").write_text(deployment(m2))
    env = {**os.environ, "FLASHOPS_HOME": str(tmp_path / "home"), "FLASHOPS_LINEAGE_URL": db}
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen([FLASHOPS, "serve", "-f", str(tmp_path / "dep.yaml"), "--port", str(port)], env=env,
                                stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 180
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log.read_text()
            assert time.time() < deadline, log.read_text()
            time.sleep(0.5)
        out = log.read_text()
        assert f"promotion of {m2} blocked; {m1} keeps serving" in out and "accuracy 0.1 < min 0.2" in out, out
        assert f"serving the current model {m1} instead" in out
        lin = open_lineage(db)
        newest = lin.list_nodes(type="deployment", name="chat")["items"][-1]
        assert newest["ended_at"] is None and lin.node(newest["model_id"])["node"]["uri"] == m1
        lin.close()
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)


def test_the_cost_of_an_mtp_call_is_measured_against_the_main_pass():
    """mtpTokens: auto weighs acceptance against this ratio: the debug model's MTP layer is one dense block, its main
    pass four MoE layers, so one MTP call must cost a fraction of a main pass."""
    import torch

    from flashops.model import JoyAIFlash, get_config
    from flashops.serving.backend import JoyAIBackend, mtp_cost_ratio

    torch.manual_seed(0)
    cfg = get_config("joyai-flash-debug", {"vocab_size": 512, "max_seq_len": 256})
    ratio = mtp_cost_ratio(JoyAIBackend(JoyAIFlash(cfg), slots=1, max_len=64), repeats=8)
    assert 0 < ratio < 1, ratio
    no_mtp = get_config("joyai-flash-debug", {"vocab_size": 512, "max_seq_len": 256, "num_mtp_layers": 0})
    with pytest.raises(ValueError, match="no MTP layer"):
        mtp_cost_ratio(JoyAIBackend(JoyAIFlash(no_mtp), slots=1, max_len=64))


def test_flashops_run_prints_the_gates_decision_for_the_pipelines_model(lineage, tmp_path):
    """`make run` says whether the quickstart's gate passed: flashops run's preview of `flashops serve -f`."""
    import io

    from rich.console import Console

    from flashops.cli.run_commands import _promotion_preview

    run = lineage.start_run("q-rl", "TrainingRun", "rl", {"stage": "rl"}, "sha256:q", pipeline="q")
    ck = lineage.add_checkpoint(run, "file:///s/runs/q-rl/step-15", 15)
    lineage.add_model(ck, "file:///s/models/q/step-15", "q", "step-15")
    lineage.finish_run(run, "succeeded")
    (md,) = load_text(deployment("q", speculative={"mtpTokens": "auto"}))
    out = io.StringIO()
    _promotion_preview(md, lineage, Console(file=out, width=300), Path("q.yaml"))
    assert "nothing to serve: file:///s/models/q/step-15 is blocked by spec.promotion" in out.getvalue()
    lineage.add_evaluation(ck, result(0.3, acceptance={1: 1.5, 2: 1.6, 3: 1.6}, cost=0.2))
    out = io.StringIO()
    _promotion_preview(md, lineage, Console(file=out, width=300), Path("q.yaml"))
    text = out.getvalue()
    assert "promotion gate passed for file:///s/models/q/step-15" in text and "accuracy 0.3 >= min 0.2" in text
    # 1.5/1.2 = 1.25 beats 1.6/1.4 and 1.6/1.6: one draft token
    assert "`flashops serve -f q.yaml` would serve file:///s/models/q/step-15 with mtpTokens 1" in text
