"""Per-step run metrics (the dashboard's curves): recorded in batches, replaced on resume, thinned for display,
the same through SQLite, PostgreSQL and the HTTP API."""
import math

import pytest

from flashops.api.lineage import InvalidInput, NotFound

from lineage._graph import record_pipeline


def test_metrics_record_and_read_back_as_aligned_series(lineage):
    ids = record_pipeline(lineage)
    rows = [{"step": s, "loss": 3.0 - 0.01 * s, "lr": 1e-3} for s in range(1, 31)]
    rows[10]["mtp_loss"] = 1.5  # a metric that starts mid-run (MTP switched on) leaves gaps before it
    assert lineage.record_metrics(ids["pre"], rows[:20]) == 20
    assert lineage.record_metrics(ids["pre"], rows[20:]) == 10
    got = lineage.run_metrics(ids["pre"])
    assert got["steps"] == list(range(1, 31)) and got["rows"] == 30 and got["stride"] == 1
    assert got["series"]["loss"][0] == pytest.approx(2.99) and got["series"]["lr"] == [1e-3] * 30
    assert got["series"]["mtp_loss"][10] == 1.5 and got["series"]["mtp_loss"][0] is None


def test_a_resumed_step_replaces_its_row_and_nan_is_a_gap(lineage):
    ids = record_pipeline(lineage)
    lineage.record_metrics(ids["sft"], [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.9}])
    lineage.record_metrics(ids["sft"], [{"step": 2, "loss": 1.8}, {"step": 3, "loss": float("nan")}])
    got = lineage.run_metrics("quickstart-sft")
    assert got["steps"] == [1, 2, 3] and got["series"]["loss"][:2] == [2.0, 1.8]
    assert got["series"]["loss"][2] is None  # a diverged step shows as a gap, never as a made-up number


def test_long_runs_are_thinned_keeping_the_last_step(lineage):
    ids = record_pipeline(lineage)
    lineage.record_metrics(ids["pre"], [{"step": s, "loss": 1.0 / s} for s in range(1, 1002)])
    got = lineage.run_metrics(ids["pre"], max_points=100)
    assert got["rows"] == 1001 and got["stride"] == 11
    assert len(got["steps"]) <= 100 and got["steps"][-1] == 1001 and got["steps"] == sorted(got["steps"])


def test_bad_metric_rows_name_the_row_and_the_fix(lineage):
    ids = record_pipeline(lineage)
    with pytest.raises(InvalidInput, match=r"rows\[1\]\.step: missing"):
        lineage.record_metrics(ids["pre"], [{"step": 1, "loss": 1.0}, {"loss": 2.0}])
    with pytest.raises(InvalidInput, match=r"rows\[0\]\.loss: 'high' is not a number"):
        lineage.record_metrics(ids["pre"], [{"step": 1, "loss": "high"}])
    with pytest.raises(NotFound, match="is a dataset, not a run"):
        lineage.record_metrics(ids["ds"], [{"step": 1, "loss": 1.0}])
    with pytest.raises(InvalidInput, match="not a run"):
        lineage.run_metrics(ids["ds"])
    assert lineage.run_metrics(ids["pre"])["rows"] == 0  # nothing half-recorded


def test_trainer_reports_every_step_to_lineage(tmp_path, monkeypatch):
    """A real (tiny) training run on the debug model: each step's loss, lr and tokens/s reach lineage."""
    monkeypatch.setenv("FLASHOPS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FLASHOPS_LINEAGE_URL", raising=False)
    monkeypatch.delenv("FLASHOPS_LINEAGE_RUN_ID", raising=False)
    from flashops.api.lineage import open_lineage
    from flashops.api.spec import parse_object
    from flashops.storage import open_store
    from flashops.trainers.runner import run_training

    run = parse_object({"apiVersion": "flashops.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": "m"},
                        "spec": {"stage": "pretrain", "training": {"steps": 12, "batchSize": 2, "seqLen": 32},
                                 "pretrain": {"mtpFromStep": 6}, "checkpoint": {"every": 100}}})
    lin = open_lineage(f"sqlite:///{tmp_path / 'lineage.db'}")
    result = run_training(run, open_store(f"file://{tmp_path}/store"), lin)
    got = lin.run_metrics("m")
    assert got["steps"] == list(range(1, 13))
    assert [round(v, 6) for v in got["series"]["loss"]] == [round(r["loss"], 6) for r in result.history]
    assert all(v > 0 for v in got["series"]["tokens_per_s"]) and all(v is not None for v in got["series"]["lr"])
    assert got["series"]["mtp_loss"][-1] is not None and math.isfinite(got["series"]["mtp_loss"][-1])
