"""The child a ModelDeployment becomes: a KServe InferenceService with a custom predictor container.

    from flashops.operator.inference import build_inference_service
    isvc = build_inference_service(deployment, "s3://flashops/checkpoints/default/quickstart-rl/step-20", config)

Built with the kserve SDK models (`kserve.models.V1beta1*`; importing them does not import torch, it does
import the rest of the kserve package, so this module imports kserve only inside the builder).

The predictor runs `python -m flashops.serving --model URI`. The model is fetched by flashops.storage
inside the container, NOT by KServe's storage initializer: that initializer takes the S3 endpoint and TLS
from service-account annotations and defaults TLS on, which is how MinIO set-ups usually break. Here the
endpoint, TLS flag and credentials Secret go to the container explicitly (see children.resolve_s3).

`spec.runtime: vllm` (issue 14) renders a different predictor: `predictor.model` with modelFormat huggingface on
KServe's own ClusterServingRuntime `kserve-huggingfaceserver` (config.vllm_runtime), `--backend=vllm` and the vLLM
engine flags below, the export as `storageUri`. KServe's huggingfaceserver adds vLLM's whole argument parser to
its own (vllm/utils.py: make_arg_parser), so every engine flag passes through; it serves the OpenAI routes at
/openai/v1/... under `--model_name={{.Name}}`, the InferenceService's name, which is the deployment's name: the
same URLs and model name as the flashops runtime. Here KServe's storage initializer downloads the model, so S3
settings come from the predictor's ServiceAccount (config.serving_service_account, made by the chart with an
annotated Secret: docs/serving.md). tests/fixtures/vllm_cli_options.yaml holds the vLLM option names the flags
are checked against.
"""
from __future__ import annotations

import json
from typing import Any

from flashops.api import spec as S
from flashops.api.pipeline import export_variant
from flashops.operator import children as C
from flashops.operator.children import (
    CA_DIR, LABEL_MANAGED_BY, child_labels, owner_references, resolve_s3, resources, serialize, storage_env, _k8s,
)
from flashops.operator.config import OperatorConfig

INFERENCESERVICE = ("serving.kserve.io/v1beta1", "inferenceservices", "InferenceService")
PREDICTOR_PORT = 8080
MODEL_URI_ANNOTATION = "flashops.dev/model-uri"  # the model the InferenceService serves (the gate's "current")


def isvc_name(deployment: S.ModelDeployment) -> str:
    return deployment.name


def predictor_env(deployment: S.ModelDeployment, model_uri: str, config: OperatorConfig) -> list[dict[str, Any]]:
    spec = deployment.spec
    s3 = resolve_s3(spec.storage, config, [model_uri])
    env = [
        {"name": "FLASHOPS_DEPLOYMENT", "value": deployment.name},
        *storage_env(s3),
    ]
    return env


def predictor_args(deployment: S.ModelDeployment, model_uri: str, mtp_tokens: int | None = None) -> list[str]:
    """The predictor's command line (`python -m flashops.serving --help`): the model is served under the
    deployment's name, so clients call it by the name they applied. `mtp_tokens`: the k that
    `speculative.mtpTokens: auto` resolved to (flashops.api.promotion.choose_mtp_tokens); 0 when not given."""
    spec = deployment.spec
    k = spec.speculative.mtp_tokens
    k = (mtp_tokens or 0) if k == S.MTP_AUTO else k
    args = ["--model", model_uri, "--name", deployment.name, "--quantization", spec.quantization,
            "--mtp-tokens", str(k), "--max-concurrency", str(spec.max_concurrency),
            "--port", str(PREDICTOR_PORT)]
    return args + (["--thinking"] if spec.thinking else [])


VLLM_MODEL_FORMAT = "huggingface"  # what kserve-huggingfaceserver's supportedModelFormats names
# The export's INT4 experts are compressed-tensors (pack-quantized, symmetric int4, group 64): vLLM reads the method
# from config.json's quantization_config; naming it as well makes a mismatching export fail at load, loudly.
VLLM_QUANTIZATION = {"none": None, "int4": "compressed-tensors"}
# KServe's huggingfaceserver turns vLLM's --dtype auto into float16 on GPUs (its __main__.py); the model trains
# and is served in bfloat16 (fp16's range overflows in the MoE), so the dtype is always named.
VLLM_DTYPE = "bfloat16"


def vllm_args(deployment: S.ModelDeployment) -> list[str]:
    """The arguments appended to kserve-huggingfaceserver's `--model_name=<name>`: the backend and vLLM's engine
    flags, each `--flag=value` (one list item per flag, so a JSON value needs no shell quoting)."""
    spec = deployment.spec
    parallel = spec.parallelism or S.ServingParallelismSpec()
    args = ["--backend=vllm", f"--dtype={VLLM_DTYPE}", f"--tensor-parallel-size={parallel.tensor}",
            f"--max-num-seqs={spec.max_concurrency}"]
    if parallel.expert:
        args.append("--enable-expert-parallel")
    if VLLM_QUANTIZATION[spec.quantization]:
        args.append(f"--quantization={VLLM_QUANTIZATION[spec.quantization]}")
    if spec.speculative.mtp_tokens:  # vLLM's SpeculativeConfig: num_speculative_tokens > 0, so k = 0 means no flag
        config = {"method": "mtp", "num_speculative_tokens": spec.speculative.mtp_tokens}
        args.append("--speculative-config=" + json.dumps(config, separators=(",", ":")))
    return args


