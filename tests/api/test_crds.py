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


# Names and cross-field rules (issue 17 item 3): `flashops validate` (pydantic) and the CRD (CEL, what
# `kubectl apply` runs) make the same decision. Before, the CRD took every one of these, and the child
# (or the operator, in status) refused them only afterwards.
def _obj(kind, name, spec):
    return {"apiVersion": "flashops.dev/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec}


STAGE = {"stage": "sft"}
REFUSED = [
    ("TrainingRun", "9lives", STAGE, "RFC 1035 label"),
    ("TrainingRun", "run.v1", STAGE, "RFC 1035 label"),
    ("TrainingRun", "r" * 64, STAGE, "at most 63"),
    ("ModelDeployment", "m" * 48, {"source": "s3://b/m"}, "at most 47"),
    ("TrainingPipeline", "p" * 50, {"stages": [{"name": "pretrain-stage", "spec": {"stage": "pretrain"}}]}, "at most 63"),
    ("TrainingPipeline", "p", {"stages": [{"name": "a", "spec": STAGE}, {"name": "a", "spec": STAGE}]},
     "Duplicate value|must be unique"),
    ("TrainingRun", "rl", {"stage": "rl", "rl": {"delta": 0.4, "cPlus": 0.3, "cMinus": 0.3}}, "cPlus"),
    ("TrainingRun", "cp", {"stage": "rl", "rl": {"delta": 0.4, "cPlus": 0.5}}, "below delta"),
    ("TrainingRun", "mb", {"stage": "sft", "training": {"batchSize": 8, "microBatchSize": 3}}, "microBatchSize"),
    ("TrainingRun", "ep", {"stage": "sft", "parallelism": {"procsPerNode": 2, "ep": 4}}, "ep"),
    ("TrainingRun", "dp", {"stage": "sft", "parallelism": {"procsPerNode": 4, "dpShard": 3}}, "dpShard"),
    ("ModelDeployment", "rep", {"source": "r", "replicas": {"min": 3, "max": 2}}, "max"),
]
ACCEPTED = [
    ("TrainingRun", "lives9", STAGE),
    ("TrainingRun", "r" * 63, STAGE),
    ("ModelDeployment", "m" * 47, {"source": "s3://b/m"}),
    ("TrainingPipeline", "p" * 50, {"stages": [{"name": "pretrain-stg", "spec": {"stage": "pretrain"}}]}),
    ("TrainingPipeline", "p", {"stages": [{"name": "1st", "spec": STAGE}, {"name": "2nd", "spec": STAGE}]}),
    ("TrainingRun", "rl", {"stage": "rl", "rl": {"delta": 0.7, "cPlus": 0.1, "cMinus": 0.6}}),
    ("TrainingRun", "mb", {"stage": "sft", "training": {"batchSize": 8, "microBatchSize": 4}}),
    ("TrainingRun", "ep", {"stage": "sft", "parallelism": {"nodes": 2, "procsPerNode": 2, "ep": 4, "dpShard": 2}}),
    ("ModelDeployment", "rep", {"source": "r", "replicas": {"min": 0, "max": 2}}),
]


@pytest.mark.parametrize("kind, name, spec, words", REFUSED, ids=[f"{k}-{n[:10]}" for k, n, *_ in REFUSED])
def test_validate_and_the_crd_refuse_the_same_names_and_cross_field_mistakes(kind, name, spec, words):
    from flashops.api.spec import SpecError, parse_object

    crd_words, _, spec_words = words.partition("|")
    doc = _obj(kind, name, spec)
    crd_errors = VALIDATORS[kind].errors(doc)
    assert crd_errors and any(crd_words in e for e in crd_errors), crd_errors
    with pytest.raises(SpecError) as e:
        parse_object(doc)
    assert (spec_words or crd_words) in str(e.value)


@pytest.mark.parametrize("kind, name, spec", ACCEPTED, ids=[f"{k}-{n[:10]}" for k, n, _ in ACCEPTED])
def test_validate_and_the_crd_accept_the_same_boundary_cases(kind, name, spec):
    from flashops.api.spec import parse_object

    doc = _obj(kind, name, spec)
    assert VALIDATORS[kind].errors(doc) == []
    assert VALIDATORS[kind].errors(parse_object(doc).to_dict()) == []


def test_pipeline_stages_are_a_list_map_keyed_by_name():
    """Issue 17 item 2: an atomic list makes `kubectl apply --server-side` conflict on .spec.stages after a
    client-side apply; a list map merges stage by stage. Map keys must be required, as the server demands."""
    stages = crds.crd("TrainingPipeline")["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"]["stages"]
    assert stages["x-kubernetes-list-type"] == "map" and stages["x-kubernetes-list-map-keys"] == ["name"]
    assert "name" in stages["items"]["required"]
    assert stages["items"]["properties"]["name"]["maxLength"] == 63 and stages["maxItems"] >= 4
