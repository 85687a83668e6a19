"""The real kopf operator against the Kubernetes API emulator: objects go in with the real kubectl, the test
plays the Kubeflow and KServe controllers by writing their children's status, and the flashops objects'
status must follow. Every generated child is also checked against the upstream CRD schemas."""
from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from flashops.api.crdschema import CRDValidator
from fixtures.k8s import GV, ISVCS, JOBS, PYTORCHJOBS, TRAINJOBS, condition, job_condition, state, wait_state

pytestmark = pytest.mark.k8s
REPO = Path(__file__).resolve().parents[2]
CRDS = REPO / "tests" / "fixtures" / "crds"
VALIDATORS = {
    "PyTorchJob": CRDS / "kubeflow.org_pytorchjobs.yaml",
    "TrainJob": CRDS / "trainer.kubeflow.org_trainjobs.yaml",
    "InferenceService": CRDS / "serving.kserve.io_inferenceservices.yaml",
}


def assert_valid(obj: dict) -> None:
    assert CRDValidator.from_file(VALIDATORS[obj["kind"]]).errors(obj) == []


def event_reasons(k8s, name: str) -> list[str]:
    """The reasons of the Events posted about object `name`, oldest first (what `kubectl describe` lists)."""
    events = [e for e in k8s.list("v1", "events") if e["involvedObject"]["name"] == name]
    return [e["reason"] for e in sorted(events, key=lambda e: int(e["metadata"]["resourceVersion"]))]


def save_checkpoint(store_root: Path, run: str, step: int) -> str:
    """A real checkpoint in the real store (what the trainer leaves behind before it dies)."""
    import torch

    from flashops.storage import open_store

    return open_store(f"file://{store_root}").save_checkpoint(run, step, {"w": torch.full((4,), float(step))}).uri


