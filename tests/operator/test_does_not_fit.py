"""A TrainingRun or TrainingPipeline whose spec names resources.gpuMemory and cannot fit it per rank is refused
by the operator with condition reason DoesNotFit, the numbers and the fix, before any job or pod exists (the
torch-free plan of flashops.api.plan; `flashops plan` computes the same figures on a sharded meta model)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from fixtures.k8s import GV, PYTORCHJOBS, condition, wait_state

pytestmark = pytest.mark.k8s
REPO = Path(__file__).resolve().parents[2]


def test_run_that_cannot_fit_its_gpus_is_refused_before_any_pod(k8s, start_operator):
    op = start_operator()
    run = yaml.safe_load((REPO / "examples" / "pretrain-48b.yaml").read_text())
    run["metadata"]["name"] = "too-big"
    run["spec"]["parallelism"] = {"nodes": 1, "procsPerNode": 8, "ep": 8}  # 8 x 80GiB: the plan says no
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(run))
    got = wait_state(k8s, "trainingruns", "too-big", "Failed")
    failed = condition(got, "Failed")
    assert failed["reason"] == "DoesNotFit" and condition(got, "Accepted")["status"] == "False"
    assert "does NOT fit" in failed["message"] and "8 ranks" in failed["message"] and "GPUs" in failed["message"]
    assert k8s.list(*PYTORCHJOBS) == []  # no job, so no pod
    before = op.operator.reconciles
    time.sleep(1.5)
    assert op.operator.reconciles - before <= 2  # permanent: no retry loop

    # the same model on 64 GPUs fits: accepted, and its job is created
    k8s.kubectl("patch", "trainingrun", "too-big", "--type=merge", "-p",
                '{"spec":{"parallelism":{"nodes":8,"procsPerNode":8,"ep":8}}}')
    k8s.wait_for(lambda: k8s.list(*PYTORCHJOBS), message="the fitting run's job")