def _vllm_predictor(deployment: S.ModelDeployment, model_uri: str, config: OperatorConfig):
    from kserve.models import V1beta1ModelFormat, V1beta1ModelSpec, V1beta1PredictorSpec

    spec = deployment.spec
    if "://" in model_uri and not model_uri.startswith(S.VLLM_STORAGE_SCHEMES):  # a bare name: `flashops render`
        raise C.InvalidObject(
            f"spec.source: the model resolved to {model_uri}, which KServe's storage initializer cannot download "
            f"(it reads {', '.join(S.VLLM_STORAGE_SCHEMES)}): export the model to an s3:// store, or use runtime: flashops")
    res = resources(spec.resources)
    res.setdefault("limits", {})["nvidia.com/gpu"] = str(spec.gpus)
    model = V1beta1ModelSpec(
        model_format=V1beta1ModelFormat(name=VLLM_MODEL_FORMAT), runtime=config.vllm_runtime,
        storage_uri=export_variant(model_uri, spec.quantization), args=vllm_args(deployment),
        resources=_k8s("V1ResourceRequirements", res))
    return V1beta1PredictorSpec(
        min_replicas=spec.replicas.min, max_replicas=spec.replicas.max,
        canary_traffic_percent=spec.canary_traffic_percent, container_concurrency=spec.max_concurrency,
        service_account_name=config.serving_service_account if model_uri.startswith("s3://") else None,
        model=model)


def build_inference_service(deployment: S.ModelDeployment, model_uri: str, config: OperatorConfig,
                            mtp_tokens: int | None = None) -> dict[str, Any]:
    """minReplicas may be 0 (scale to zero); canaryTrafficPercent routes that share to the newest revision (KServe:
    when the predictor changes, the new revision gets canaryTrafficPercent and the last rolled-out one the rest).
    `mtp_tokens`: what speculative.mtpTokens: auto resolved to (flashops.operator.rollout)."""
    from kserve.models import V1beta1PredictorSpec
    from kubernetes import client as k

    spec = deployment.spec
    if spec.runtime == "vllm":
        return _isvc(deployment, model_uri, _vllm_predictor(deployment, model_uri, config))
    res = resources(spec.resources)
    s3 = resolve_s3(spec.storage, config, [model_uri])
    ca = s3.ca_bundle_secret if s3 else None
    container = k.V1Container(
        name="kserve-container",  # KServe's name for the model server container of a custom predictor
        image=spec.image or config.image,
        command=["python", "-m", "flashops.serving"],
        args=predictor_args(deployment, model_uri, mtp_tokens),
        env=[_k8s("V1EnvVar", e) for e in predictor_env(deployment, model_uri, config)],
        ports=[k.V1ContainerPort(container_port=PREDICTOR_PORT, protocol="TCP")],
        resources=_k8s("V1ResourceRequirements", res) if res else None,
        readiness_probe=k.V1Probe(http_get=k.V1HTTPGetAction(path="/v1/models", port=PREDICTOR_PORT)),
        volume_mounts=[k.V1VolumeMount(name="s3-ca", mount_path=CA_DIR, read_only=True)] if ca else None,
    )
    predictor = V1beta1PredictorSpec(
        min_replicas=spec.replicas.min, max_replicas=spec.replicas.max,
        canary_traffic_percent=spec.canary_traffic_percent,
        container_concurrency=spec.max_concurrency,  # Knative queues (then 429s) beyond what the model serves at once
        containers=[container],
        volumes=[k.V1Volume(name="s3-ca", secret=k.V1SecretVolumeSource(secret_name=ca))] if ca else None,
    )
    return _isvc(deployment, model_uri, predictor)


def _isvc(deployment: S.ModelDeployment, model_uri: str, predictor: Any) -> dict[str, Any]:
    from kserve.models import V1beta1InferenceService, V1beta1InferenceServiceSpec
    from kubernetes import client as k

    labels = child_labels(deployment)
    isvc = V1beta1InferenceService(
        api_version=INFERENCESERVICE[0], kind=INFERENCESERVICE[2],
        metadata=k.V1ObjectMeta(
            name=isvc_name(deployment), namespace=deployment.metadata.namespace, labels=labels,
            annotations={"serving.kserve.io/deploymentMode": "Serverless", MODEL_URI_ANNOTATION: model_uri,
                         "flashops.dev/runtime": deployment.spec.runtime},
            owner_references=[_k8s("V1OwnerReference", r) for r in owner_references(deployment)] or None,
        ),
        spec=V1beta1InferenceServiceSpec(predictor=predictor),
    )
    out = serialize(isvc)
    model = out["spec"]["predictor"].get("model")
    if model is not None and not model.get("name"):
        del model["name"]  # the SDK's default ''; KServe names the model container itself
    return out


__all__ = ["INFERENCESERVICE", "LABEL_MANAGED_BY", "MODEL_URI_ANNOTATION", "build_inference_service", "isvc_name",
           "predictor_args", "predictor_env", "vllm_args"]
