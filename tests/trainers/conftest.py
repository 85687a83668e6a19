"""Trainer test helpers: tiny specs on the debug model, an isolated FLASHOPS_HOME per test."""
import pytest

from flashops.api.spec import parse_object

TINY = {"training": {"steps": 2, "batchSize": 2, "seqLen": 32}, "checkpoint": {"every": 1, "keep": 5}}


def _tiny_run(name: str, stage: str, **spec):
    body = {"stage": stage, **{k: dict(v) for k, v in TINY.items()}}
    for k, v in spec.items():
        body[k] = {**body.get(k, {}), **v} if isinstance(v, dict) and isinstance(body.get(k), dict) else v
    return parse_object({"apiVersion": "flashops.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name},
                         "spec": body})


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHOPS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLASHOPS_LINEAGE_URL", raising=False)
    monkeypatch.delenv("FLASHOPS_LINEAGE_RUN_ID", raising=False)
    return tmp_path / "home"


@pytest.fixture
def store(home):
    from flashops.storage import open_store

    return open_store(f"file://{home}/store")


@pytest.fixture
def tiny_run():
    """tiny_run(name, stage, **spec_fields) -> a TrainingRun on the debug model with 2 steps of 2 x 32 tokens."""
    return _tiny_run
