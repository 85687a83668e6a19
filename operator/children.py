"""The children a TrainingRun becomes: a ConfigMap holding its spec and a Kubeflow job that runs the trainer.

    from flashops.operator.children import training_children
    cm, job = training_children(run, attempt=0, config=OperatorConfig())   # plain dicts, ready to POST

PyTorchJob (Kubeflow training operator v1) is built with the `kubeflow-training` SDK models, TrainJob
(Kubeflow Trainer v2) with the `kubeflow` SDK's `kubeflow_trainer_api` models; both wrap the same pod:
`torchrun --nnodes N --nproc-per-node P -m flashops.trainers --spec /etc/flashops/spec.yaml`, with the
object store and lineage credentials from Secrets and explicit endpoint/TLS settings. Rendezvous details
(node rank, master address) come from the PET_* variables both Kubeflow controllers inject for torchrun.

Each retry is a new child named `<run>-retry<N>` (the first is just `<run>`): a failed child never blocks
its successor, and the name alone says which attempt a job is. The ConfigMap is per run, not per attempt,
so every attempt resumes from the same checkpoint.uri.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import yaml

from flashops.api import spec as S
from flashops.operator.config import OperatorConfig

SPEC_DIR = "/etc/flashops"
SPEC_FILE = "spec.yaml"
CA_DIR = "/etc/flashops/s3-ca"
MANAGER = "flashops-operator"
RUNTIME_PATCH_MANAGER = "flashops.dev/operator"  # TrainJob runtimePatches[].manager: who patched the runtime

LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_OWNER_KIND = "flashops.dev/owner-kind"
LABEL_OWNER = "flashops.dev/owner"
LABEL_ATTEMPT = "flashops.dev/attempt"
INHERITED_LABELS = ("flashops.dev/pipeline", "flashops.dev/stage")

PYTORCHJOB = ("kubeflow.org/v1", "pytorchjobs", "PyTorchJob")
TRAINJOB = ("trainer.kubeflow.org/v1alpha1", "trainjobs", "TrainJob")
CONFIGMAP = ("v1", "configmaps", "ConfigMap")
JOB = ("batch/v1", "jobs", "Job")  # a pipeline's eval stage


class InvalidObject(ValueError):
    """The object parsed, but cannot run as given (e.g. S3 without an endpoint). Names field, value and fix."""


# ---------------------------------------------------------------------------------------------- naming


def child_name(run_name: str, attempt: int) -> str:
    if attempt == 0:
        return run_name
    suffix = f"-retry{attempt}"
    return run_name[: 63 - len(suffix)].rstrip("-") + suffix


def spec_configmap_name(run_name: str) -> str:
    return run_name[:58].rstrip("-") + "-spec"


def job_kind(run: S.TrainingRun, config: OperatorConfig) -> tuple[str, str, str]:
    return TRAINJOB if (run.spec.runtime or config.runtime) == "trainjob" else PYTORCHJOB


def child_labels(owner: S.SpecObject, attempt: int | None = None) -> dict[str, str]:
    labels = {k: v for k, v in owner.metadata.labels.items() if k in INHERITED_LABELS}
    labels.update({LABEL_MANAGED_BY: MANAGER, LABEL_PART_OF: "flashops", LABEL_OWNER_KIND: owner.kind,
                   LABEL_OWNER: owner.name})
    if attempt is not None:
        labels[LABEL_ATTEMPT] = str(attempt)
    return labels


def owner_references(owner: S.SpecObject) -> list[dict[str, Any]]:
    """The controller reference (garbage collection, `kubectl tree`); none without a uid (rendering offline)."""
    if not owner.metadata.uid:
        return []
    return [{"apiVersion": S.API_GROUP_VERSION, "kind": owner.kind, "name": owner.name, "uid": owner.metadata.uid,
             "controller": True, "blockOwnerDeletion": True}]


def checkpoint_uri(run: S.TrainingRun, config: OperatorConfig) -> str:
    """Where this run's checkpoints live; the same for every attempt (that is what makes resume work)."""
    if run.spec.checkpoint.uri:
        return run.spec.checkpoint.uri
    return f"{config.checkpoint_root.rstrip('/')}/{run.metadata.namespace or 'default'}"


# ---------------------------------------------------------------------------------------------- object store


