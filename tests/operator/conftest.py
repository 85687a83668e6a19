"""Operator tests: start/stop the real kopf operator (in a thread) against the `k8s` emulator. The helpers
that play the Kubeflow/KServe controllers (job_condition, wait_state...) live in tests/fixtures/k8s.py."""
from __future__ import annotations

import pytest

from flashops.operator.config import OperatorConfig
from flashops.operator.main import RunningOperator, start_in_thread


@pytest.fixture
def start_operator(k8s, tmp_path):
    """start_operator(**config) -> RunningOperator; every operator started is stopped at teardown."""
    running: list[RunningOperator] = []

    def start(**overrides) -> RunningOperator:
        settings = dict(s3_endpoint="http://127.0.0.1:9", checkpoint_root=f"file://{tmp_path}/store",
                        resync_seconds=30, retry_seconds=0.5, workers=8)
        settings.update(overrides)
        op = start_in_thread(OperatorConfig(**settings))
        running.append(op)
        return op

    yield start
    for op in running:
        if op.thread.is_alive():
            op.stop()
