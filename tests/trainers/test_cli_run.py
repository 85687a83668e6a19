"""`flashops run -f FILE`: a pipeline ending in RL runs locally with lineage in SQLite under FLASHOPS_HOME,
checkpoints in file://$FLASHOPS_HOME/store, a summary table, the before/after RL comparison, and an
export that the serving loader reads; bad input exits 2 before training."""
import sqlite3

import pytest
import yaml
from typer.testing import CliRunner

from flashops.cli.app import app

PIPELINE = {
    "apiVersion": "flashops.dev/v1alpha1", "kind": "TrainingPipeline", "metadata": {"name": "mini"},
    "spec": {"stages": [
        {"name": "pre", "spec": {"stage": "pretrain", "training": {"steps": 2, "batchSize": 2, "seqLen": 32},
                                 "optimizer": {"name": "muon"}}},
        {"name": "rl", "spec": {"stage": "rl", "training": {"steps": 1, "seqLen": 32},
                                "rl": {"groupSize": 2, "promptsPerStep": 2, "maxNewTokens": 4,
                                       "curriculum": {"profileRollouts": 2, "profileMaxPrompts": 8}}}},
    ]},
}


@pytest.mark.slow
def test_flashops_run_pipeline_end_to_end(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("FLASHOPS_HOME", str(home))
    monkeypatch.delenv("FLASHOPS_LINEAGE_URL", raising=False)
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(PIPELINE))
    result = CliRunner().invoke(app, ["run", "-f", str(f)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.output
    assert "flashops run: summary" in out and "mini-pre" in out and "mini-rl" in out
    assert "before RL" in out and "after RL" in out and "greedy accuracy" in out
    assert f"file://{home}/store/runs/mini-rl/step-1" in out.replace("\n", "")
    # lineage in SQLite under FLASHOPS_HOME: both runs, their checkpoints and the exported model
    db = sqlite3.connect(home / "lineage.db")
    runs = {name: status for name, status in db.execute("select name, status from runs")}
    assert runs == {"mini-pre": "succeeded", "mini-rl": "succeeded"}
    models = db.execute("select uri from models").fetchall()
    assert len(models) == 1 and models[0][0].startswith(f"file://{home}/store/models/mini/")
    # the export is what `flashops serve` loads
    from flashops.serving.loading import fetch, load_codec, load_model

    d = fetch(models[0][0], str(tmp_path / "cache"))
    model, cfg = load_model(d)
    codec = load_codec(d)
    assert cfg.preset == "joyai-flash-debug" and codec.encode("<eos>") == [1]


def test_flashops_run_bad_input_exits_2(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHOPS_HOME", str(tmp_path / "home"))
    bad = {**PIPELINE, "spec": {"stages": [{"name": "pre", "spec": {"stage": "pretrain",
                                                                    "data": {"uri": f"file://{tmp_path}/none.jsonl"}}}]}}
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    result = CliRunner().invoke(app, ["run", "-f", str(f)])
    assert result.exit_code == 2 and "no such file" in result.output
    f.write_text("apiVersion: flashops.dev/v1alpha1\nkind: TrainingRun\nmetadata: {name: x}\nspec: {stage: sft, lr: 1}\n")
    result = CliRunner().invoke(app, ["run", "-f", str(f)])
    assert result.exit_code == 2 and "lr" in result.output
    assert not (tmp_path / "home" / "store").exists()
