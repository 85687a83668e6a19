"""The CRD-schema validator evaluates CEL rules (x-kubernetes-validations) and list types like the API server:
against the upstream Kubeflow/KServe CRDs and our own. Before, rules were ignored, so a TrainJob the real
server refuses (`9lives`) passed every test."""
from __future__ import annotations

from pathlib import Path

import pytest

from flashops.api.crdschema import CRDValidator, SchemaValidator, compile_rule, rules

CRDS = Path(__file__).resolve().parents[1] / "fixtures" / "crds"
TRAINJOBS = CRDS / "trainer.kubeflow.org_trainjobs.yaml"


def trainjob(name: str, **spec) -> dict:
    return {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJob", "metadata": {"name": name},
            "spec": {"runtimeRef": {"name": "torch-distributed"}, **spec}}


@pytest.mark.parametrize("path", sorted(CRDS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_upstream_rule_compiles(path):
    for where, rule in rules(CRDValidator.from_file(path).schema):
        compile_rule(rule["rule"])  # a syntax the library cannot read would silently skip a rule


def test_every_rule_of_our_crds_compiles():
    from flashops.api import crds

    found = [r for c in crds.all_crds() for _, r in rules(c["spec"]["versions"][0]["schema"]["openAPIV3Schema"])]
    assert len(found) >= 10
    for rule in found:
        compile_rule(rule["rule"])


def test_upstream_trainjob_name_rule_rejects_9lives_and_long_names():
    v = CRDValidator.from_file(TRAINJOBS)
    assert v.errors(trainjob("lives9")) == []
    assert v.errors(trainjob("9lives")) == ["<root>: Invalid value: metadata.name must match RFC 1035 DNS label format"]
    assert any("63" in e or "length" in e.lower() for e in v.errors(trainjob("a" * 64)))


def test_transition_rules_run_on_updates_only():
    v = CRDValidator.from_file(TRAINJOBS)
    old = trainjob("job")
    new = trainjob("job", runtimeRef={"name": "other-runtime"})
    assert v.errors(new) == []  # a create: no oldSelf
    assert v.errors(new, old=old) == ["spec.runtimeRef: Invalid value: field is immutable"]
    assert v.errors(old, old=old) == []
    assert any("ManagedBy must be" in e for e in v.errors(trainjob("job", managedBy="me")))


SCHEMA = {
    "type": "object",
    "properties": {
        "band": {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "number"}, "sum": {"type": "number"}},
                 "x-kubernetes-validations": [{"rule": "self.a + self.b == self.sum",
                                               "messageExpression": "'a + b must be ' + string(self.sum)"}]},
        "stages": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                   "items": {"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer",
                             "x-kubernetes-validations": [{"rule": "self >= oldSelf", "message": "n may only grow"}]}}}},
        "tags": {"type": "array", "x-kubernetes-list-type": "set", "items": {"type": "string"}},
    },
}


def test_number_fields_are_doubles_message_expressions_and_list_types():
    v = SchemaValidator(SCHEMA)
    assert v.errors({"band": {"a": 1, "b": 2, "sum": 3}}) == []  # ints in a number field: CEL doubles, no overload error
    assert v.errors({"band": {"a": 1, "b": 2, "sum": 4}}) == ["band: Invalid value: a + b must be 4"]
    assert v.errors({"stages": [{"name": "x"}, {"name": "x"}]}) == ['stages[1]: Duplicate value: {"name": "x"}']
    assert v.errors({"tags": ["a", "a"]}) == ['tags[1]: Duplicate value: "a"']


def test_list_map_entries_correlate_by_key_for_transition_rules():
    v = SchemaValidator(SCHEMA)
    old = {"stages": [{"name": "a", "n": 2}, {"name": "b", "n": 5}]}
    assert v.errors({"stages": [{"name": "b", "n": 5}, {"name": "a", "n": 3}]}, old=old) == []  # reordered, grown
    assert v.errors({"stages": [{"name": "b", "n": 4}, {"name": "a", "n": 3}]}, old=old) == [
        "stages[0].n: Invalid value: n may only grow"]
    assert v.errors({"stages": [{"name": "c", "n": 0}]}, old=old) == []  # a new entry has no oldSelf
