"""The spec API: round trips, examples, and errors that name file, object, field, value and fix."""
from pathlib import Path

import pytest
import yaml

from flashops.api import spec as S
from flashops.api.spec import SpecError, load_file, load_text

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))

RUN = """
apiVersion: flashops.dev/v1alpha1
kind: TrainingRun
metadata: {name: pretrain-a}
spec:
  stage: %s
"""


def one_error(text: str, source: str = "quickstart.yaml") -> str:
    with pytest.raises(SpecError) as e:
        load_text(text, source=source)
    assert len(e.value.problems) == 1, e.value.problems
    return e.value.problems[0]


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_every_example_validates_and_round_trips(path):
    objs = load_file(path)
    assert objs
    for obj in objs:
        again = S.parse_object(yaml.safe_load(yaml.safe_dump(obj.to_dict())))
        assert again == obj
        assert again.to_dict() == obj.to_dict()


def test_round_trip_keeps_camel_case_and_defaults():
    (run,) = load_text(RUN % "rl" + "  rl: {algorithm: gspo, groupSize: 8}\n")
    d = run.to_dict()
    assert d["spec"]["rl"]["groupSize"] == 8 and d["spec"]["rl"]["algorithm"] == "gspo"
    assert d["spec"]["backoffLimit"] == 3 and "group_size" not in str(d)
    # issue 16: FiberPO's C- < C+ by default (0.25 / 0.15 at delta 0.4); GSPO's eps from its paper
    assert run.spec.rl.c_plus_value == pytest.approx(0.25) and run.spec.rl.c_minus_value == pytest.approx(0.15)
    assert run.spec.rl.policy_loss_kwargs() == {"eps": 3e-4, "eps_high": 4e-4}
    # the curriculum as published by default; the old boolean form still reads (as {enabled: ...})
    assert d["spec"]["rl"]["curriculum"] == {"enabled": True, "profile": True, "profileRollouts": 10, "dropSolved": True,
                                             "dropUnsolved": False}
    for old, enabled in (("true", True), ("false", False)):
        (r,) = load_text(RUN % "rl" + f"  rl: {{curriculum: {old}}}\n")
        assert r.spec.rl.curriculum.enabled is enabled and r.spec.rl.curriculum.profile
    (r,) = load_text(RUN % "rl" + "  rl: {curriculum: {profileRollouts: 4, dropSolved: false}}\n")
    assert r.spec.rl.curriculum.profile_rollouts == 4 and not r.spec.rl.curriculum.drop_solved


def test_misspelt_stage_message_has_the_documented_shape():
    msg = one_error(RUN % "pretrian")
    assert msg == "quickstart.yaml: TrainingRun/pretrain-a: spec.stage: 'pretrian' is not one of pretrain, sft, dpo, rl"


def test_stage_inside_a_pipeline_names_the_full_path():
    text = """
apiVersion: flashops.dev/v1alpha1
kind: TrainingPipeline
metadata: {name: p}
spec:
  stages:
    - {name: a, spec: {stage: pretrain}}
    - {name: b, spec: {stage: dpo, dpo: {beta: -1}}}
"""
    msg = one_error(text, "p.yaml")
    assert msg.startswith("p.yaml: TrainingPipeline/p: spec.stages[1].spec.dpo.beta: -1 ")
    assert "greater than 0" in msg


