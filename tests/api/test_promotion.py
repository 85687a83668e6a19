"""Promotion gates and mtpTokens: auto as one pure decision (flashops.api.promotion): the numbers in a block,
the current model as the bar, bad input naming the field, and k picked from recorded acceptance lengths."""
from __future__ import annotations

import pytest

from flashops.api.promotion import choose_mtp_tokens, decide, recorded_evaluations
from flashops.api.spec import PromotionSpec, SpecError, parse_object

SUITE = "builtin:rl-heldout"


def record(rid, accuracy, mean_tokens=20.0, mode="non-thinking", suite=SUITE, sha="a" * 64, acceptance=None,
           cost=None):
    entry = {"mode": mode, "accuracy": accuracy, "mean_tokens": mean_tokens,
             "accuracy_per_1k_tokens": 1000 * accuracy / mean_tokens}
    if acceptance is not None:
        entry["acceptance_length"] = {str(k): v for k, v in acceptance.items()}
    if cost is not None:
        entry["mtp_cost_ratio"] = cost
    return {"id": rid, "created_at": "2026-12-02T22:00:00Z",
            "result": {"suites": [{"name": suite, "sha256": sha, "modes": [entry]}]}}


def gate(**kw):
    return PromotionSpec.model_validate({"require": [{"suite": SUITE, "metric": "accuracy", "min": 0.4}], **kw})


def test_a_model_below_the_threshold_is_blocked_with_the_numbers():
    d = decide(gate(), [record(3, 0.31)], None, candidate="file:///s/models/q/step-40")
    assert not d.passed and not d.waiting
    (c,) = d.checks
    assert (c.suite, c.mode, c.metric, c.value, c.min, c.passed) == (SUITE, "non-thinking", "accuracy", 0.31, 0.4, False)
    assert "blocked" in d.message and "accuracy 0.31 < min 0.4" in d.message
    assert d.to_status()["checks"][0]["value"] == 0.31


def test_a_model_above_the_threshold_passes_when_nothing_is_served_yet():
    d = decide(gate(), [record(3, 0.5), record(1, 0.1)], None, candidate="m2")  # the newest record counts
    assert d.passed and d.checks[0].value == 0.5 and "thresholds only" in d.message


def test_compare_to_current_needs_the_improvement_in_the_metrics_units():
    g = gate(minImprovement=0.05)
    blocked = decide(g, [record(5, 0.52)], [record(2, 0.5)], candidate="new", current="old")
    assert not blocked.passed
    c = blocked.checks[0]
    assert (c.value, c.current, c.required) == (0.52, 0.5, pytest.approx(0.55))
    assert "current model 0.5" in blocked.message and "old keeps serving" in blocked.message
    passed = decide(g, [record(5, 0.56)], [record(2, 0.5)], candidate="new", current="old")
    assert passed.passed and "against the current model old" in passed.message
    # compareTo none: the current model's numbers do not matter
    assert decide(gate(compareTo="none"), [record(5, 0.41)], [record(2, 0.9)], candidate="new", current="old").passed


def test_lower_is_better_for_mean_tokens():
    g = PromotionSpec.model_validate({"require": [{"suite": SUITE, "metric": "mean_tokens", "max": 30}]})
    assert decide(g, [record(5, 0.5, mean_tokens=18)], [record(2, 0.5, mean_tokens=20)], candidate="n", current="o").passed
    d = decide(g, [record(5, 0.5, mean_tokens=22)], [record(2, 0.5, mean_tokens=20)], candidate="n", current="o")
    assert not d.passed and d.checks[0].required == 20 and "mean_tokens 22 <= max 30, > 20 (current model 20)" in d.message


def test_the_served_model_itself_always_passes():
    assert decide(gate(), [], None, candidate="m", current="m").passed


def test_a_suite_never_evaluated_names_the_field_and_the_fix():
    d = decide(gate(), [record(3, 0.9, suite="builtin:chat-smoke")], None, candidate="m")
    assert not d.passed and d.waiting
    assert "spec.promotion.require[0].suite: 'builtin:rl-heldout' was never evaluated for m" in d.message
    assert "builtin:chat-smoke" in d.message and "flashops eval --model m --suite builtin:rl-heldout" in d.message
    none = decide(gate(), [], None, candidate="m")
    assert "it has no recorded evaluation" in none.message


def test_a_mode_never_evaluated_and_an_unevaluated_current_model_say_what_to_run():
    d = decide(gate(), [record(3, 0.9, mode="thinking")], None, candidate="m")
    assert "require[0].mode" in d.message and "not non-thinking" in d.message
    d = decide(gate(), [record(3, 0.9)], [], candidate="m", current="old")
    assert not d.passed and "cannot compare with the current model old" in d.message and "compareTo: none" in d.message


def test_a_changed_suite_is_not_compared_across_versions():
    d = decide(gate(), [record(3, 0.9, sha="b" * 64)], [record(1, 0.5)], candidate="m", current="old")
    assert not d.passed and "different contents" in d.message