def test_kubectl_apply_creates_pytorchjob_and_status_follows_it(k8s, start_operator, tmp_path):
    op = start_operator()
    out = k8s.kubectl("apply", "--validate=false", "-f", str(REPO / "examples" / "pretrain.yaml")).stdout
    assert "trainingrun.flashops.dev/pretrain-debug created" in out

    run = wait_state(k8s, "trainingruns", "pretrain-debug", "Pending")
    assert condition(run, "Accepted")["status"] == "True"
    assert condition(run, "Pending")["reason"] == "JobSubmitted"
    assert run["status"]["observedGeneration"] == run["metadata"]["generation"]
    job = k8s.get(*PYTORCHJOBS, "pretrain-debug")
    assert_valid(job)
    owner = job["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("TrainingRun", run["metadata"]["uid"], True)
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    assert pod["containers"][0]["command"][:5] == ["torchrun", "--nnodes", "1", "--nproc-per-node", "1"]
    assert pod["containers"][0]["command"][-4:] == ["-m", "flashops.trainers", "--spec", "/etc/flashops/spec.yaml"]
    # the spec the trainer reads: the same run, with the checkpoint store pinned for every attempt
    cm = k8s.get("v1", "configmaps", "pretrain-debug-spec")
    trainer_spec = yaml.safe_load(cm["data"]["spec.yaml"])
    assert trainer_spec["metadata"]["name"] == "pretrain-debug"
    assert trainer_spec["spec"]["checkpoint"]["uri"] == f"file://{tmp_path}/store/default"
    assert trainer_spec["spec"]["training"] == run["spec"]["training"] | trainer_spec["spec"]["training"]

    job_condition(k8s, "pretrain-debug", "Created", "PyTorchJobCreated")
    job_condition(k8s, "pretrain-debug", "Running", "PyTorchJobRunning", "pods are running")
    run = wait_state(k8s, "trainingruns", "pretrain-debug", "Running")
    assert condition(run, "Running")["message"] == "pods are running"
    assert condition(run, "Pending")["status"] == "False"

    ckpt = save_checkpoint(tmp_path / "store" / "default", "pretrain-debug", 50)
    job_condition(k8s, "pretrain-debug", "Succeeded", "PyTorchJobSucceeded", "job succeeded")
    run = wait_state(k8s, "trainingruns", "pretrain-debug", "Succeeded")
    assert run["status"]["latestCheckpoint"] == ckpt
    assert run["status"]["completionTime"]
    table = k8s.kubectl("get", "trainingruns").stdout
    assert "pretrain-debug" in table and "Succeeded" in table and "pretrain" in table
    assert len(k8s.list(*PYTORCHJOBS)) == 1


@pytest.mark.slow
def test_failures_retry_from_latest_checkpoint_up_to_backoff_limit_across_restarts(k8s, start_operator, tmp_path):
    doc = yaml.safe_load((REPO / "examples" / "sft.yaml").read_text())
    doc["metadata"]["name"] = "sft-retry"
    doc["spec"]["backoffLimit"] = 2
    op = start_operator()
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(doc))
    wait_state(k8s, "trainingruns", "sft-retry", "Pending")

    ckpt = save_checkpoint(tmp_path / "store" / "default", "sft-retry", 10)
    job_condition(k8s, "sft-retry", "Failed", "PyTorchJobFailed", "pod OOMKilled")
    retry = k8s.wait_for(lambda: k8s.find(*PYTORCHJOBS, "sft-retry-retry1"), message="the first retry's job")
    assert_valid(retry)
    run = k8s.get(GV, "trainingruns", "sft-retry")
    assert run["status"]["retries"] == 1
    assert run["status"]["resumedFrom"] == ckpt == run["status"]["latestCheckpoint"]
    assert "pod OOMKilled" in condition(run, "Pending")["message"] and ckpt in condition(run, "Pending")["message"]
    k8s.wait_for(lambda: k8s.find(*PYTORCHJOBS, "sft-retry") is None, message="the failed attempt to be removed")

    # The operator restarts: the spent retry is in status, the next child is not duplicated.
    op.stop()
    ckpt2 = save_checkpoint(tmp_path / "store" / "default", "sft-retry", 20)
    job_condition(k8s, "sft-retry-retry1", "Failed", "PyTorchJobFailed", "node lost")
    op = start_operator()
    k8s.wait_for(lambda: k8s.find(*PYTORCHJOBS, "sft-retry-retry2"), message="the second retry's job")
    run = k8s.get(GV, "trainingruns", "sft-retry")
    assert run["status"]["retries"] == 2 and run["status"]["resumedFrom"] == ckpt2

    op.stop()
    op = start_operator()  # a restart with nothing to do changes nothing
    job_condition(k8s, "sft-retry-retry2", "Failed", "PyTorchJobFailed", "node lost again")
    run = wait_state(k8s, "trainingruns", "sft-retry", "Failed")
    assert condition(run, "Failed")["reason"] == "BackoffLimitExceeded"
    assert "all 2 retries used" in condition(run, "Failed")["message"]
    assert run["status"]["retries"] == 2
    assert [j["metadata"]["name"] for j in k8s.list(*PYTORCHJOBS)] == ["sft-retry-retry2"]
    created = [o for o in k8s.api.objects(plural="pytorchjobs")]
    assert len(created) == 1


