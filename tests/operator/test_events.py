"""Kubernetes Events for the operator's decisions (issue 17 item 1): before, `kubectl describe` showed
`Events: <none>` even after a permanent failure."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fixtures.k8s import GV, PYTORCHJOBS, job_condition, wait_state
from flashops.operator.events import Event, event_body, status_events

REPO = Path(__file__).resolve().parents[2]


def cond(state: str, reason: str, message: str) -> list[dict]:
    return [{"type": state, "status": "True", "reason": reason, "message": message}]


def test_each_decision_is_announced_once():
    job = {"kind": "PyTorchJob", "name": "r"}
    pending = {"state": "Pending", "children": [job], "conditions": cond("Pending", "JobSubmitted", "submitted")}
    assert status_events("TrainingRun", {}, pending) == [Event("Normal", "Created", "created PyTorchJob r")]
    assert status_events("TrainingRun", pending, pending) == []  # a resync announces nothing
    retry = {**pending, "retries": 1, "retryReason": "PyTorchJob r failed (OOMKilled); retry 1/2 as r-retry1",
             "children": [{"kind": "PyTorchJob", "name": "r-retry1"}]}
    assert status_events("TrainingRun", pending, retry) == [
        Event("Normal", "Created", "created PyTorchJob r-retry1"), Event("Warning", "Retrying", retry["retryReason"])]
    failed = {**retry, "state": "Failed", "conditions": cond("Failed", "BackoffLimitExceeded", "all 2 retries used")}
    assert status_events("TrainingRun", retry, failed) == [Event("Warning", "BackoffLimitExceeded", "all 2 retries used")]
    assert status_events("TrainingRun", failed, failed) == []


def test_stage_advanced_promotion_blocked_and_rejected_edit():
    s1 = {"state": "Running", "stage": "pretrain", "conditions": cond("Running", "StageRunning", "stage 1/2 running")}
    s2 = {"state": "Pending", "stage": "sft", "conditions": cond("Pending", "StagePending", "stage 2/2 (sft) is pending")}
    assert status_events("TrainingPipeline", s1, s2) == [Event("Normal", "StageAdvanced", "stage 2/2 (sft) is pending")]
    waiting = {"state": "Pending", "conditions": cond("Pending", "WaitingForModel", "waiting for TrainingRun r")}
    assert status_events("ModelDeployment", {}, waiting) == [
        Event("Warning", "PromotionBlocked", "waiting for TrainingRun r")]
    assert status_events("ModelDeployment", waiting, waiting) == []
    rejected = {**s1, "conditions": s1["conditions"] + [
        {"type": "Accepted", "status": "False", "reason": "InvalidSpec", "message": "spec.x: bad"}]}
    assert status_events("TrainingPipeline", s1, rejected) == [Event("Warning", "SpecRejected", "spec.x: bad")]


def test_event_body_points_at_the_object_and_keeps_messages_short():
    body = {"apiVersion": GV, "kind": "TrainingRun", "metadata": {"name": "r", "namespace": "ml", "uid": "u-1"}}
    e = event_body(body, Event("Warning", "Retrying", "x" * 5000), now="2026-01-01T00:00:00Z")
    assert e["involvedObject"] == {"apiVersion": GV, "kind": "TrainingRun", "name": "r", "namespace": "ml", "uid": "u-1"}
    assert len(e["message"]) == 1024 and e["metadata"]["namespace"] == "ml"
    assert (e["type"], e["reason"], e["source"]["component"]) == ("Warning", "Retrying", "flashops-operator")


@pytest.mark.k8s
def test_kubectl_describe_shows_created_retry_and_permanent_failure(k8s, start_operator):
    doc = yaml.safe_load((REPO / "examples" / "sft.yaml").read_text())
    doc["metadata"]["name"] = "sft-events"
    doc["spec"]["backoffLimit"] = 1
    start_operator()
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(doc))
    wait_state(k8s, "trainingruns", "sft-events", "Pending")
    job_condition(k8s, "sft-events", "Failed", "PyTorchJobFailed", "pod OOMKilled")
    k8s.wait_for(lambda: k8s.find(*PYTORCHJOBS, "sft-events-retry1"), message="the retry's job")
    job_condition(k8s, "sft-events-retry1", "Failed", "PyTorchJobFailed", "node lost")
    wait_state(k8s, "trainingruns", "sft-events", "Failed")

    def reasons() -> list[str]:
        events = [e for e in k8s.list("v1", "events") if e["involvedObject"]["name"] == "sft-events"]
        return [e["reason"] for e in sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"]))]

    k8s.wait_for(lambda: "BackoffLimitExceeded" in reasons(), message="the failure's event")
    assert reasons() == ["Created", "Retrying", "Created", "BackoffLimitExceeded"]
    described = k8s.kubectl("describe", "trainingrun", "sft-events").stdout
    events = described[described.index("Events:"):]
    assert "Retrying" in events and "pod OOMKilled" in events and "BackoffLimitExceeded" in events
    assert "flashops-operator" in events
