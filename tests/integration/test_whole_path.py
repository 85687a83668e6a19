"""The one path through the house, on the debug model, with the real commands a user types:

spec -> `flashops validate` -> `flashops run` (pretrain -> sft -> dpo -> rl) -> checkpoint store -> lineage
-> ModelDeployment (`flashops render` for the cluster, `flashops serve` locally) -> predictor answers
-> `flashops lineage graph` traces the deployment back to its datasets.
"""
import json
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

from flashops.api.crdschema import CRDValidator

FLASHOPS = str(Path(sys.executable).parent / "flashops")
UPSTREAM = Path(__file__).resolve().parents[1] / "fixtures" / "crds"

PIPELINE = """
apiVersion: flashops.dev/v1alpha1
kind: TrainingPipeline
metadata: {name: tiny}
spec:
  stages:
    - name: pretrain
      spec: {stage: pretrain, data: {uri: "builtin:pretrain-text"}, training: {steps: 6, batchSize: 4, seqLen: 64},
             pretrain: {mtpFromStep: 2}, checkpoint: {every: 3, keep: 1}, qat: {mode: int4}}
    - name: sft
      spec: {stage: sft, data: {uri: "builtin:sft-chat"}, training: {steps: 3, batchSize: 4, seqLen: 64}}
    - name: dpo
      spec: {stage: dpo, data: {uri: "builtin:dpo-pairs"}, training: {steps: 2, batchSize: 4, seqLen: 64}}
    - name: rl
      spec: {stage: rl, data: {uri: "builtin:rl-tasks"}, training: {steps: 2, seqLen: 64},
             rl: {groupSize: 2, promptsPerStep: 2, maxNewTokens: 8,
                 curriculum: {profileRollouts: 2, profileMaxPrompts: 8}}}
---
apiVersion: flashops.dev/v1alpha1
kind: ModelDeployment
metadata: {name: tiny-chat}
spec: {source: tiny, speculative: {mtpTokens: 2}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def user(tmp_path):
    """A user's shell: FLASHOPS_HOME in a temp dir, commands run as subprocesses of the real CLI."""
    env = {**os.environ, "FLASHOPS_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    env.pop("FLASHOPS_LINEAGE_URL", None)

    def sh(*args, check=True):
        out = subprocess.run([FLASHOPS, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        if check:
            assert out.returncode == 0, f"flashops {' '.join(args)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
        return out

    (tmp_path / "tiny.yaml").write_text(PIPELINE)
    sh.env, sh.dir = env, tmp_path
    return sh


@pytest.mark.slow
def test_spec_to_served_model_and_back_through_lineage(user):
    home = Path(user.env["FLASHOPS_HOME"])
    assert user("validate", "-f", "tiny.yaml").stdout.count(": OK") == 2

    # Train the whole pipeline on this machine.
    run = user("run", "-f", "tiny.yaml")
    assert "tiny-rl" in run.stdout and "before RL" in run.stdout

    # Checkpoint store: every stage has a verified checkpoint; retention kept one per run.
    from flashops.storage import open_store

    store = open_store(f"file://{home}/store")
    for stage, steps in (("pretrain", 6), ("sft", 3), ("dpo", 2), ("rl", 2)):
        ref = store.latest(f"tiny-{stage}")
        assert ref is not None and ref.step == steps, stage
        store.verify(ref)
    assert [r.step for r in store.list("tiny-pretrain")] == [6]

    # Lineage: the pipeline name resolves to the exported model of its last stage.
    from flashops.api.lineage import open_lineage

    lineage = open_lineage(f"sqlite:///{home}/lineage.db")
    found = lineage.resolve("tiny")
    assert "/models/tiny/" in found["uri"] and found["checkpoint"]["uri"].endswith("/runs/tiny-rl/step-2")

    # On a cluster the deployment becomes an InferenceService that the real KServe CRD accepts.
    rendered = [d for d in yaml.safe_load_all(user("render", "-f", "tiny.yaml").stdout) if d]
    isvc = [d for d in rendered if d["kind"] == "InferenceService"]
    assert len(isvc) == 1
    assert CRDValidator.from_file(UPSTREAM / "serving.kserve.io_inferenceservices.yaml").errors(isvc[0]) == []
    jobs = [d for d in rendered if d["kind"] in ("PyTorchJob", "TrainJob")]
    assert jobs, [d["kind"] for d in rendered]

    # Locally, `flashops serve` runs the same predictor; it answers OpenAI chat requests.
    port = free_port()
    server = subprocess.Popen([FLASHOPS, "serve", "-f", "tiny.yaml", "--port", str(port)], cwd=user.dir,
                              env=user.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/openai/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stdout.read()
            assert time.time() < deadline, "the predictor did not come up"
            time.sleep(0.5)
        ask = {"model": "tiny-chat", "messages": [{"role": "user", "content": "What is 2 + 3?"}],
               "max_tokens": 6, "temperature": 0}
        first = httpx.post(f"{base}/openai/v1/chat/completions", json=ask, timeout=60).json()
        second = httpx.post(f"{base}/openai/v1/chat/completions", json=ask, timeout=60).json()
        assert first["model"] == "tiny-chat" and first["usage"]["completion_tokens"] >= 1
        assert first["choices"][0]["message"] == second["choices"][0]["message"]  # greedy is deterministic
        streamed = []
        with httpx.stream("POST", f"{base}/openai/v1/chat/completions", json={**ask, "stream": True}, timeout=60) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    streamed.append(json.loads(line[len("data: "):]))
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed if c.get("choices"))
        assert text == first["choices"][0]["message"]["content"]  # the stream says what the plain answer said
        bad = httpx.post(f"{base}/openai/v1/chat/completions", json={**ask, "model": "nope"}, timeout=30)
        assert bad.status_code == 404 and "nope" in bad.json()["error"]["message"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()

    # Lineage traces the deployment back to all four datasets, through every stage.
    graph = user("lineage", "graph", "tiny-chat", "--up", "--depth", "30").stdout
    for dataset in ("builtin:pretrain-text", "builtin:sft-chat", "builtin:dpo-pairs", "builtin:rl-tasks"):
        assert dataset in graph, graph
    for run_name in ("tiny-pretrain", "tiny-sft", "tiny-dpo", "tiny-rl"):
        assert run_name in graph
    deployments = lineage.list_nodes(type="deployment", name="tiny-chat")
    assert deployments, "flashops serve -f records the deployment"