def test_suspend_stops_the_child_and_resume_restarts_it(k8s, start_operator):
    start_operator()
    k8s.kubectl("apply", "--validate=false", "-f", str(REPO / "examples" / "dpo.yaml"))
    name = yaml.safe_load((REPO / "examples" / "dpo.yaml").read_text())["metadata"]["name"]
    wait_state(k8s, "trainingruns", name, "Pending")
    k8s.kubectl("patch", "trainingrun", name, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    run = wait_state(k8s, "trainingruns", name, "Suspended")
    assert "spec.suspend: false" in condition(run, "Suspended")["message"]
    assert k8s.get(*PYTORCHJOBS, name)["spec"]["runPolicy"]["suspend"] is True
    k8s.kubectl("patch", "trainingrun", name, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    k8s.wait_for(lambda: k8s.get(*PYTORCHJOBS, name)["spec"]["runPolicy"]["suspend"] is False, message="resume")
    wait_state(k8s, "trainingruns", name, "Pending")
    assert len(k8s.list(*PYTORCHJOBS)) == 1


def test_trainjob_runtime(k8s, start_operator):
    start_operator(runtime="trainjob")
    k8s.kubectl("apply", "--validate=false", "-f", str(REPO / "examples" / "rl.yaml"))
    name = yaml.safe_load((REPO / "examples" / "rl.yaml").read_text())["metadata"]["name"]
    job = k8s.wait_for(lambda: k8s.find(*TRAINJOBS, name), message="the TrainJob")
    assert_valid(job)
    assert job["spec"]["runtimeRef"]["name"] == "torch-distributed"
    assert job["spec"]["trainer"]["command"][:1] == ["torchrun"]
    k8s.patch(*TRAINJOBS, name, {"status": {"jobsStatus": [{"name": "node", "active": 1, "ready": 1, "failed": 0,
                                                            "succeeded": 0, "suspended": 0}]}}, subresource="status")
    wait_state(k8s, "trainingruns", name, "Running")
    job_condition(k8s, name, "Complete", "JobsCompleted", "TrainJob completed", kind=TRAINJOBS)
    wait_state(k8s, "trainingruns", name, "Succeeded")


@pytest.mark.slow
def test_quickstart_pipeline_advances_stage_by_stage_then_deploys(k8s, start_operator, tmp_path):
    start_operator()
    docs = [d for d in yaml.safe_load_all((REPO / "examples" / "quickstart.yaml").read_text()) if d]
    for doc in docs:  # no lineage here to read evaluations from: the gate has its own tests (test_promotion.py)
        doc["spec"].pop("promotion", None) if doc["kind"] == "ModelDeployment" else None
    out = k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump_all(docs)).stdout
    assert "trainingpipeline.flashops.dev/quickstart created" in out
    stages = ["pretrain", "sft", "eval-sft", "dpo", "rl", "eval-rl"]
    previous_ckpt = None
    for i, stage in enumerate(stages):
        run_name = f"quickstart-{stage}"
        if stage.startswith("eval-"):  # an eval stage: a Job on the previous checkpoint; the test plays its controller
            job = k8s.wait_for(lambda: k8s.find(*JOBS, run_name), message=f"{run_name}'s Job")
            cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
            assert cmd[:2] == ["flashops", "eval"] and cmd[cmd.index("--model") + 1] == previous_ckpt
            k8s.patch(*JOBS, run_name, {"status": {"conditions": [{"type": "Complete", "status": "True"}]}},
                      subresource="status")
            continue
        run = k8s.wait_for(lambda: k8s.find(GV, "trainingruns", run_name), message=f"stage {stage}'s TrainingRun")
        assert run["metadata"]["ownerReferences"][0]["kind"] == "TrainingPipeline"
        assert run["spec"].get("initFrom") == previous_ckpt
        # later stages do not exist yet
        assert all(k8s.find(GV, "trainingruns", f"quickstart-{s}") is None for s in stages[i + 1:])
        assert all(k8s.find(*JOBS, f"quickstart-{s}") is None for s in stages[i + 1:])
        k8s.wait_for(lambda: k8s.find(*PYTORCHJOBS, run_name), message=f"{run_name}'s PyTorchJob")
        job_condition(k8s, run_name, "Running", "PyTorchJobRunning")
        pipeline = k8s.wait_for(lambda: (p := k8s.get(GV, "trainingpipelines", "quickstart")) and
                                state(p) == "Running" and p["status"]["stage"] == stage and p)
        assert [s["state"] for s in pipeline["status"]["stages"]][: i + 1] == ["Succeeded"] * i + ["Running"]
        assert f"stage {i + 1}/6 ({stage})" in condition(pipeline, "Running")["message"]
        if i == 0:  # the deployment waits for the pipeline
            md = wait_state(k8s, "modeldeployments", "quickstart-chat", "Pending")
            assert condition(md, "Pending")["reason"] == "WaitingForModel"
            assert not k8s.list(*ISVCS)
            k8s.wait_for(lambda: "PromotionBlocked" in event_reasons(k8s, "quickstart-chat"), message="PromotionBlocked")
        previous_ckpt = save_checkpoint(tmp_path / "store" / "default", run_name, 10 * (i + 1))
        job_condition(k8s, run_name, "Succeeded", "PyTorchJobSucceeded")
        wait_state(k8s, "trainingruns", run_name, "Succeeded")

    pipeline = wait_state(k8s, "trainingpipelines", "quickstart", "Succeeded")
    assert pipeline["status"]["latestCheckpoint"] == previous_ckpt
    assert [s["checkpoint"] for s in pipeline["status"]["stages"]][-1] == previous_ckpt  # eval-rl's: what it evaluated
    assert "all 6 stages succeeded" in condition(pipeline, "Succeeded")["message"]
    k8s.wait_for(lambda: event_reasons(k8s, "quickstart")[-1:] == ["Succeeded"], message="the Succeeded event")
    reasons = event_reasons(k8s, "quickstart")
    assert reasons.count("StageAdvanced") == 6 and reasons.count("Created") == 6  # one per stage, no repeats
    assert "quickstart" in k8s.kubectl("get", "trainingpipelines").stdout

    isvc = k8s.wait_for(lambda: k8s.find(*ISVCS, "quickstart-chat"), message="the InferenceService")
    assert_valid(isvc)
    container = isvc["spec"]["predictor"]["containers"][0]
    # the final stage's export, named after the pipeline (issue 13: one export_location for flashops run and the cluster)
    assert container["args"][:2] == ["--model", previous_ckpt.replace("/runs/quickstart-rl/", "/models/quickstart/")]
    assert pipeline["status"]["modelUri"] == container["args"][1]
    assert container["args"][2:4] == ["--name", "quickstart-chat"]
    assert isvc["spec"]["predictor"]["minReplicas"] == 1 and isvc["spec"]["predictor"]["maxReplicas"] == 2
    k8s.patch(*ISVCS, "quickstart-chat", {"status": {"url": "http://quickstart-chat.default.example.com", "conditions": [
        {"type": "PredictorReady", "status": "True"}, {"type": "Ready", "status": "True"}]}}, subresource="status")
    md = wait_state(k8s, "modeldeployments", "quickstart-chat", "Running")
    assert condition(md, "Ready")["status"] == "True"
    assert md["status"]["url"] == "http://quickstart-chat.default.example.com"


def test_model_deployment_from_uri_with_scale_to_zero_and_canary(k8s, start_operator):
    start_operator(s3_endpoint="https://minio.example:9000")
    doc = yaml.safe_load((REPO / "examples" / "deployment.yaml").read_text())
    doc["spec"]["source"] = "s3://models/joyai/v1"
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(doc))
    isvc = k8s.wait_for(lambda: k8s.find(*ISVCS, doc["metadata"]["name"]), message="the InferenceService")
    assert_valid(isvc)
    pred = isvc["spec"]["predictor"]
    assert (pred["minReplicas"], pred["maxReplicas"], pred["canaryTrafficPercent"]) == (0, 2, 10)
    env = {e["name"]: e.get("value", e.get("valueFrom")) for e in pred["containers"][0]["env"]}
    assert env["FLASHOPS_S3_ENDPOINT"] == "minio.example:9000" and env["FLASHOPS_S3_SECURE"] == "true"
    assert env["AWS_SECRET_ACCESS_KEY"] == {"secretKeyRef": {"name": "flashops-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert "storageUri" not in str(pred)  # KServe's storage initializer (and its TLS default) is never involved
    k8s.patch(*ISVCS, doc["metadata"]["name"], {"status": {"conditions": [
        {"type": "PredictorReady", "status": "False", "reason": "RevisionMissing", "message": "image pull back-off"},
        {"type": "Ready", "status": "False", "reason": "RevisionMissing"}]}}, subresource="status")
    md = wait_state(k8s, "modeldeployments", doc["metadata"]["name"], "Failed")
    assert "image pull back-off" in condition(md, "Failed")["message"]
    assert condition(md, "Ready")["status"] == "False"


def test_deletion_removes_children_and_releases_the_finalizer(k8s, start_operator):
    start_operator()
    k8s.kubectl("apply", "--validate=false", "-f", str(REPO / "examples" / "pretrain.yaml"))
    wait_state(k8s, "trainingruns", "pretrain-debug", "Pending")
    run = k8s.get(GV, "trainingruns", "pretrain-debug")
    assert "flashops.dev/finalizer" in run["metadata"]["finalizers"]
    k8s.kubectl("delete", "trainingrun", "pretrain-debug", "--wait=true", "--timeout=20s")
    assert k8s.find(GV, "trainingruns", "pretrain-debug") is None
    assert k8s.list(*PYTORCHJOBS) == []
    assert k8s.find("v1", "configmaps", "pretrain-debug-spec") is None


def test_pipeline_deletion_cascades_to_stage_runs_and_their_jobs(k8s, start_operator):
    start_operator()
    k8s.kubectl("apply", "--validate=false", "-f", str(REPO / "examples" / "quickstart.yaml"))
    k8s.wait_for(lambda: k8s.find(*PYTORCHJOBS, "quickstart-pretrain"), message="the first stage's job")
    k8s.kubectl("delete", "-f", str(REPO / "examples" / "quickstart.yaml"), "--wait=true", "--timeout=20s")
    k8s.wait_for(lambda: not k8s.list(GV, "trainingruns") and not k8s.list(*PYTORCHJOBS), message="cleanup")
    assert k8s.list(GV, "trainingpipelines") == [] and k8s.list(GV, "modeldeployments") == []


def test_kubectl_apply_refuses_what_the_crd_cel_rules_forbid(k8s):
    """Issue 17 item 3: names a child would refuse and cross-field mistakes are refused by `kubectl apply`
    itself (CEL rules in our CRD), before the operator ever sees them."""
    bad_name = {"apiVersion": GV, "kind": "TrainingRun", "metadata": {"name": "9lives"}, "spec": {"stage": "sft"}}
    bad_band = {"apiVersion": GV, "kind": "TrainingRun", "metadata": {"name": "bad-band"},
                "spec": {"stage": "rl", "rl": {"delta": 0.4, "cPlus": 0.3, "cMinus": 0.3}}}
    for doc, words in ((bad_name, "RFC 1035 label"), (bad_band, "cPlus + cMinus must equal delta")):
        out = k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(doc), check=False)
        assert out.returncode != 0 and words in out.stderr, out.stderr
    assert k8s.list(GV, "trainingruns") == []


def test_invalid_objects_get_a_failed_condition_not_a_crash_loop(k8s, start_operator):
    op = start_operator()
    no_endpoint = {"apiVersion": GV, "kind": "TrainingRun", "metadata": {"name": "no-endpoint"},
                   "spec": {"stage": "pretrain", "checkpoint": {"uri": "s3://ckpts/x"},
                            "storage": {"endpoint": "minio:9000"}}}
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(no_endpoint))
    run = wait_state(k8s, "trainingruns", "no-endpoint", "Failed")
    assert condition(run, "Accepted")["status"] == "False"
    assert condition(run, "Failed")["reason"] == "InvalidSpec"
    assert "does not say whether TLS is on" in condition(run, "Failed")["message"]
    assert k8s.list(*PYTORCHJOBS) == []
    before = op.operator.reconciles
    time.sleep(1.5)
    assert op.operator.reconciles - before <= 2  # PermanentError: no retry loop

    # The fix is an edit: the same object then runs.
    k8s.kubectl("patch", "trainingrun", "no-endpoint", "--type=merge", "-p",
                '{"spec":{"storage":{"endpoint":"http://minio:9000"}}}')
    run = wait_state(k8s, "trainingruns", "no-endpoint", "Pending")
    assert condition(run, "Accepted")["status"] == "True"


