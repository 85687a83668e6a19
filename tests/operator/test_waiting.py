"""Waiting writes nothing (issue 17 item 6): a ModelDeployment waiting for its source, or a run whose lineage
record cannot be created, got two annotation writes per kopf retry (every retrySeconds, forever). Now the
operator waits in memory with a growing backoff and wakes at once when the awaited object changes. And a
lineage answer "not found" is told apart from "lineage is down"."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from fixtures.k8s import ISVCS, PYTORCHJOBS, condition, job_condition, wait_state
from flashops.api import spec as S
from flashops.operator.config import OperatorConfig
from flashops.operator.integrations import Integrations, LineageDown, LineageNotFound, LineageRefused
from flashops.operator.reconcile import resolve_model_source

REPO = Path(__file__).resolve().parents[2]
WRITES = ("POST", "PUT", "PATCH")


def writes(k8s, plural: str) -> int:
    return sum(n for (method, p), n in k8s.api.counts.items() if p == plural and method in WRITES)


def reads(k8s, plural: str) -> int:
    return k8s.api.counts.get(("GET", plural), 0)


@pytest.mark.k8s
@pytest.mark.slow  # ~20 s: torch and kserve imports, plus a 3 s window of silence
def test_a_deployment_waiting_for_its_source_writes_nothing_and_wakes_when_the_source_succeeds(k8s, start_operator, tmp_path):
    start_operator(retry_seconds=0.25)
    k8s.kubectl("apply", "--validate=false", "-f", str(REPO / "examples" / "pretrain.yaml"))
    wait_state(k8s, "trainingruns", "pretrain-debug", "Pending")
    md = {"apiVersion": S.API_GROUP_VERSION, "kind": "ModelDeployment", "metadata": {"name": "waits"},
          "spec": {"source": "pretrain-debug"}}
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(md))
    md = wait_state(k8s, "modeldeployments", "waits", "Pending")
    assert condition(md, "Pending")["reason"] == "WaitingForModel"
    time.sleep(0.5)  # kopf's one-time bookkeeping (finalizer, last-handled configuration) is done
    before_writes, before_reads = writes(k8s, "modeldeployments"), reads(k8s, "modeldeployments")
    time.sleep(3.0)  # at retrySeconds 0.25 kopf's TemporaryError retried 12 times here, 2 writes each
    assert writes(k8s, "modeldeployments") - before_writes == 0
    assert reads(k8s, "modeldeployments") - before_reads <= 6  # backoff 0.25, 0.5, 1, 2 s: a few wake-ups

    from flashops.storage import open_store
    import torch

    open_store(f"file://{tmp_path}/store/default").save_checkpoint("pretrain-debug", 5, {"w": torch.zeros(2)})
    import kserve.models  # noqa: F401 - imported once per process by the InferenceService builder: not the wake-up
    job_condition(k8s, "pretrain-debug", "Succeeded", "PyTorchJobSucceeded")
    wait_state(k8s, "trainingruns", "pretrain-debug", "Succeeded")
    started = time.monotonic()
    k8s.wait_for(lambda: k8s.find(*ISVCS, "waits"), timeout=10, message="the InferenceService")
    assert time.monotonic() - started < 4  # the source's watch wakes it, not the backoff (8 s, then 16 s by now)


@pytest.mark.k8s
def test_a_run_whose_lineage_is_down_waits_without_writes(k8s, start_operator):
    op = start_operator(lineage_url="http://127.0.0.1:9/", retry_seconds=0.25)  # nothing listens there
    k8s.kubectl("apply", "--validate=false", "-f", str(REPO / "examples" / "sft.yaml"))
    name = yaml.safe_load((REPO / "examples" / "sft.yaml").read_text())["metadata"]["name"]
    k8s.wait_for(lambda: k8s.find(*PYTORCHJOBS, name), message="the job despite lineage being down")
    run = wait_state(k8s, "trainingruns", name, "Pending")
    assert "lineage not recorded yet (will retry)" in condition(run, "Pending")["message"]
    time.sleep(0.5)
    before, reconciles = writes(k8s, "trainingruns"), op.operator.reconciles
    time.sleep(3.0)
    assert writes(k8s, "trainingruns") - before == 0
    assert 1 <= op.operator.reconciles - reconciles <= 6  # it keeps trying, less and less often


def test_lineage_not_found_is_not_lineage_down(tmp_path):
    md = S.parse_object({"apiVersion": S.API_GROUP_VERSION, "kind": "ModelDeployment", "metadata": {"name": "d"},
                         "spec": {"source": "lineage:999"}})
    found = Integrations(OperatorConfig(lineage_url=f"sqlite:///{tmp_path}/lineage.db"))
    with pytest.raises(LineageNotFound):
        found.resolve("lineage:999")
    uri, phase = resolve_model_source(None, found, md)
    assert uri is None and phase.reason == "SourceNotFound" and "no record" in phase.message

    down = Integrations(OperatorConfig(lineage_url="http://127.0.0.1:9/"))
    with pytest.raises(LineageDown):
        down.resolve("lineage:999")
    uri, phase = resolve_model_source(None, down, md)
    assert uri is None and phase.reason == "LineageUnavailable"

    refused = Integrations(OperatorConfig(lineage_url="mysql://lineage/db"))  # a settings mistake, not an outage
    with pytest.raises(LineageRefused, match="FLASHOPS_LINEAGE_URL"):
        refused.resolve("lineage:999")
    uri, phase = resolve_model_source(None, refused, md)
    assert uri is None and phase.reason == "LineageRefused"
