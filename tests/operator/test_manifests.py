"""The children the operator builds, without a cluster: every one validates against the real upstream CRD
schema, and object-store settings that would break at run time are rejected up front with the fix."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flashops.api import spec as S
from flashops.api.crdschema import CRDValidator
from flashops.operator import children as C
from flashops.operator.config import ConfigError, OperatorConfig
from flashops.operator.inference import build_inference_service
from flashops.operator.render import render_objects
from flashops.operator.status import Phase, conditions_for, inference_service_phase, pytorchjob_phase, trainjob_phase

REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "tests" / "fixtures" / "crds"
SCHEMAS = {"PyTorchJob": "kubeflow.org_pytorchjobs.yaml", "TrainJob": "trainer.kubeflow.org_trainjobs.yaml",
           "InferenceService": "serving.kserve.io_inferenceservices.yaml"}
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CONFIG = OperatorConfig(s3_endpoint="http://minio.minio:9000")


def validate(doc: dict) -> list[str]:
    if doc["kind"] in SCHEMAS:
        return CRDValidator.from_file(CRDS / SCHEMAS[doc["kind"]]).errors(doc)
    if doc["kind"] in S.KINDS:
        from flashops.api.crds import crd

        return CRDValidator(crd(doc["kind"])).errors(doc)
    if doc["kind"] == "Job":  # a pipeline's eval stage: the upstream batch/v1 schema, strict (no unknown fields)
        import kubernetes_validate

        try:
            kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as err:
            return [str(err)]
        return []
    assert doc["kind"] == "ConfigMap"
    return []


@pytest.mark.parametrize("runtime", ["pytorchjob", "trainjob"])
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_every_child_of_every_example_validates_against_upstream_crds(example, runtime):
    docs = render_objects(S.load_file(example), OperatorConfig(s3_endpoint="http://minio:9000", runtime=runtime),
                          model_uri="s3://models/joyai/1")
    assert docs
    for doc in docs:
        assert validate(doc) == [], f"{doc['kind']}/{doc['metadata']['name']}"
    kinds = {d["kind"] for d in docs}
    if any(o.kind != "ModelDeployment" for o in S.load_file(example)):
        assert ("TrainJob" if runtime == "trainjob" else "PyTorchJob") in kinds


def test_multi_node_pytorchjob_has_workers_resources_and_gpu():
    run = S.parse_object({"apiVersion": S.API_GROUP_VERSION, "kind": "TrainingRun", "metadata": {"name": "big", "uid": "u-1"},
                          "spec": {"stage": "pretrain", "parallelism": {"nodes": 3, "procsPerNode": 8, "ep": 8},
                                   "training": {"batchSize": 48},
                                   "resources": {"cpu": "32", "memory": "256Gi", "gpu": 8}, "suspend": True}})
    run.metadata.namespace = "ml"
    job = C.build_pytorchjob(run, 2, CONFIG)
    assert validate(job) == []
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    assert job["spec"]["nprocPerNode"] == "8" and job["spec"]["runPolicy"] == {"backoffLimit": 0, "suspend": True}
    container = replicas["Worker"]["template"]["spec"]["containers"][0]
    assert container["command"][:5] == ["torchrun", "--nnodes", "3", "--nproc-per-node", "8"]
    assert container["resources"]["limits"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "8"}
    assert "nvidia.com/gpu" not in container["resources"]["requests"]
    assert job["metadata"]["name"] == "big-retry2" and job["metadata"]["labels"][C.LABEL_ATTEMPT] == "2"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "u-1"


def test_trainer_spec_is_the_same_run_with_the_store_pinned():
    run = S.load_file(REPO / "examples" / "sft.yaml")[0]
    run.metadata.namespace = "team-a"
    cm = C.spec_configmap(run, CONFIG)
    back = S.load_text(cm["data"]["spec.yaml"])[0]
    assert back.spec.checkpoint.uri == "s3://flashops/checkpoints/team-a"
    back.spec.checkpoint.uri = None
    assert back.spec == run.spec and back.name == run.name


def _run_with_storage(storage: dict, ckpt: str = "s3://ckpts/x") -> S.TrainingRun:
    return S.parse_object({"apiVersion": S.API_GROUP_VERSION, "kind": "TrainingRun", "metadata": {"name": "r"},
                           "spec": {"stage": "sft", "checkpoint": {"uri": ckpt}, "storage": storage}})


@pytest.mark.parametrize("storage,config,needle", [
    ({}, OperatorConfig(), "no endpoint is set"),
    ({"endpoint": "minio:9000"}, OperatorConfig(), "does not say whether TLS is on"),
    ({"endpoint": "https://minio:9000", "secure": False}, OperatorConfig(), "contradicts the endpoint"),
    ({"endpoint": "ftp://minio:9000"}, OperatorConfig(), "has scheme 'ftp'"),
])
def test_object_store_misconfiguration_is_rejected_with_the_fix(storage, config, needle):
    with pytest.raises(C.InvalidObject, match=needle):
        C.build_job(_run_with_storage(storage), 0, config)


def test_object_store_settings_reach_the_pod_explicitly():
    run = _run_with_storage({"endpoint": "minio:9000", "secure": True, "credentialsSecret": "team-s3",
                             "caBundleSecret": "team-ca"})
    job = C.build_pytorchjob(run, 0, OperatorConfig())
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["FLASHOPS_S3_ENDPOINT"]["value"] == "minio:9000" and env["FLASHOPS_S3_SECURE"]["value"] == "true"
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"] == {"name": "team-s3", "key": "AWS_ACCESS_KEY_ID"}
    assert env["FLASHOPS_S3_CA_BUNDLE"]["value"] == "/etc/flashops/s3-ca/ca.crt"
    assert {"name": "s3-ca", "secret": {"secretName": "team-ca"}} in pod["volumes"]
    # a run that never touches S3 gets no S3 credentials at all
    local = _run_with_storage({}, ckpt="file:///data/ckpts")
    pod = C.build_pytorchjob(local, 0, OperatorConfig())["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert not [e for e in pod["containers"][0]["env"] if e["name"].startswith("AWS_")]


def test_inference_service_predictor():
    md = S.load_file(REPO / "examples" / "deployment.yaml")[0]
    isvc = build_inference_service(md, "s3://models/joyai/3", OperatorConfig(s3_endpoint="http://minio:9000"))
    assert validate(isvc) == []
    pred = isvc["spec"]["predictor"]
    assert pred["containers"][0]["command"] == ["python", "-m", "flashops.serving"]
    args = pred["containers"][0]["args"]
    assert args[:4] == ["--model", "s3://models/joyai/3", "--name", md.name]
    assert args[args.index("--quantization") + 1] == "int4" and args[args.index("--mtp-tokens") + 1] == "3"
    assert "--thinking" not in args
    env = {e["name"]: e.get("value") for e in pred["containers"][0]["env"]}
    assert env["FLASHOPS_S3_SECURE"] == "false"
    with pytest.raises(C.InvalidObject, match="no endpoint"):
        build_inference_service(md, "s3://models/joyai/3", OperatorConfig())


def test_status_from_children():
    job = {"kind": "PyTorchJob", "metadata": {"name": "j"}, "spec": {}, "status": {"conditions": [
        {"type": "Created", "status": "True"}, {"type": "Running", "status": "False"},
        {"type": "Failed", "status": "True", "reason": "PyTorchJobFailed", "message": "OOMKilled"}]}}
    assert pytorchjob_phase(job) == Phase("Failed", "PyTorchJobFailed", "OOMKilled")
    job["status"]["conditions"] = [{"type": "Created", "status": "True"}]
    assert pytorchjob_phase(job).reason == "JobCreated"
    tj = {"kind": "TrainJob", "metadata": {"name": "t"}, "spec": {}, "status": {"jobsStatus": [{"name": "node", "active": 2}]}}
    assert trainjob_phase(tj).state == "Running"
    tj["status"]["conditions"] = [{"type": "Complete", "status": "True", "reason": "JobsCompleted"}]
    assert trainjob_phase(tj).state == "Succeeded"
    isvc = {"metadata": {"name": "m"}, "status": {"url": "http://m", "conditions": [{"type": "Ready", "status": "True"}]}}
    assert inference_service_phase(isvc)[1] is True


def test_condition_times_move_only_on_transitions():
    first = conditions_for(Phase("Pending", "JobSubmitted", "waiting"), now="2026-01-01T00:00:00Z")
    again = conditions_for(Phase("Pending", "JobCreated", "created"), previous=first, now="2026-01-01T00:05:00Z")
    assert {c["type"]: c["lastTransitionTime"] for c in again}["Pending"] == "2026-01-01T00:00:00Z"
    running = conditions_for(Phase("Running", "JobRunning", "up"), previous=again, now="2026-01-01T00:09:00Z")
    by_type = {c["type"]: c for c in running}
    assert by_type["Running"]["lastTransitionTime"] == by_type["Pending"]["lastTransitionTime"] == "2026-01-01T00:09:00Z"
    assert by_type["Accepted"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    assert [c["type"] for c in running] == ["Accepted", "Pending", "Running", "Succeeded", "Failed", "Suspended"]


def test_operator_config_from_env_names_the_variable():
    cfg = OperatorConfig.from_env({"FLASHOPS_RUNTIME": "trainjob", "FLASHOPS_S3_SECURE": "true",
                                   "FLASHOPS_S3_ENDPOINT": "minio:9000", "FLASHOPS_RESYNC_SECONDS": "5"})
    assert (cfg.runtime, cfg.s3_secure, cfg.resync_seconds) == ("trainjob", True, 5.0)
    with pytest.raises(ConfigError, match="FLASHOPS_RUNTIME='mpijob'"):
        OperatorConfig.from_env({"FLASHOPS_RUNTIME": "mpijob"})
    with pytest.raises(ConfigError, match="FLASHOPS_S3_SECURE='maybe'"):
        OperatorConfig.from_env({"FLASHOPS_S3_SECURE": "maybe"})
    with pytest.raises(ConfigError, match="contradicts"):
        OperatorConfig.from_env({"FLASHOPS_S3_ENDPOINT": "https://s3:443", "FLASHOPS_S3_SECURE": "false"})


def test_render_cli_prints_valid_children_and_exits_2_on_bad_input(tmp_path):
    flashops = REPO / ".venv" / "bin" / "flashops"
    out = subprocess.run([str(flashops), "render", "-f", str(REPO / "examples" / "quickstart.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert [d["kind"] for d in docs].count("PyTorchJob") == 4 and docs[-1]["kind"] == "InferenceService"
    assert all(validate(d) == [] for d in docs)
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: flashops.dev/v1alpha1\nkind: TrainingRun\nmetadata: {name: x}\nspec: {stage: pretrian}\n")
    out = subprocess.run([str(flashops), "render", "-f", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "pretrian" in out.stderr


def test_the_operator_never_imports_torch():
    code = ("import sys\n"
            "import flashops.operator.handlers, flashops.operator.main, flashops.cli.operator_commands\n"
            "from flashops.api.spec import load_file\n"
            "from flashops.operator.config import OperatorConfig\n"
            "from flashops.operator.render import render_objects\n"
            "from flashops.operator.integrations import Integrations\n"
            "import glob\n"
            "for f in glob.glob('examples/*.yaml'):\n"
            "    for rt in ('pytorchjob', 'trainjob'):\n"
            "        render_objects(load_file(f), OperatorConfig(s3_endpoint='http://m:9000', runtime=rt))\n"
            "Integrations(OperatorConfig(checkpoint_root='file:///tmp/x')).latest_checkpoint('file:///tmp/x', 'r')\n"
            "import operator; assert hasattr(operator, 'itemgetter'), 'the stdlib operator module is shadowed'\n"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
