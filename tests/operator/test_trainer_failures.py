"""A trainer that refuses its spec (exit 2) ends the run Failed with reason InvalidSpec after ONE attempt; any
other failure is retried. The trainer's real entry point writes the termination message; the test plays the
kubelet (copies it into the pod's status) and the training operator (marks the job Failed)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from fixtures.k8s import GV, PYTORCHJOBS, condition, job_condition, wait_state
from flashops.api.failures import TrainerFailure, parse_termination_message, termination_message, trainer_failure

REPO = Path(__file__).resolve().parents[2]


def _pod(run: str, attempt: int, exit_code: int, message: str = "", reason: str = "Error") -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{run}-master-{attempt}", "labels": {
                "flashops.dev/owner-kind": "TrainingRun", "flashops.dev/owner": run, "flashops.dev/attempt": str(attempt)}},
            "spec": {"containers": [{"name": "pytorch", "image": "flashops"}]},
            "status": {"containerStatuses": [{"name": "pytorch", "state": {"terminated": {
                "exitCode": exit_code, "reason": reason, "message": message}}}]}}


def test_trainer_failure_reads_exit_codes_and_termination_messages():
    assert trainer_failure(_pod("r", 0, 2)).permanent  # a plain `python -m flashops.trainers` exit 2
    # torchrun turns the child's 2 into its own 1: the termination message carries the 2
    f = trainer_failure(_pod("r", 0, 1, termination_message(2, "spec.data.uri: no such file")))
    assert f == TrainerFailure(2, "InvalidSpec", "spec.data.uri: no such file") and f.permanent
    crash = trainer_failure(_pod("r", 0, 1, termination_message(1, "RuntimeError: NCCL timeout")))
    assert crash.reason == "TrainerFailed" and not crash.permanent
    oom = trainer_failure(_pod("r", 0, 137, reason="OOMKilled"))
    assert (oom.exit_code, oom.reason, oom.permanent) == (137, "OOMKilled", False)
    assert trainer_failure(_pod("r", 0, 0)) is None
    assert parse_termination_message("Traceback (most recent call last): ...") is None


def _bad_data_run(name: str) -> dict:
    doc = yaml.safe_load((REPO / "examples" / "sft.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"].pop("initFrom")
    doc["spec"]["data"] = {"uri": "file:///nonexistent/chat.jsonl"}  # valid spec, data the trainer cannot read
    doc["spec"]["backoffLimit"] = 2
    return doc


def test_a_spec_error_in_a_pod_ends_the_run_failed_after_one_attempt(k8s, start_operator, tmp_path, monkeypatch):
    from flashops.trainers.__main__ import main

    doc = _bad_data_run("sft-bad-data")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump(doc))
    log = tmp_path / "termination-log"
    monkeypatch.setenv("FLASHOPS_TERMINATION_LOG", str(log))
    monkeypatch.setenv("FLASHOPS_HOME", str(tmp_path / "home"))
    assert main(["--spec", str(spec_file)]) == 2  # the real trainer refuses the data before any compute
    written = log.read_text()
    assert written.startswith("flashops exit 2 InvalidSpec: ") and "nonexistent/chat.jsonl" in written

    op = start_operator()
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(doc))
    k8s.wait_for(lambda: k8s.find(*PYTORCHJOBS, "sft-bad-data"), message="the first attempt's job")
    pod = _pod("sft-bad-data", 0, 1, written)  # torchrun's own exit code is 1
    status = pod.pop("status")
    k8s.create(pod, "pods")
    k8s.patch("v1", "pods", pod["metadata"]["name"], {"status": status}, subresource="status")
    job_condition(k8s, "sft-bad-data", "Failed", "PyTorchJobFailed", "1 Master replica(s) failed")

    run = wait_state(k8s, "trainingruns", "sft-bad-data", "Failed")
    failed = condition(run, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "nonexistent/chat.jsonl" in failed["message"] and "no retry" in failed["message"]
    assert run["status"]["retries"] == 0
    # the decision sticks: resyncs (and the pod going away) start no retry
    k8s.delete("v1", "pods", pod["metadata"]["name"])
    before = op.operator.reconciles
    op.operator.reconcile("TrainingRun", "default", "sft-bad-data", quiet=True)
    time.sleep(1.0)
    assert op.operator.reconciles > before
    assert [j["metadata"]["name"] for j in k8s.list(*PYTORCHJOBS)] == ["sft-bad-data"]
    assert state_reason(k8s.get(GV, "trainingruns", "sft-bad-data")) == ("Failed", "InvalidSpec")


def state_reason(run: dict) -> tuple[str, str]:
    return run["status"]["state"], condition(run, run["status"]["state"])["reason"]


def test_a_crash_is_still_retried_and_the_retry_says_what_the_trainer_said(k8s, start_operator):
    start_operator()
    doc = _bad_data_run("sft-crash")
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(doc))
    k8s.wait_for(lambda: k8s.find(*PYTORCHJOBS, "sft-crash"), message="the first attempt's job")
    pod = _pod("sft-crash", 0, 1, termination_message(1, "RuntimeError: NCCL watchdog timeout"))
    status = pod.pop("status")
    k8s.create(pod, "pods")
    k8s.patch("v1", "pods", pod["metadata"]["name"], {"status": status}, subresource="status")
    job_condition(k8s, "sft-crash", "Failed", "PyTorchJobFailed", "1 Master replica(s) failed")
    k8s.wait_for(lambda: k8s.find(*PYTORCHJOBS, "sft-crash-retry1"), message="the retry's job")
    run = k8s.get(GV, "trainingruns", "sft-crash")
    assert run["status"]["retries"] == 1 and "NCCL watchdog timeout" in run["status"]["retryReason"]
