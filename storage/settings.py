"""Where the S3 endpoint and credentials come from, first match wins per field:

1. keyword arguments to `open_store(uri, **overrides)`
2. environment: FLASHOPS_S3_ENDPOINT (or AWS_ENDPOINT_URL), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
   FLASHOPS_S3_REGION / AWS_REGION / AWS_DEFAULT_REGION, FLASHOPS_S3_SECURE, FLASHOPS_S3_CA_BUNDLE, FLASHOPS_S3_CREATE_BUCKET,
   FLASHOPS_S3_SIGNED_PAYLOAD
3. a mounted Kubernetes Secret directory, $FLASHOPS_S3_SECRET_DIR (default /var/run/secrets/flashops/s3),
   one file per key: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, endpoint, region, ca.crt
4. the `s3:` block of $FLASHOPS_HOME/config.yaml (FLASHOPS_HOME defaults to ~/.flashops):
       s3: {endpoint: http://minio:9000, access_key: ..., secret_key: ..., region: us-east-1}

The endpoint may carry its scheme (`http://host:9000` means TLS off); without one, FLASHOPS_S3_SECURE
decides (default on). Torch-free.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from flashops.api.home import flashops_home  # noqa: F401 - the one default, re-exported for storage callers
from flashops.storage.errors import StoreConfigError

DEFAULT_SECRET_DIR = "/var/run/secrets/flashops/s3"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}




def _parse_bool(name: str, value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    v = str(value).strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise StoreConfigError(f"{name}={value!r} is not a boolean: use true or false")


@dataclass(frozen=True)
class S3Settings:
    endpoint: str = "s3.amazonaws.com"     # host[:port], no scheme
    secure: bool = True
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    region: str | None = None
    ca_bundle: str | None = None
    create_bucket: bool = False             # create a missing bucket instead of failing
    max_attempts: int = 4                   # for temporary errors only
    backoff_seconds: float = 0.25           # first wait; doubles each attempt
    parallelism: int = 4                    # concurrent parts per object (up and down)
    part_size: int = 16 * 1024 * 1024       # a streamed upload's first part size; also the single-PUT limit
    # Sign each request body's sha256 (SigV4), a second hash of every byte on the client and a third on the
    # server. Off: UNSIGNED-PAYLOAD, and the manifest's sha256 of every object (checked on every load) is
    # the integrity check. See storage/_minio_compat.py, workaround 3.
    signed_payload: bool = False

    @property
    def url(self) -> str:
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"


def _secret_dir_values() -> dict[str, str]:
    d = Path(os.environ.get("FLASHOPS_S3_SECRET_DIR", DEFAULT_SECRET_DIR))
    out: dict[str, str] = {}
    if not d.is_dir():
        return out
    names = {
        "access_key": ("AWS_ACCESS_KEY_ID", "accesskey", "access_key"),
        "secret_key": ("AWS_SECRET_ACCESS_KEY", "secretkey", "secret_key"),
        "endpoint": ("endpoint", "FLASHOPS_S3_ENDPOINT"),
        "region": ("region", "AWS_REGION"),
    }
    for key, candidates in names.items():
        for c in candidates:
            if (d / c).is_file():
                out[key] = (d / c).read_text().strip()
                break
    if (d / "ca.crt").is_file():
        out["ca_bundle"] = str(d / "ca.crt")
    return out


def _config_file_values() -> dict[str, object]:
    path = flashops_home() / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise StoreConfigError(f"{path}: not valid YAML ({e}); fix or remove the file") from e
    s3 = data.get("s3") if isinstance(data, dict) else None
    if s3 is None:
        return {}
    if not isinstance(s3, dict):
        raise StoreConfigError(f"{path}: `s3` must be a mapping like {{endpoint: http://minio:9000}}, got {s3!r}")
    return s3


def resolve_s3_settings(**overrides) -> S3Settings:
    env = os.environ
    layers: list[dict] = [
        {k: v for k, v in overrides.items() if v is not None},
        {
            k: v
            for k, v in {
                "endpoint": env.get("FLASHOPS_S3_ENDPOINT") or env.get("AWS_ENDPOINT_URL"),
                "access_key": env.get("AWS_ACCESS_KEY_ID"),
                "secret_key": env.get("AWS_SECRET_ACCESS_KEY"),
                "region": env.get("FLASHOPS_S3_REGION") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION"),
                "secure": env.get("FLASHOPS_S3_SECURE"),
                "ca_bundle": env.get("FLASHOPS_S3_CA_BUNDLE"),
                "create_bucket": env.get("FLASHOPS_S3_CREATE_BUCKET"),
                "signed_payload": env.get("FLASHOPS_S3_SIGNED_PAYLOAD"),
            }.items()
            if v
        },
        _secret_dir_values(),
        _config_file_values(),
    ]
    merged: dict[str, object] = {}
    for layer in layers:
        for k, v in layer.items():
            merged.setdefault(k, v)
    unknown = set(merged) - set(S3Settings.__dataclass_fields__)
    if unknown:
        raise StoreConfigError(
            f"unknown S3 setting(s) {sorted(unknown)}; known: {sorted(S3Settings.__dataclass_fields__)}"
        )

    endpoint = str(merged.pop("endpoint", S3Settings.endpoint))
    secure_explicit = merged.pop("secure", None)
    secure = True if secure_explicit is None else _parse_bool("FLASHOPS_S3_SECURE", secure_explicit)
    if "://" in endpoint:
        parts = urlsplit(endpoint)
        if parts.scheme not in ("http", "https"):
            raise StoreConfigError(
                f"FLASHOPS_S3_ENDPOINT={endpoint!r}: scheme must be http or https (e.g. http://minio:9000)"
            )
        if parts.path not in ("", "/"):
            raise StoreConfigError(
                f"FLASHOPS_S3_ENDPOINT={endpoint!r}: an endpoint has no path; put the prefix in the URI "
                f"instead (s3://bucket{parts.path.rstrip('/')})"
            )
        url_secure = parts.scheme == "https"
        if secure_explicit is not None and secure != url_secure:
            raise StoreConfigError(
                f"FLASHOPS_S3_ENDPOINT={endpoint!r} says {parts.scheme} but FLASHOPS_S3_SECURE={secure_explicit!r}: "
                "drop one of them"
            )
        endpoint, secure = parts.netloc, url_secure
    if "create_bucket" in merged:
        merged["create_bucket"] = _parse_bool("FLASHOPS_S3_CREATE_BUCKET", merged["create_bucket"])
    if "signed_payload" in merged:
        merged["signed_payload"] = _parse_bool("FLASHOPS_S3_SIGNED_PAYLOAD", merged["signed_payload"])
    for k in ("max_attempts", "parallelism", "part_size"):
        if k in merged:
            merged[k] = int(merged[k])
            if merged[k] < 1:
                raise StoreConfigError(f"S3 setting {k}={merged[k]} must be >= 1")
    if merged.get("part_size", S3Settings.part_size) < 5 * 1024 * 1024:
        raise StoreConfigError(f"part_size={merged['part_size']} is below the S3 minimum of 5 MiB")
    if ("access_key" in merged) != ("secret_key" in merged):
        have, missing = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")[:: 1 if "access_key" in merged else -1]
        raise StoreConfigError(f"{have} is set but {missing} is not: set both (or neither, for anonymous access)")
    return S3Settings(endpoint=endpoint, secure=secure, **merged)
