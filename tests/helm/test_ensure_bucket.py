"""The operator's init container (helm/flashops/files/ensure-bucket.py) against a real S3 server:
the script exactly as the chart renders it into the ConfigMap, with the env the chart gives the
container (endpoint pointed at the local seaweedfs instead of the in-cluster MinIO Service).
"""
from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import uuid

import pytest

from fixtures.helm import container_env, find, parse_manifests, template

pytestmark = [pytest.mark.helm, pytest.mark.s3]


def _init_container(objs):
    (deployment,) = find(objs, "Deployment", "flashops-operator")
    pod = deployment["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    script_cm = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "scripts")
    (cm,) = find(objs, "ConfigMap", script_cm)
    assert init["command"] == ["python", "/scripts/ensure-bucket.py"]
    return init, cm["data"]["ensure-bucket.py"]


def run_init(objs, tmp_path, server, secret_key=None, wait="60"):
    init, script = _init_container(objs)
    (tmp_path / "ensure-bucket.py").write_text(script)
    secrets = {"AWS_ACCESS_KEY_ID": server.access_key, "AWS_SECRET_ACCESS_KEY": secret_key or server.secret_key}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FLASHOPS_"))}
    env.update(container_env(init, secrets))
    env["FLASHOPS_S3_ENDPOINT"] = server.endpoint  # the in-cluster Service name does not resolve here
    env["FLASHOPS_S3_WAIT_SECONDS"] = wait
    env["HOME"] = str(tmp_path)
    return subprocess.run([sys.executable, str(tmp_path / "ensure-bucket.py")], env=env, capture_output=True,
                          text=True, timeout=120)


def test_init_container_creates_the_bucket_once(s3_server, tmp_path):
    bucket = f"flashops-{uuid.uuid4().hex[:8]}"  # the session's S3 server is shared: a bucket of our own
    objs = parse_manifests(template("--set", f"s3.bucket={bucket}"))
    assert next(e["value"] for e in _init_container(objs)[0]["env"] if e["name"] == "FLASHOPS_S3_BUCKET") == bucket
    client = s3_server.client()
    assert not client.bucket_exists(bucket)
    first = run_init(objs, tmp_path, s3_server)
    assert first.returncode == 0, first.stderr
    assert f"bucket {bucket} at {s3_server.endpoint} is ready" in first.stdout
    assert client.bucket_exists(bucket)
    client.put_object(bucket, "keep-me", io.BytesIO(b"x"), 1)
    second = run_init(objs, tmp_path, s3_server)  # pod restarts and upgrades: idempotent, nothing lost
    assert second.returncode == 0 and f"bucket {bucket} at {s3_server.endpoint} is ready" in second.stdout
    assert [o.object_name for o in client.list_objects(bucket)] == ["keep-me"]


def test_init_container_waits_for_the_endpoint_then_gives_up_naming_it(tmp_path):
    objs = parse_manifests(template())
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = type("Nothing", (), {"endpoint": f"http://127.0.0.1:{port}", "access_key": "a", "secret_key": "b"})()
    proc = run_init(objs, tmp_path, server, wait="0")
    assert proc.returncode != 0
    assert "waiting for S3" in proc.stdout and f"127.0.0.1:{port}" in proc.stderr


def test_init_container_fails_naming_the_endpoint_on_bad_credentials(rendered, s3_server, tmp_path):
    proc = run_init(rendered["default"], tmp_path, s3_server, secret_key="wrong-" + uuid.uuid4().hex, wait="1")
    assert proc.returncode != 0
    assert "S3 not usable for bucket flashops" in proc.stderr and s3_server.endpoint in proc.stderr