def test_missing_kubeflow_crd_says_so_in_status(k8s_bare, monkeypatch, tmp_path):
    from fixtures.k8s import flashops_crds

    from flashops.operator.config import OperatorConfig
    from flashops.operator.main import start_in_thread

    k8s_bare.install_crds(flashops_crds())
    op = start_in_thread(OperatorConfig(checkpoint_root=f"file://{tmp_path}", retry_seconds=0.5, resync_seconds=30))
    try:
        k8s_bare.kubectl("apply", "--validate=false", "-f", str(REPO / "examples" / "pretrain.yaml"))
        run = wait_state(k8s_bare, "trainingruns", "pretrain-debug", "Pending")
        k8s_bare.wait_for(lambda: condition(k8s_bare.get(GV, "trainingruns", "pretrain-debug"), "Pending")["reason"]
                          == "ChildKindMissing", message="ChildKindMissing")
        msg = condition(k8s_bare.get(GV, "trainingruns", "pretrain-debug"), "Pending")["message"]
        assert "does not serve pytorchjobs.kubeflow.org" in msg and "spec.runtime: trainjob" in msg
    finally:
        op.stop()


def test_lineage_records_the_run_and_an_unreachable_lineage_never_blocks_training(k8s, start_operator, tmp_path):
    from flashops.api.lineage import open_lineage

    db = f"sqlite:///{tmp_path}/lineage.db"
    op = start_operator(lineage_url=db)
    k8s.kubectl("apply", "--validate=false", "-f", str(REPO / "examples" / "pretrain.yaml"))
    run = k8s.wait_for(lambda: (r := k8s.find(GV, "trainingruns", "pretrain-debug")) and
                       (r.get("status") or {}).get("lineageId") and r, message="a lineage id")
    job = k8s.get(*PYTORCHJOBS, "pretrain-debug")
    env = {e["name"]: e for e in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FLASHOPS_LINEAGE_RUN_ID"]["value"] == run["status"]["lineageId"]
    assert env["FLASHOPS_LINEAGE_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    job_condition(k8s, "pretrain-debug", "Succeeded", "PyTorchJobSucceeded")
    run = k8s.wait_for(lambda: (r := k8s.get(GV, "trainingruns", "pretrain-debug"))["status"].get("lineageClosed") and r)
    node = open_lineage(db).node(f"lineage:{run['status']['lineageId']}")
    assert "succeeded" in str(node).lower()
    # a failed run keeps why in lineage: the condition's reason and message (what the dashboard shows)
    failing = yaml.safe_load((REPO / "examples" / "pretrain.yaml").read_text())
    failing["metadata"]["name"], failing["spec"]["backoffLimit"] = "pretrain-fails", 0
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(failing))
    wait_state(k8s, "trainingruns", "pretrain-fails", "Pending")
    job_condition(k8s, "pretrain-fails", "Failed", "PyTorchJobFailed", "pod OOMKilled")
    run = k8s.wait_for(lambda: (r := k8s.get(GV, "trainingruns", "pretrain-fails"))["status"].get("lineageClosed") and r,
                       message="the failed run's lineage record closed")
    recorded = open_lineage(db).node(f"lineage:{run['status']['lineageId']}")["node"]
    assert recorded["status"] == "failed" and recorded["metrics"]["retries"] == 0
    assert recorded["metrics"]["reason"] == condition(run, "Failed")["reason"]
    assert "pod OOMKilled" in recorded["metrics"]["message"]
    op.stop()

    start_operator(lineage_url="http://127.0.0.1:9/")  # nothing listens there
    doc = yaml.safe_load((REPO / "examples" / "sft.yaml").read_text())
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(doc))
    name = doc["metadata"]["name"]
    k8s.wait_for(lambda: k8s.find(*PYTORCHJOBS, name), message="the job despite lineage being down")
    run = wait_state(k8s, "trainingruns", name, "Pending")
    assert "lineage not recorded yet" in condition(run, "Pending")["message"]