@dataclass(frozen=True)
class S3Access:
    """Everything a pod needs to reach the object store, stated explicitly (no implicit TLS default)."""

    endpoint: str  # host:port, no scheme
    secure: bool
    region: str
    credentials_secret: str
    ca_bundle_secret: str | None = None


def resolve_s3(storage: S.S3AccessSpec | None, config: OperatorConfig, uris: list[str | None],
               field: str = "spec.storage") -> S3Access | None:
    """S3 settings for a pod that touches `uris`; None when nothing is on S3 and no endpoint was asked for.

    KServe's classic MinIO trap is an endpoint given without a scheme while TLS silently defaults to on.
    Here TLS comes from the URL scheme or an explicit `secure`, and a contradiction is an error.
    """
    on_s3 = [u for u in uris if u and u.startswith("s3://")]
    endpoint = (storage.endpoint if storage else None) or config.s3_endpoint
    if not on_s3 and not (storage and storage.endpoint):
        return None
    where = f"{field}.endpoint" if storage and storage.endpoint else "FLASHOPS_S3_ENDPOINT"
    if not endpoint:
        raise InvalidObject(f"{field}.endpoint: {on_s3[0]} is on S3 but no endpoint is set: set {field}.endpoint "
                            "(e.g. http://minio.minio:9000) or FLASHOPS_S3_ENDPOINT on the operator")
    explicit = storage.secure if storage and storage.secure is not None else None
    scheme = urlparse(endpoint).scheme if "://" in endpoint else ""
    if scheme not in ("", "http", "https"):
        raise InvalidObject(f"{where}: {endpoint!r} has scheme {scheme!r}: use http://host:port or https://host:port")
    from_url = {"http": False, "https": True}.get(scheme)
    if explicit is not None and from_url is not None and explicit != from_url:
        raise InvalidObject(f"{field}.secure: {str(explicit).lower()} contradicts the endpoint {endpoint!r}: "
                            f"drop {field}.secure or use {'https' if explicit else 'http'}:// in the endpoint")
    secure = explicit if explicit is not None else from_url if from_url is not None else config.s3_secure
    if secure is None:
        raise InvalidObject(f"{where}: {endpoint!r} does not say whether TLS is on: write http://{endpoint} or "
                            f"https://{endpoint}, or set {field}.secure")
    host = urlparse(endpoint).netloc if scheme else endpoint
    return S3Access(
        endpoint=host.rstrip("/"), secure=secure,
        region=(storage.region if storage else None) or config.s3_region,
        credentials_secret=(storage.credentials_secret if storage else None) or config.s3_secret,
        ca_bundle_secret=(storage.ca_bundle_secret if storage else None) or config.s3_ca_bundle_secret,
    )


def storage_env(s3: S3Access | None) -> list[dict[str, Any]]:
    if s3 is None:
        return []
    env = [
        {"name": "FLASHOPS_S3_ENDPOINT", "value": s3.endpoint},
        {"name": "FLASHOPS_S3_SECURE", "value": "true" if s3.secure else "false"},
        {"name": "AWS_REGION", "value": s3.region},
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": s3.credentials_secret, "key": "AWS_ACCESS_KEY_ID"}}},
        {"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": s3.credentials_secret, "key": "AWS_SECRET_ACCESS_KEY"}}},
    ]
    if s3.ca_bundle_secret:
        env.append({"name": "FLASHOPS_S3_CA_BUNDLE", "value": f"{CA_DIR}/ca.crt"})
    return env


def lineage_env(config: OperatorConfig, lineage_id: str | None) -> list[dict[str, Any]]:
    if not config.lineage_url:
        return []
    env: list[dict[str, Any]] = [{"name": "FLASHOPS_LINEAGE_URL", "value": config.lineage_url}]
    if config.lineage_secret:  # optional: lineage is best-effort and must never keep a pod from starting
        env.append({"name": "FLASHOPS_LINEAGE_TOKEN", "valueFrom": {"secretKeyRef": {
            "name": config.lineage_secret, "key": "token", "optional": True}}})
    if lineage_id:
        env.append({"name": "FLASHOPS_LINEAGE_RUN_ID", "value": str(lineage_id)})
    return env


