"""A pipeline's eval stage on a cluster (issue 15): the operator (torch-free) creates a batch Job that runs
`flashops eval` on the previous stage's checkpoint; the test plays the kubelet by running that command with the
pod's environment, which records the evaluation in the operator's lineage, then the Job controller by marking the
Job Complete. The next stage starts from the training checkpoint, the final training stage exports, and a failed
evaluation Job fails the pipeline with the reason."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fixtures.k8s import GV, JOBS, PYTORCHJOBS, condition, job_condition, play_trainer_pod, wait_state

pytestmark = [pytest.mark.k8s, pytest.mark.slow]


def pipeline_yaml(suite: str, name: str = "evp") -> str:
    return f"""
apiVersion: flashops.dev/v1alpha1
kind: TrainingPipeline
metadata: {{name: {name}}}
spec:
  stages:
  - name: pre
    spec: {{stage: pretrain, training: {{steps: 2, batchSize: 2, seqLen: 32}}}}
  - name: eval-pre
    spec: {{stage: eval, eval: {{suites: ["{suite}"], maxTokens: 3, maxConcurrency: 4}}}}
  - name: sft
    spec: {{stage: sft, training: {{steps: 1, batchSize: 2, seqLen: 32}}}}
"""


def job_done(k8s, name: str, ctype: str, reason: str) -> dict:
    return k8s.patch(*JOBS, name, {"status": {"conditions": [
        {"type": ctype, "status": "True", "reason": reason, "message": f"{name}: {reason}",
         "lastTransitionTime": "2026-01-01T00:00:00Z"}]}}, subresource="status")


def test_the_operator_runs_an_eval_stage_as_a_job(k8s, start_operator, tmp_path, monkeypatch):
    from flashops.api.lineage import open_lineage
    from flashops.cli.app import app

    monkeypatch.setenv("FLASHOPS_HOME", str(tmp_path / "home"))
    for var in ("FLASHOPS_LINEAGE_URL", "FLASHOPS_LINEAGE_RUN_ID", "FLASHOPS_RUN_NAME"):
        monkeypatch.delenv(var, raising=False)
    suite = tmp_path / "one.jsonl"
    suite.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5", "match": "number", "thinking": False}) + "\n")
    db = f"sqlite:///{tmp_path}/cluster-lineage.db"
    start_operator(checkpoint_root=f"file://{tmp_path}/cluster", lineage_url=db)
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=pipeline_yaml(f"file://{suite}"))

    play_trainer_pod(k8s, tmp_path, monkeypatch, "evp-pre")
    pre_ckpt = f"file://{tmp_path}/cluster/default/runs/evp-pre/step-2"

    # the eval stage: a batch Job owned by the pipeline, running `flashops eval` on pre's checkpoint
    job = k8s.wait_for(lambda: k8s.find(*JOBS, "evp-eval-pre"), message="the eval stage's Job", timeout=30)
    assert job["metadata"]["ownerReferences"][0]["kind"] == "TrainingPipeline"
    assert job["metadata"]["labels"]["flashops.dev/stage"] == "eval-pre"
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    cmd = container["command"]
    assert cmd[:2] == ["flashops", "eval"] and cmd[cmd.index("--model") + 1] == pre_ckpt
    assert cmd[cmd.index("--suite") + 1] == f"file://{suite}" and cmd[cmd.index("--name") + 1] == "eval-pre"
    assert pod["restartPolicy"] == "Never"
    assert k8s.find(GV, "trainingruns", "evp-sft") is None  # the next stage waits for the evaluation
    p = wait_state(k8s, "trainingpipelines", "evp", "Pending")
    assert "stage 2/3 (eval-pre) is pending" in condition(p, "Pending")["message"]
    with monkeypatch.context() as pod_env:  # the kubelet: the pod's command with the pod's environment
        for e in container["env"]:
            if "value" in e:
                pod_env.setenv(e["name"], e["value"])
        out = CliRunner().invoke(app, cmd[1:])
    assert out.exit_code == 0, out.output
    job_done(k8s, "evp-eval-pre", "Complete", "Completed")

    # the stage after the evaluation starts from the training checkpoint
    run = k8s.wait_for(lambda: k8s.find(GV, "trainingruns", "evp-sft"), message="the sft stage", timeout=30)
    assert run["spec"]["initFrom"] == pre_ckpt
    play_trainer_pod(k8s, tmp_path, monkeypatch, "evp-sft")
    pipeline = wait_state(k8s, "trainingpipelines", "evp", "Succeeded", timeout=30)
    assert "all 3 stages succeeded" in condition(pipeline, "Succeeded")["message"]
    assert [s["state"] for s in pipeline["status"]["stages"]] == ["Succeeded"] * 3
    assert pipeline["status"]["modelUri"] == f"file://{tmp_path}/cluster/default/models/evp/step-1"
    assert pipeline["status"]["latestCheckpoint"] == f"file://{tmp_path}/cluster/default/runs/evp-sft/step-1"

    evs = open_lineage(db).evaluations(pre_ckpt)
    assert [e["name"] for e in evs] == ["eval-pre"]
    assert evs[0]["result"]["suites"][0]["modes"][0]["mode"] == "non-thinking"


def test_a_failed_evaluation_job_fails_the_pipeline(k8s, start_operator, tmp_path):
    import torch

    from flashops.storage import open_store

    start_operator(checkpoint_root=f"file://{tmp_path}/store")
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=pipeline_yaml("builtin:chat-smoke", "evf"))
    k8s.wait_for(lambda: k8s.find(*PYTORCHJOBS, "evf-pre"), message="the first stage's job", timeout=30)
    open_store(f"file://{tmp_path}/store/default").save_checkpoint("evf-pre", 2, {"w": torch.zeros(4)})
    job_condition(k8s, "evf-pre", "Succeeded", "PyTorchJobSucceeded")
    k8s.wait_for(lambda: k8s.find(*JOBS, "evf-eval-pre"), message="the eval Job", timeout=30)
    job_done(k8s, "evf-eval-pre", "Failed", "BackoffLimitExceeded")
    p = wait_state(k8s, "trainingpipelines", "evf", "Failed", timeout=30)
    msg = condition(p, "Failed")["message"]
    assert "stage 2/3 (eval-pre) failed: evaluation Job evf-eval-pre" in msg and "BackoffLimitExceeded" in msg
    assert k8s.find(GV, "trainingruns", "evf-sft") is None