def test_every_write_of_the_operator_uses_the_field_manager_flashops(k8s, start_operator):
    """Issue 17 item 7: the operator wrote as `OpenAPI-Generator` (the kubernetes client's User-Agent) and kopf
    as `kopf`. Now its children, its status writes and kopf's finalizer/annotation writes all say `flashops`."""
    start_operator()
    k8s.kubectl("apply", "--validate=false", "-f", str(REPO / "examples" / "pretrain.yaml"))
    wait_state(k8s, "trainingruns", "pretrain-debug", "Pending")
    job_condition(k8s, "pretrain-debug", "Running", "PyTorchJobRunning")
    run = wait_state(k8s, "trainingruns", "pretrain-debug", "Running")

    def managers(obj: dict) -> dict[str | None, set[str]]:
        out: dict[str | None, set[str]] = {}
        for e in obj["metadata"].get("managedFields") or []:
            out.setdefault(e.get("subresource"), set()).add(e["manager"])
        return out

    assert managers(k8s.get("v1", "configmaps", "pretrain-debug-spec")) == {None: {"flashops"}}
    assert managers(k8s.get(*PYTORCHJOBS, "pretrain-debug"))[None] == {"flashops"}
    run_managers = managers(run)
    assert run_managers["status"] == {"flashops"} and "python-httpx" not in run_managers["status"]
    assert run_managers[None] == {"kubectl-client-side-apply", "flashops"}  # the user's apply; kopf's finalizer