def resources(spec: S.ResourcesSpec) -> dict[str, Any]:
    req: dict[str, Any] = {}
    if spec.cpu:
        req["cpu"] = spec.cpu
    if spec.memory:
        req["memory"] = spec.memory
    lim = dict(req)
    if spec.gpu:
        lim["nvidia.com/gpu"] = str(spec.gpu)  # quantities are strings on the wire
    return {k: v for k, v in (("requests", req), ("limits", lim)) if v}


# ---------------------------------------------------------------------------------------------- training children


def trainer_spec(run: S.TrainingRun, config: OperatorConfig) -> dict[str, Any]:
    """The TrainingRun the trainer reads from spec.yaml: the user's spec with checkpoint.uri pinned."""
    body = run.model_copy(deep=True)
    body.spec.checkpoint.uri = checkpoint_uri(run, config)
    out = body.to_dict()
    out.pop("status", None)
    out["metadata"] = {k: v for k, v in {"name": run.name, "namespace": run.metadata.namespace,
                                        "labels": dict(run.metadata.labels) or None}.items() if v}
    return out


def trainer_command(run: S.TrainingRun) -> list[str]:
    p = run.spec.parallelism
    return ["torchrun", "--nnodes", str(p.nodes), "--nproc-per-node", str(p.procs_per_node),
            "-m", "flashops.trainers", "--spec", f"{SPEC_DIR}/{SPEC_FILE}"]


def spec_configmap(run: S.TrainingRun, config: OperatorConfig) -> dict[str, Any]:
    from kubernetes import client as k

    cm = k.V1ConfigMap(
        api_version="v1", kind="ConfigMap",
        metadata=k.V1ObjectMeta(name=spec_configmap_name(run.name), namespace=run.metadata.namespace,
                                labels=child_labels(run), owner_references=_k8s_owner_refs(run)),
        data={SPEC_FILE: yaml.safe_dump(trainer_spec(run, config), sort_keys=False)},
    )
    return serialize(cm)


def _pod_parts(run: S.TrainingRun, attempt: int, config: OperatorConfig, lineage_id: str | None):
    """env, volumes, volume mounts, resources for the trainer container (plain dicts)."""
    s3 = resolve_s3(run.spec.storage, config, [checkpoint_uri(run, config), run.spec.init_from,
                                               run.spec.data.uri if run.spec.data else None])
    env = [{"name": "FLASHOPS_RUN_NAME", "value": run.name},
           {"name": "FLASHOPS_ATTEMPT", "value": str(attempt)},
           *storage_env(s3), *lineage_env(config, lineage_id)]
    volumes = [{"name": "flashops-spec", "configMap": {"name": spec_configmap_name(run.name)}},
               {"name": "dshm", "emptyDir": {"medium": "Memory"}}]  # torch workers share tensors through /dev/shm
    mounts = [{"name": "flashops-spec", "mountPath": SPEC_DIR, "readOnly": True},
              {"name": "dshm", "mountPath": "/dev/shm"}]
    if s3 and s3.ca_bundle_secret:
        volumes.append({"name": "s3-ca", "secret": {"secretName": s3.ca_bundle_secret}})
        mounts.append({"name": "s3-ca", "mountPath": CA_DIR, "readOnly": True})
    return env, volumes, mounts, resources(run.spec.resources)


