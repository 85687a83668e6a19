"""Generated CRDs: structural, and they accept every example and reject bad instances."""
from pathlib import Path

import pytest
import yaml

from flashops.api import crds
from flashops.api.crdschema import CRDValidator
from flashops.api.spec import KINDS, load_file

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))
VALIDATORS = {kind: CRDValidator(crds.crd(kind)) for kind in KINDS}


def walk(node, path="schema"):
    yield path, node
    for key in ("properties",):
        for name, child in node.get(key, {}).items():
            yield from walk(child, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("kind", list(KINDS))
def test_crd_is_structural(kind):
    c = crds.crd(kind)
    version = c["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    assert {col["name"] for col in version["additionalPrinterColumns"]} >= {"State", "Age"}
    assert c["spec"]["names"]["shortNames"]
    for path, node in walk(version["schema"]["openAPIV3Schema"]):
        for banned in ("anyOf", "oneOf", "allOf", "$ref", "const", "prefixItems", "title"):
            assert banned not in node, f"{path} has {banned}: not structural"
        assert "type" in node or node.get("x-kubernetes-int-or-string") or node.get(
            "x-kubernetes-preserve-unknown-fields"), f"{path} has no type"
        if "default" in node:
            assert node["default"] is not None, path


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_are_valid_crd_instances(path):
    for doc in yaml.safe_load_all(path.read_text()):
        assert VALIDATORS[doc["kind"]].errors(doc) == []
    for obj in load_file(path):  # the normalised form (all defaults filled in) too
        assert VALIDATORS[obj.kind].errors(obj.to_dict()) == []


@pytest.mark.parametrize(
    "kind, spec, field",
    [
        ("TrainingRun", {"stage": "pretrian"}, "spec.stage"),
        ("TrainingRun", {"stage": "rl", "rl": {"groupSize": "four"}}, "spec.rl.groupSize"),
        ("TrainingRun", {"stage": "rl", "rl": {"algorithm": "ppo"}}, "spec.rl.algorithm"),
        ("TrainingRun", {"stage": "sft", "training": {"steps": 0}}, "spec.training.steps"),
        ("TrainingRun", {"stage": "sft", "optimizer": {"lr": 0}}, "spec.optimizer.lr"),
        ("TrainingPipeline", {"stages": "pretrain"}, "spec.stages"),
        ("ModelDeployment", {"source": "x", "speculative": {"mtpTokens": 5}}, "spec.speculative.mtpTokens"),
        ("ModelDeployment", {"source": "x", "canaryTrafficPercent": 101}, "spec.canaryTrafficPercent"),
        ("ModelDeployment", {}, "spec"),
    ],
)
def test_crd_rejects_invalid_instances(kind, spec, field):
    obj = {"apiVersion": "flashops.dev/v1alpha1", "kind": kind, "metadata": {"name": "x"}, "spec": spec}
    errors = VALIDATORS[kind].errors(obj)
    assert errors and any(e.startswith(field) for e in errors), errors


def test_crd_yaml_is_the_generated_set():
    docs = list(yaml.safe_load_all(crds.crds_yaml()))
    assert [d["spec"]["names"]["kind"] for d in docs] == list(KINDS)
    assert {d["metadata"]["name"] for d in docs} == {
        "trainingruns.flashops.dev", "trainingpipelines.flashops.dev", "modeldeployments.flashops.dev"}