def test_a_live_spec_edit_applies_on_the_next_attempt_and_status_says_so(k8s, start_operator):
    """Issue 17 item 8: an edit of a running run bumped observedGeneration while the pods kept reading the old
    spec ConfigMap, and nothing said so. Now status.specChange (and the condition, and an Event) say the edit
    applies from the next attempt, and the retry trains with it."""
    doc = yaml.safe_load((REPO / "examples" / "sft.yaml").read_text())
    doc["metadata"]["name"] = "sft-edit"
    doc["spec"]["backoffLimit"] = 1
    start_operator()
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=yaml.safe_dump(doc))
    k8s.wait_for(lambda: k8s.find(*PYTORCHJOBS, "sft-edit"), message="the first attempt")
    job_condition(k8s, "sft-edit", "Running", "PyTorchJobRunning")
    run = wait_state(k8s, "trainingruns", "sft-edit", "Running")
    assert run["status"]["appliedGeneration"] == 1 and "specChange" not in run["status"]
    steps = yaml.safe_load(k8s.get("v1", "configmaps", "sft-edit-spec")["data"]["spec.yaml"])["spec"]["training"]["steps"]

    k8s.kubectl("patch", "trainingrun", "sft-edit", "--type=merge", "-p", '{"spec":{"training":{"steps":%d}}}' % (steps + 7))
    run = k8s.wait_for(lambda: (r := k8s.get(GV, "trainingruns", "sft-edit"))["status"].get("specChange") and r,
                       message="status.specChange")
    assert run["status"]["observedGeneration"] == 2
    assert "generation 2" in run["status"]["specChange"] and "next attempt" in run["status"]["specChange"]
    assert "keeps training with generation 1" in condition(run, "Running")["message"]
    cm = yaml.safe_load(k8s.get("v1", "configmaps", "sft-edit-spec")["data"]["spec.yaml"])
    assert cm["spec"]["training"]["steps"] == steps  # the running attempt's spec is untouched
    assert "SpecChangeDeferred" in event_reasons(k8s, "sft-edit")

    job_condition(k8s, "sft-edit", "Failed", "PyTorchJobFailed", "node lost")
    k8s.wait_for(lambda: k8s.find(*PYTORCHJOBS, "sft-edit-retry1"), message="the retry")
    run = k8s.wait_for(lambda: (r := k8s.get(GV, "trainingruns", "sft-edit"))["status"].get("appliedGeneration") == 2
                       and r, message="the retry to take generation 2")
    assert "specChange" not in run["status"]
    cm = yaml.safe_load(k8s.get("v1", "configmaps", "sft-edit-spec")["data"]["spec.yaml"])
    assert cm["spec"]["training"]["steps"] == steps + 7