def build_pytorchjob(run: S.TrainingRun, attempt: int, config: OperatorConfig, lineage_id: str | None = None) -> dict[str, Any]:
    """A Kubeflow v1 PyTorchJob: Master (+ Workers for nodes > 1), restartPolicy Never and backoffLimit 0,
    because retries belong to the TrainingRun (counted in its status, resumed from the latest checkpoint)."""
    from kubeflow.training import models as kt
    from kubernetes import client as k

    env, volumes, mounts, res = _pod_parts(run, attempt, config, lineage_id)
    container = k.V1Container(
        name="pytorch",  # the training operator finds the trainer container by this name
        image=run.spec.image or config.image, command=trainer_command(run),
        env=[_k8s("V1EnvVar", e) for e in env], volume_mounts=[_k8s("V1VolumeMount", m) for m in mounts],
        resources=_k8s("V1ResourceRequirements", res) if res else None,
        ports=[k.V1ContainerPort(name="pytorchjob-port", container_port=23456)],
        # the trainer writes why it stopped to /dev/termination-log; if it died before it could, the log's tail
        termination_message_policy="FallbackToLogsOnError",
    )
    labels = child_labels(run, attempt)
    template = k.V1PodTemplateSpec(
        metadata=k.V1ObjectMeta(labels=labels, annotations={"sidecar.istio.io/inject": "false"}),
        spec=k.V1PodSpec(containers=[container], volumes=[_k8s("V1Volume", v) for v in volumes]),
    )
    nodes = run.spec.parallelism.nodes
    replicas = {"Master": kt.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="Never", template=template)}
    if nodes > 1:
        replicas["Worker"] = kt.KubeflowOrgV1ReplicaSpec(replicas=nodes - 1, restart_policy="Never", template=template)
    job = kt.KubeflowOrgV1PyTorchJob(
        api_version=PYTORCHJOB[0], kind=PYTORCHJOB[2],
        metadata=k.V1ObjectMeta(name=child_name(run.name, attempt), namespace=run.metadata.namespace,
                                labels=labels, owner_references=_k8s_owner_refs(run)),
        spec=kt.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(run.spec.parallelism.procs_per_node),
            pytorch_replica_specs=replicas,
            run_policy=kt.KubeflowOrgV1RunPolicy(backoff_limit=0, suspend=run.spec.suspend),
        ),
    )
    return serialize(job)


def build_trainjob(run: S.TrainingRun, attempt: int, config: OperatorConfig, lineage_id: str | None = None) -> dict[str, Any]:
    """A Kubeflow Trainer v2 TrainJob on the `torch-distributed` runtime; the spec volume goes in through
    runtimePatches (the only way a TrainJob adds volumes to the runtime's pods)."""
    from kubeflow_trainer_api import models as tm

    env, volumes, mounts, res = _pod_parts(run, attempt, config, lineage_id)
    labels = child_labels(run, attempt)
    node_pod = tm.TrainerV1alpha1PodTemplatePatch(
        metadata=tm.IoK8sApimachineryPkgApisMetaV1ObjectMeta(labels=labels),
        spec=tm.TrainerV1alpha1PodSpecPatch(
            volumes=[tm.IoK8sApiCoreV1Volume.from_dict(v) for v in volumes],
            containers=[tm.TrainerV1alpha1ContainerPatch(
                name="node", volume_mounts=[tm.IoK8sApiCoreV1VolumeMount.from_dict(m) for m in mounts])],
        ),
    )
    patch = tm.TrainerV1alpha1RuntimePatch(
        manager=RUNTIME_PATCH_MANAGER,
        training_runtime_spec=tm.TrainerV1alpha1TrainingRuntimeSpecPatch(
            template=tm.TrainerV1alpha1JobSetTemplatePatch(spec=tm.TrainerV1alpha1JobSetSpecPatch(replicated_jobs=[
                tm.TrainerV1alpha1ReplicatedJobPatch(name="node", template=tm.TrainerV1alpha1JobTemplatePatch(
                    spec=tm.TrainerV1alpha1JobSpecPatch(template=node_pod)))]))),
    )
    job = tm.TrainerV1alpha1TrainJob(
        api_version=TRAINJOB[0], kind=TRAINJOB[2],
        metadata=tm.IoK8sApimachineryPkgApisMetaV1ObjectMeta.from_dict({
            "name": child_name(run.name, attempt), "namespace": run.metadata.namespace, "labels": labels,
            "ownerReferences": owner_references(run) or None}),
        spec=tm.TrainerV1alpha1TrainJobSpec(
            runtime_ref=tm.TrainerV1alpha1RuntimeRef(name=config.trainjob_runtime),
            suspend=run.spec.suspend,
            trainer=tm.TrainerV1alpha1Trainer(
                image=run.spec.image or config.image, command=trainer_command(run),
                env=[tm.IoK8sApiCoreV1EnvVar.from_dict(e) for e in env],
                num_nodes=run.spec.parallelism.nodes, num_proc_per_node=run.spec.parallelism.procs_per_node,
                resources_per_node=tm.IoK8sApiCoreV1ResourceRequirements.from_dict(res) if res else None),
            runtime_patches=[patch],
        ),
    )
    return _drop_none(job.to_dict())


def build_job(run: S.TrainingRun, attempt: int, config: OperatorConfig, lineage_id: str | None = None) -> dict[str, Any]:
    build = build_trainjob if job_kind(run, config) == TRAINJOB else build_pytorchjob
    return build(run, attempt, config, lineage_id)


