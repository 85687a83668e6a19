"""A pipeline's eval stages run locally by `flashops run` (issue 15): each evaluates the previous training stage's
checkpoint through the serving engine, records the result in lineage on that checkpoint (named after the stage,
with the suite's content hash), leaves the next stage starting from the training checkpoint, never exports, and
`flashops run` prints a before/after table per eval stage. A bad suite fails before any training (exit 2)."""
import json

import pytest
import yaml
from typer.testing import CliRunner

from flashops.cli.app import app


def pipeline(suite: str) -> dict:
    ev = {"stage": "eval", "eval": {"suites": [suite], "maxTokens": 3}}
    return {"apiVersion": "flashops.dev/v1alpha1", "kind": "TrainingPipeline", "metadata": {"name": "ev"},
            "spec": {"stages": [
                {"name": "pre", "spec": {"stage": "pretrain", "training": {"steps": 2, "batchSize": 2, "seqLen": 32}}},
                {"name": "eval-pre", "spec": ev},
                {"name": "sft", "spec": {"stage": "sft", "training": {"steps": 1, "batchSize": 2, "seqLen": 32}}},
                {"name": "eval-sft", "spec": ev}]}}


@pytest.mark.slow
def test_eval_stages_run_locally_and_record_on_their_checkpoints(tmp_path, monkeypatch):
    from flashops.api.lineage import open_lineage

    home = tmp_path / "home"
    monkeypatch.setenv("FLASHOPS_HOME", str(home))
    monkeypatch.delenv("FLASHOPS_LINEAGE_URL", raising=False)
    suite = tmp_path / "two.jsonl"
    suite.write_text(json.dumps({"prompt": "What is 2 + 3?", "answer": "5", "match": "number", "thinking": False,
                                 "domain": "arithmetic"}) + "\n"
                     + json.dumps({"prompt": "Reverse: abc", "answer": "cba", "thinking": True}) + "\n")
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(pipeline(f"file://{suite}")))
    out = CliRunner().invoke(app, ["run", "-f", str(f)], env={"COLUMNS": "220"})
    assert out.exit_code == 0, out.output
    text = " ".join(out.output.split())
    assert "eval stage eval-pre" in text and "(no earlier eval)" in text
    assert "eval stage eval-sft" in text and "(before: eval stage eval-pre)" in text
    assert "acceptance k=3" in text and "accuracy / 1k tokens" in text

    lin = open_lineage()
    store = f"file://{home}/store"
    pre_ck, sft_ck = f"{store}/runs/ev-pre/step-2", f"{store}/runs/ev-sft/step-1"
    for ck, stage in ((pre_ck, "eval-pre"), (sft_ck, "eval-sft")):
        evs = lin.evaluations(ck)
        assert [e["name"] for e in evs] == [stage]
        result = evs[0]["result"]
        assert result["evaluated"] == ck and result["suites"][0]["name"] == f"file://{suite}"
        assert result["suites"][0]["sha256"].startswith("sha256:")
        assert [m["mode"] for m in result["suites"][0]["modes"]] == ["thinking", "non-thinking"]
        assert all(m["tasks"] == 1 for m in result["suites"][0]["modes"])
    # the eval stage changed nothing downstream: sft started from pre's checkpoint; sft (not an eval) exported
    sft_run = lin.node("ev-sft")
    assert [u["node"]["uri"] for u in sft_run["upstream"] if u["edge"] == "initialized_from"] == [pre_ck]
    assert [m["uri"] for m in lin.list_nodes(type="model")["items"]] == [f"{store}/models/ev/step-1"]
    assert {r["name"] for r in lin.list_nodes(type="run")["items"]} == {"ev-pre", "ev-sft"}


def test_a_bad_suite_fails_before_any_training(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHOPS_HOME", str(tmp_path / "home"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "answer": "y", "match": "fuzzy"}\n')
    f = tmp_path / "p.yaml"
    f.write_text(yaml.safe_dump(pipeline(f"file://{bad}")))
    out = CliRunner().invoke(app, ["run", "-f", str(f)])
    assert out.exit_code == 2, out.output
    assert "spec.stages[1].spec.eval.suites[0]" in out.output and "line 1: field 'match'" in out.output
    assert not (tmp_path / "home" / "store" / "runs").exists()
