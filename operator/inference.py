"""The child a ModelDeployment becomes: a KServe InferenceService with a custom predictor container.

    from flashops.operator.inference import build_inference_service
    isvc = build_inference_service(deployment, "s3://flashops/checkpoints/default/quickstart-rl/step-20", config)

Built with the kserve SDK models (`kserve.models.V1beta1*`; importing them does not import torch, it does
import the rest of the kserve package, so this module imports kserve only inside the builder).

The predictor runs `python -m flashops.serving --model URI`. The model is fetched by flashops.storage
inside the container, NOT by KServe's storage initializer: that initializer takes the S3 endpoint and TLS
from service-account annotations and defaults TLS on, which is how MinIO set-ups usually break. Here the
endpoint, TLS flag and credentials Secret go to the container explicitly (see children.resolve_s3).
"""
from __future__ import annotations

from typing import Any

from flashops.api import spec as S
from flashops.operator.children import (
    CA_DIR, LABEL_MANAGED_BY, child_labels, owner_references, resolve_s3, resources, serialize, storage_env, _k8s,
)
from flashops.operator.config import OperatorConfig

INFERENCESERVICE = ("serving.kserve.io/v1beta1", "inferenceservices", "InferenceService")
PREDICTOR_PORT = 8080


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


def predictor_args(deployment: S.ModelDeployment, model_uri: str) -> list[str]:
    """The predictor's command line (`python -m flashops.serving --help`): the model is served under the
    deployment's name, so clients call it by the name they applied."""
    spec = deployment.spec
    args = ["--model", model_uri, "--name", deployment.name, "--quantization", spec.quantization,
            "--mtp-tokens", str(spec.speculative.mtp_tokens), "--max-concurrency", str(spec.max_concurrency),
            "--port", str(PREDICTOR_PORT)]
    return args + (["--thinking"] if spec.thinking else [])


def build_inference_service(deployment: S.ModelDeployment, model_uri: str, config: OperatorConfig) -> dict[str, Any]:
    """minReplicas may be 0 (scale to zero); canaryTrafficPercent routes that share to the newest revision."""
    from kserve.models import V1beta1InferenceService, V1beta1InferenceServiceSpec, V1beta1PredictorSpec
    from kubernetes import client as k

    spec = deployment.spec
    res = resources(spec.resources)
    s3 = resolve_s3(spec.storage, config, [model_uri])
    ca = s3.ca_bundle_secret if s3 else None
    container = k.V1Container(
        name="kserve-container",  # KServe's name for the model server container of a custom predictor
        image=spec.image or config.image,
        command=["python", "-m", "flashops.serving"],
        args=predictor_args(deployment, model_uri),
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
    labels = child_labels(deployment)
    isvc = V1beta1InferenceService(
        api_version=INFERENCESERVICE[0], kind=INFERENCESERVICE[2],
        metadata=k.V1ObjectMeta(
            name=isvc_name(deployment), namespace=deployment.metadata.namespace, labels=labels,
            annotations={"serving.kserve.io/deploymentMode": "Serverless", "flashops.dev/model-uri": model_uri},
            owner_references=[_k8s("V1OwnerReference", r) for r in owner_references(deployment)] or None,
        ),
        spec=V1beta1InferenceServiceSpec(predictor=predictor),
    )
    return serialize(isvc)


__all__ = ["INFERENCESERVICE", "LABEL_MANAGED_BY", "build_inference_service", "isvc_name", "predictor_args", "predictor_env"]