def test_acceptance_length_at_the_deployments_k():
    g = PromotionSpec.model_validate({"require": [{"suite": SUITE, "metric": "acceptance_length", "min": 1.5}],
                                      "compareTo": "none"})
    recs = [record(3, 0.5, acceptance={1: 1.7, 2: 1.9, 3: 1.4})]
    assert decide(g, recs, None, candidate="m", mtp_tokens=2).checks[0].k == 2
    blocked = decide(g, recs, None, candidate="m", mtp_tokens=3)
    assert not blocked.passed and "acceptance_length@k=3 1.4 < min 1.5" in blocked.message
    assert decide(g, recs, None, candidate="m").checks[0].k == 3  # default: the largest k recorded


@pytest.mark.parametrize("promotion, words", [
    ({"require": [{"suite": SUITE, "metric": "acc", "min": 1}]},
     "spec.promotion.require[0].metric: 'acc' is not one of accuracy, accuracy_per_1k_tokens, mean_tokens, acceptance_length"),
    ({"require": [{"suite": SUITE, "metric": "accuracy", "min": 0.9, "max": 0.1}]}, "min 0.9 is larger than max 0.1"),
    ({"require": [{"suite": SUITE, "metric": "accuracy", "k": 2}]}, "k 2 applies to metric acceptance_length only"),
    ({"compareTo": "none", "require": [{"suite": SUITE, "metric": "accuracy"}]}, "checks nothing"),
    ({"require": []}, "spec.promotion.require"),
    ({"require": [{"suite": SUITE, "metric": "accuracy", "min": 0.1}], "minImprovement": -1}, "minImprovement"),
])
def test_bad_gates_are_refused_by_validate_and_by_the_crd(promotion, words):
    from flashops.api import crds
    from flashops.api.crdschema import CRDValidator

    doc = {"apiVersion": "flashops.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "x"},
           "spec": {"source": "s3://b/m", "promotion": promotion}}
    with pytest.raises(SpecError) as e:
        parse_object(doc)
    assert words in str(e.value)
    assert CRDValidator(crds.crd("ModelDeployment")).errors(doc)


def test_mtp_tokens_auto_in_the_spec_and_the_crd():
    from flashops.api import crds
    from flashops.api.crdschema import CRDValidator

    v = CRDValidator(crds.crd("ModelDeployment"))
    for value, ok in (("auto", True), (0, True), (3, True), (4, False), ("fast", False)):
        doc = {"apiVersion": "flashops.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "x"},
               "spec": {"source": "s3://b/m", "speculative": {"mtpTokens": value}}}
        assert (v.errors(doc) == []) == ok, value
        if ok:
            assert parse_object(doc).spec.speculative.mtp_tokens == value
        else:
            with pytest.raises(SpecError, match=r"spec.speculative.mtpTokens: .* use 0 \(off\) to 3, or auto"):
                parse_object(doc)


def test_mtp_tokens_auto_weighs_acceptance_against_the_measured_cost():
    recs = [record(4, 0.5, acceptance={1: 1.8, 2: 2.3, 3: 2.45}, cost=0.1)]
    choice = choose_mtp_tokens(recs)
    # expected speedup: 1.8/1.1 = 1.64, 2.3/1.2 = 1.92, 2.45/1.3 = 1.88 -> k=2: the third draft costs more than it adds
    assert choice.k == 2 and choice.speedups[2] == pytest.approx(2.3 / 1.2) and "lineage:4" in choice.message
    assert choose_mtp_tokens([record(4, 0.5, acceptance={1: 1.8, 2: 2.3, 3: 2.5}, cost=1.0)]).k == 0  # MTP as dear as the model
    assert choose_mtp_tokens([record(4, 0.5, acceptance={1: 1.9, 2: 2.8, 3: 3.7}, cost=0.02)]).k == 3


def test_mtp_tokens_auto_without_measurements_says_so_and_falls_back():
    none = choose_mtp_tokens([record(4, 0.5)])
    assert none.k == 0 and "no recorded evaluation with MTP acceptance lengths" in none.message
    no_cost = choose_mtp_tokens([record(4, 0.5, acceptance={1: 1.8})], fallback=1)
    assert no_cost.k == 1 and "no measured mtp_cost_ratio" in no_cost.message


class FakeLineage:
    """evaluations() as Lineage answers it (the SQL store is exercised in the serve and operator tests)."""

    def __init__(self, evals):
        self.evals = evals

    def evaluations(self, ref):
        if ref not in self.evals:
            raise LookupError(ref)
        return self.evals[ref]


def test_recorded_evaluations_newest_first_and_none_for_an_unknown_model():
    lin = FakeLineage({"file:///m": [record(3, 0.2), record(5, 0.1), record(4, 0.3)]})
    assert [r["id"] for r in recorded_evaluations(lin, "file:///m")] == [5, 4, 3]
    assert recorded_evaluations(lin, "file:///other") == []
