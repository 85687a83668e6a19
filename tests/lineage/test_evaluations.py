"""Evaluation nodes (issue 15): an evaluation of a checkpoint or model is recorded with its suites' content hashes,
listed newest first (a model also shows its checkpoint's), walked as target -evaluated_as-> evaluation, shown by
`flashops lineage show`, and refused when its result or target is wrong. Direct SQL on SQLite and PostgreSQL
and the HTTP client (the `lineage` fixture)."""
import pytest
from typer.testing import CliRunner

from flashops.api.lineage import InvalidInput, NotFound, NullLineage
from flashops.cli.app import app

from lineage._graph import counts, record_pipeline


def result(acc: float, suite: str = "builtin:chat-smoke") -> dict:
    return {"suites": [{"name": suite, "sha256": "sha256:" + "ab" * 32, "modes": [
        {"mode": "non-thinking", "accuracy": acc, "mean_tokens": 8.0, "accuracy_per_1k_tokens": acc * 125,
         "acceptance_length": {"1": 1.5, "2": 1.8, "3": None}, "per_domain": {"greeting": acc}, "tasks": 4}]}],
        "wall_s": 1.25}


def test_evaluations_are_recorded_newest_first_and_once(lineage):
    g = record_pipeline(lineage)
    first = lineage.add_evaluation(g["ck"], result(0.25))
    second = lineage.add_evaluation(f"lineage:{g['ck']}", result(0.5), name="eval-sft")
    assert lineage.add_evaluation(g["ck"], result(0.25)) == first  # the same result again: the same node
    evs = lineage.evaluations(g["ck"])
    assert [e["id"] for e in evs] == [second, first]
    assert evs[0]["result"]["suites"][0]["modes"][0]["accuracy"] == 0.5 and evs[0]["name"] == "eval-sft"
    assert evs[0]["target_id"] == g["ck"] and evs[0]["type"] == "evaluation" and evs[0]["created_at"]
    assert evs[0]["result"]["suites"][0]["sha256"] == "sha256:" + "ab" * 32
    assert lineage.evaluations(g["final"]) == []
    # a checkpoint URI works as the target too, and the graph walks to the evaluation
    third = lineage.add_evaluation("file:///s/quickstart-sft/step-50", result(0.75))
    down = lineage.descendants(g["final"], depth=1)
    assert {(e["dst"], e["type"]) for e in down["edges"]} == {(third, "evaluated_as")}
    assert lineage.resolve(f"lineage:{third}")["uri"] == "file:///s/quickstart-sft/step-50"


def test_a_model_lists_its_checkpoints_evaluations(lineage):
    g = record_pipeline(lineage)
    model = lineage.add_model(g["final"], "file:///s/models/quickstart/step-50", "quickstart", "step-50")
    on_ck = lineage.add_evaluation(g["final"], result(0.5))
    on_model = lineage.add_evaluation(model, result(0.6))
    assert [e["id"] for e in lineage.evaluations(model)] == [on_model, on_ck]
    assert [e["id"] for e in lineage.evaluations(g["final"])] == [on_ck]


def test_bad_evaluations_are_refused_and_record_nothing(lineage):
    g = record_pipeline(lineage)
    before = counts(lineage) if hasattr(lineage, "engine") else None
    with pytest.raises(InvalidInput, match="suites"):
        lineage.add_evaluation(g["ck"], {"wall_s": 1})
    with pytest.raises(InvalidInput, match=r"modes\[0\]\.mode"):
        lineage.add_evaluation(g["ck"], {"suites": [{"name": "s", "modes": [{"mode": "fast"}]}]})
    with pytest.raises(NotFound, match="checkpoint or a model"):
        lineage.add_evaluation(g["pre"], result(0.5))  # a run is not evaluated
    with pytest.raises(NotFound, match="no checkpoint or model"):
        lineage.add_evaluation("file:///nowhere/step-1", result(0.5))
    if before is not None:
        assert counts(lineage) == before


def test_null_lineage_records_no_evaluation():
    off = NullLineage()
    assert off.add_evaluation(1, result(0.5)) is None and off.evaluations(1) == []


def test_lineage_show_prints_an_evaluation(flashops_home):
    from flashops.api.lineage import open_lineage

    lin = open_lineage()
    g = record_pipeline(lin)
    ev = lin.add_evaluation(g["final"], result(0.5, "builtin:rl-heldout"))
    lin.close()
    out = CliRunner().invoke(app, ["lineage", "show", f"lineage:{ev}"])
    assert out.exit_code == 0, out.output
    assert "builtin:rl-heldout non-thinking: accuracy 0.500, 8.0 tokens, 62.50/1k tokens" in out.output
    assert "k1=1.50 k2=1.80" in out.output
    out = CliRunner().invoke(app, ["lineage", "show", "file:///s/quickstart-sft/step-50"])
    assert out.exit_code == 0 and f"-> evaluated_as: evaluation" in out.output and "accuracy 0.500" in out.output
