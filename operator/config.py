"""The operator's settings: one frozen dataclass, read from FLASHOPS_* environment variables.

    FLASHOPS_RUNTIME=trainjob FLASHOPS_S3_ENDPOINT=http://minio:9000 flashops operator

Every setting a child manifest depends on lives here, so `flashops render` and the running operator
produce the same children from the same environment. Bad values fail at start-up, naming the variable.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import Mapping

RUNTIMES = ("pytorchjob", "trainjob")
DEFAULT_IMAGE = "ghcr.io/flashops/flashops:0.1.0"


class ConfigError(ValueError):
    """A bad operator setting; the message names the environment variable, the value and the fix."""


@dataclass(frozen=True)
class OperatorConfig:
    runtime: str = "pytorchjob"  # Kubeflow runtime when a TrainingRun does not say: pytorchjob | trainjob
    image: str = DEFAULT_IMAGE  # trainer and predictor image (a TrainingRun/ModelDeployment may override)
    trainjob_runtime: str = "torch-distributed"  # the ClusterTrainingRuntime TrainJobs refer to
    checkpoint_root: str = "s3://flashops/checkpoints"  # checkpoint.uri default: <root>/<namespace>
    s3_endpoint: str | None = None  # host:port or URL of the object store, passed to every pod
    s3_secure: bool | None = None  # TLS to the store; None: from the endpoint URL (https:// -> on)
    s3_region: str = "us-east-1"
    s3_secret: str = "flashops-s3"  # Secret with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
    s3_ca_bundle_secret: str | None = None  # Secret with key ca.crt, mounted into pods for a private CA
    lineage_url: str | None = None  # lineage HTTP service; None: lineage is not recorded by the operator
    lineage_secret: str | None = "flashops-lineage"  # Secret with key `token` for the lineage API
    namespace: str | None = None  # watch one namespace; None: the whole cluster
    resync_seconds: float = 60.0  # level-triggered safety net: every object is reconciled this often
    retry_seconds: float = 10.0  # delay before retrying after a temporary error (API, lineage, store)
    workers: int = 16  # threads for handlers (each reconcile blocks on API calls)
    # runtime: vllm deployments (docs/serving.md): the ClusterServingRuntime they name, and the ServiceAccount
    # whose Secret gives KServe's storage initializer the S3 endpoint and credentials (the chart makes both names)
    vllm_runtime: str = "kserve-huggingfaceserver"
    serving_service_account: str | None = "flashops-serving"

    ENV = {
        "runtime": "FLASHOPS_RUNTIME", "image": "FLASHOPS_IMAGE", "trainjob_runtime": "FLASHOPS_TRAINJOB_RUNTIME",
        "checkpoint_root": "FLASHOPS_CHECKPOINT_ROOT", "s3_endpoint": "FLASHOPS_S3_ENDPOINT",
        "s3_secure": "FLASHOPS_S3_SECURE", "s3_region": "FLASHOPS_S3_REGION", "s3_secret": "FLASHOPS_S3_SECRET",
        "s3_ca_bundle_secret": "FLASHOPS_S3_CA_BUNDLE_SECRET",
        "lineage_url": "FLASHOPS_LINEAGE_URL", "lineage_secret": "FLASHOPS_LINEAGE_SECRET",
        "namespace": "FLASHOPS_WATCH_NAMESPACE", "resync_seconds": "FLASHOPS_RESYNC_SECONDS",
        "retry_seconds": "FLASHOPS_RETRY_SECONDS", "workers": "FLASHOPS_OPERATOR_WORKERS",
        "vllm_runtime": "FLASHOPS_VLLM_RUNTIME", "serving_service_account": "FLASHOPS_SERVING_SERVICE_ACCOUNT",
    }

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"FLASHOPS_RUNTIME={self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        if not self.checkpoint_root.startswith(("s3://", "file://")):
            raise ConfigError(f"FLASHOPS_CHECKPOINT_ROOT={self.checkpoint_root!r} is not a store URI: "
                              "use s3://bucket/prefix or file:///dir")
        if self.s3_endpoint and self.s3_secure is not None and self.s3_endpoint.startswith(("http://", "https://")):
            if self.s3_endpoint.startswith("https://") != self.s3_secure:
                raise ConfigError(f"FLASHOPS_S3_ENDPOINT={self.s3_endpoint!r} contradicts FLASHOPS_S3_SECURE="
                                  f"{str(self.s3_secure).lower()}: drop FLASHOPS_S3_SECURE or fix the URL scheme")
        if self.resync_seconds <= 0 or self.retry_seconds <= 0 or self.workers < 1:
            raise ConfigError("FLASHOPS_RESYNC_SECONDS and FLASHOPS_RETRY_SECONDS must be > 0, "
                              "FLASHOPS_OPERATOR_WORKERS >= 1")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "OperatorConfig":
        env = os.environ if env is None else env
        values: dict = {}
        types = {f.name: f.type for f in fields(cls)}
        for name, var in cls.ENV.items():
            raw = env.get(var)
            if raw is None or raw == "":
                continue
            t = str(types[name])
            try:
                if "bool" in t:
                    if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                        raise ValueError
                    values[name] = raw.lower() in ("true", "1", "yes")
                elif "float" in t:
                    values[name] = float(raw)
                elif "int" in t:
                    values[name] = int(raw)
                else:
                    values[name] = raw
            except ValueError:
                raise ConfigError(f"{var}={raw!r} is not a valid {t.split('|')[0].strip()}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