def attempt_pod_selector(run_name: str, attempt: int) -> str:
    """The label selector of the pods of one attempt (the job's pod template carries child_labels)."""
    return f"{LABEL_OWNER_KIND}=TrainingRun,{LABEL_OWNER}={run_name},{LABEL_ATTEMPT}={attempt}"


def training_children(run: S.TrainingRun, attempt: int, config: OperatorConfig,
                      lineage_id: str | None = None) -> list[dict[str, Any]]:
    """[ConfigMap, PyTorchJob | TrainJob]: what the operator creates for attempt `attempt` of `run`."""
    return [spec_configmap(run, config), build_job(run, attempt, config, lineage_id)]


# ---------------------------------------------------------------------------------------------- serialization


_API_CLIENT = None


def serialize(model: Any) -> dict[str, Any]:
    """kubernetes/kubeflow-training SDK model -> the JSON dict the API server takes (camelCase, no nulls)."""
    global _API_CLIENT
    if _API_CLIENT is None:
        from kubernetes.client import ApiClient

        _API_CLIENT = ApiClient()
    return _API_CLIENT.sanitize_for_serialization(model)


def _k8s(type_name: str, data: dict[str, Any]) -> Any:
    """A plain dict -> the kubernetes client model (validated by its constructor), via the SDK's deserializer."""
    global _API_CLIENT
    serialize(None)  # make sure the client exists
    return _API_CLIENT._ApiClient__deserialize(data, type_name)  # the SDK has no public dict -> model call


def _k8s_owner_refs(owner: S.SpecObject) -> list[Any] | None:
    refs = owner_references(owner)
    return [_k8s("V1OwnerReference", r) for r in refs] or None


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_none(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------- eval stages


def eval_command(job: Any) -> list[str]:
    """What an eval stage's pod runs: `flashops eval` on the previous stage's checkpoint, recorded in lineage on
    it under the stage's name (flashops.cli.eval_commands; the same code as `flashops run`'s eval stage)."""
    p = job.spec.eval
    cmd = ["flashops", "eval", "--model", job.model or "", "--name", job.stage, "--max-tokens", str(p.max_tokens),
           "--mtp-tokens", str(p.mtp_tokens), "--concurrency", str(p.max_concurrency), "--json"]
    for suite in p.suites:
        cmd += ["--suite", suite]
    return cmd


def build_eval_job(job: Any, config: OperatorConfig, owner: S.SpecObject | None = None) -> dict[str, Any]:
    """A batch/v1 Job for a pipeline's eval stage (flashops.api.pipeline.EvaluationJob): one pod, no torchrun
    (evaluation is one process), the S3 and lineage settings trainer pods get. Raises InvalidObject when the
    stage cannot run as given (S3 without an endpoint)."""
    spec = job.spec
    s3 = resolve_s3(spec.storage, config, [job.model, *spec.eval.suites], field="spec.storage")
    env = [*storage_env(s3), *lineage_env(config, None)]
    volumes, mounts = [], []
    if s3 and s3.ca_bundle_secret:
        volumes.append({"name": "s3-ca", "secret": {"secretName": s3.ca_bundle_secret}})
        mounts.append({"name": "s3-ca", "mountPath": CA_DIR, "readOnly": True})
    container: dict[str, Any] = {"name": "eval", "image": spec.image or config.image, "command": eval_command(job),
                                 "env": env}
    if mounts:
        container["volumeMounts"] = mounts
    res = resources(spec.resources)
    if res:
        container["resources"] = res
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
    if volumes:
        pod["volumes"] = volumes
    labels = {k: v for k, v in job.labels.items() if k in INHERITED_LABELS}
    labels.update({LABEL_MANAGED_BY: MANAGER, LABEL_PART_OF: "flashops"})
    if owner is not None:
        labels.update({LABEL_OWNER_KIND: owner.kind, LABEL_OWNER: owner.name})
    meta: dict[str, Any] = {"name": job.name, "namespace": job.namespace or "default", "labels": labels}
    refs = owner_references(owner) if owner is not None else []
    if refs:
        meta["ownerReferences"] = refs
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
            "spec": {"backoffLimit": spec.backoff_limit,
                     "template": {"metadata": {"labels": dict(labels)}, "spec": pod}}}
