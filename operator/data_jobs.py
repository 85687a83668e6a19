"""`flashops data prepare` on a cluster: one Indexed Job whose pods take disjoint source shards.

    from flashops.operator.data_jobs import prepare_job
    job = prepare_job("c4-v1", "s3://raw/c4/", "s3://prep/c4-v1", workers=8, config=OperatorConfig.from_env())

Pod i runs `flashops data prepare --input ... --output ... --workers N` with `--worker` from
JOB_COMPLETION_INDEX (Kubernetes sets it in Indexed Jobs) and `--finalize-when-done`: pod 0, once its own
shards are tokenized, waits for the others' `parts/*.json` and writes the manifest and the lineage record.
A failed pod is retried by the Job and skips the source shards it already finished. The S3 and lineage
settings are the ones the operator gives trainer pods (children.storage_env / lineage_env).
"""
from __future__ import annotations

import re
from typing import Any

from flashops.operator.children import InvalidObject, lineage_env, resolve_s3, storage_env
from flashops.operator.config import OperatorConfig

_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,51}[a-z0-9])?$")  # an RFC 1035 label, room for the pod suffixes


def prepare_command(input_uri: str, output_uri: str, workers: int, stage: str, shard_tokens: int | None) -> list[str]:
    cmd = ["flashops", "data", "prepare", "--input", input_uri, "--output", output_uri, "--stage", stage,
           "--workers", str(workers), "--finalize-when-done"]
    return cmd + (["--shard-tokens", str(shard_tokens)] if shard_tokens else [])


def prepare_job(name: str, input_uri: str, output_uri: str, workers: int, config: OperatorConfig, *,
                stage: str = "pretrain", namespace: str = "default", shard_tokens: int | None = None,
                image: str | None = None, cpu: str | None = None, memory: str | None = None) -> dict[str, Any]:
    if not _NAME.match(name):
        raise InvalidObject(f"job name {name!r}: use lowercase letters, digits and '-', starting with a letter "
                            "(at most 53 characters), e.g. prepare-c4-v1")
    if workers < 1:
        raise InvalidObject(f"workers {workers}: use at least 1")
    s3 = resolve_s3(None, config, [input_uri, output_uri], field="FLASHOPS_S3_ENDPOINT")
    env = [*storage_env(s3), *lineage_env(config, None)]
    volumes, mounts = [], []
    if s3 and s3.ca_bundle_secret:
        from flashops.operator.children import CA_DIR

        volumes.append({"name": "s3-ca", "secret": {"secretName": s3.ca_bundle_secret}})
        mounts.append({"name": "s3-ca", "mountPath": CA_DIR, "readOnly": True})
    requests = {k: v for k, v in (("cpu", cpu), ("memory", memory)) if v}
    container = {"name": "prepare", "image": image or config.image,
                 "command": prepare_command(input_uri, output_uri, workers, stage, shard_tokens),
                 "env": env}  # Kubernetes sets JOB_COMPLETION_INDEX in each pod of an Indexed Job: the --worker
    if mounts:
        container["volumeMounts"] = mounts
    if requests:
        container["resources"] = {"requests": requests, "limits": dict(requests)}
    pod = {"restartPolicy": "Never", "containers": [container]}
    if volumes:
        pod["volumes"] = volumes
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace,
                     "labels": {"app.kubernetes.io/managed-by": "flashops", "flashops.dev/prepare": name}},
        "spec": {"completionMode": "Indexed", "completions": workers, "parallelism": workers, "backoffLimit": 3 * workers,
                 "template": {"metadata": {"labels": {"flashops.dev/prepare": name}}, "spec": pod}},
    }