@pytest.mark.parametrize(
    "body, expected",
    [
        ("  trainig: {steps: 3}\n", "spec.trainig: unknown field; did you mean 'training'?"),
        ("  rl: {algoritm: fiberpo}\n", "spec.rl.algoritm: unknown field; did you mean 'algorithm'?"),
        ("  rl: {algorithm: ppo}\n", "spec.rl.algorithm: 'ppo' is not one of fiberpo, grpo, gspo"),
        ("  rl: {cPlus: 0.3, cMinus: 0.3}\n", "cPlus 0.3 + cMinus 0.3 must equal delta 0.4"),
        ("  rl: {curriculum: {profileRollouts: 0}}\n", "spec.rl.curriculum.profileRollouts: 0 "),
        ("  model: {preset: joyai-huge}\n", "spec.model.preset: 'joyai-huge' is not one of joyai-flash-debug"),
        ("  data: {uri: 'http://x/y'}\n", "spec.data.uri: 'http://x/y' has no supported scheme"),
        ("  parallelism: {procsPerNode: 3, ep: 2}\n", "ep 2 does not divide the world size 3"),
        ("  training: {batchSize: 8, microBatchSize: 3}\n", "batchSize 8 is not a multiple of microBatchSize 3"),
        # unequal shares of the global batch would leave FSDP's collectives waiting on a rank with fewer micro-batches
        ("  parallelism: {procsPerNode: 3}\n",
         "spec: training.batchSize = 8 sequences a step do not split evenly over the world size 3 (parallelism.nodes "
         "x procsPerNode): use a multiple of 3"),
        ("  rl: {groupSize: 4, promptsPerStep: 3}\n  parallelism: {nodes: 2, procsPerNode: 4}\n",
         "spec: rl.groupSize x rl.promptsPerStep = 12 sequences a step do not split evenly over the world size 8"),
        ("  qat: {mode: int4, groupSize: 48}\n", "spec.qat.groupSize: 48 is not a power of two"),
        ("  initFrom: 'Not A Name'\n", "spec.initFrom: 'Not A Name' is neither a checkpoint URI"),
    ],
)
def test_bad_values_name_field_value_and_fix(body, expected):
    stage = "rl" if "rl:" in body else "pretrain"
    msg = one_error(RUN % stage + body)
    assert msg.startswith("quickstart.yaml: TrainingRun/pretrain-a: ")
    assert expected in msg


def test_kind_api_version_and_name_errors():
    assert "kind: 'TrainJob' is not one of TrainingRun, TrainingPipeline, ModelDeployment" in one_error(
        "apiVersion: flashops.dev/v1alpha1\nkind: TrainJob\nmetadata: {name: a}\nspec: {}\n")
    assert "apiVersion: 'flashops.dev/v1' is not flashops.dev/v1alpha1" in one_error(
        (RUN % "sft").replace("v1alpha1", "v1"))
    assert "metadata.name: 'Bad_Name' is not a valid name" in one_error((RUN % "sft").replace("pretrain-a", "Bad_Name"))


def test_deployment_constraints():
    base = "apiVersion: flashops.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {name: d}\nspec:\n  source: r\n"
    assert "spec.speculative.mtpTokens: 4 is not a number of draft tokens: use 0 (off) to 3, or auto" in one_error(base + "  speculative: {mtpTokens: 4}\n")
    assert "min 3 is larger than max 1" in one_error(base + "  replicas: {min: 3, max: 1}\n")
    (d,) = load_text(base + "  replicas: {min: 0, max: 1}\n")
    assert d.spec.replicas.min == 0


def test_multi_document_errors_are_all_reported():
    text = (RUN % "pretrian") + "---\n" + (RUN % "sft").replace("pretrain-a", "ok") + "---\n" + (RUN % "dop").replace("pretrain-a", "b")
    with pytest.raises(SpecError) as e:
        load_text(text, "m.yaml")
    assert [p.split(":")[1].strip() for p in e.value.problems] == ["TrainingRun/pretrain-a", "TrainingRun/b"]


def test_invalid_yaml_names_line():
    with pytest.raises(SpecError, match=r"x.yaml: not valid YAML \(line 2"):
        load_text("a: 1\n  b: : 2\n", "x.yaml")


def test_pipeline_stage_run_wires_previous_checkpoint():
    (p,) = load_file(Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml")[:1]
    first = S.pipeline_stage_run(p, 0, None)
    second = S.pipeline_stage_run(p, 1, "file:///store/runs/quickstart-pretrain/step-200")
    assert first.name == "quickstart-pretrain" and first.spec.init_from is None
    assert second.name == "quickstart-sft" and second.spec.init_from.endswith("step-200")
    assert second.metadata.labels["flashops.dev/pipeline"] == "quickstart"
    assert p.spec.stages[1].spec.init_from is None  # the pipeline itself is not mutated


def test_spec_hash_is_stable_and_sensitive():
    (a,) = load_text(RUN % "sft")
    (b,) = load_text(RUN % "sft" + "  training: {steps: 21}\n")
    assert a.spec_hash() == load_text(RUN % "sft")[0].spec_hash()
    assert a.spec_hash() != b.spec_hash() and a.spec_hash().startswith("sha256:")
