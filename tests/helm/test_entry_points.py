"""The chart and the code agree: the commands the chart runs parse with the real CLI, and the environment
it gives the operator means, to flashops.operator.config and flashops.storage.settings, what the values say.
A renamed env var or CLI option on either side fails here instead of in a pod.

    .venv/bin/pytest tests/helm/test_entry_points.py -q
"""
from __future__ import annotations

import pytest
import typer

from fixtures.helm import NAMESPACE, VALUE_SETS, container_env, find

pytestmark = pytest.mark.helm

FAKE_SECRETS = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "s3cr3t", "token": "lineage-token",
                "password": "pw", "pg-password": "pw"}


def container(objs, deployment: str, name: str) -> dict:
    pod = find(objs, "Deployment", deployment)[0]["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == name)


def env_of(c: dict) -> dict[str, str]:
    """The container's environment as the kubelet would set it (Secrets replaced by stand-ins)."""
    return container_env(c, FAKE_SECRETS)


def cli_command(*path: str):
    from flashops.cli.app import app

    cmd = typer.main.get_command(app)
    for name in path:
        if name not in getattr(cmd, "commands", {}):
            return None
        cmd = cmd.commands[name]
    return cmd


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_operator_command_parses_and_its_env_configures_the_operator(rendered, values):
    from flashops.operator.config import OperatorConfig

    c = container(rendered[values], "flashops-operator", "operator")
    assert c["command"] == ["flashops", "operator"]
    cmd = cli_command("operator")
    assert cmd is not None, "`flashops operator` is not a command"
    ctx = cmd.make_context("operator", list(c["args"]))  # raises on an unknown option
    port = c["ports"][0]["containerPort"]
    assert ctx.params["liveness"] == f"http://0.0.0.0:{port}/healthz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"

    env = env_of(c)
    config = OperatorConfig.from_env(env)  # raises ConfigError naming the variable on a bad value
    assert config.runtime == env["FLASHOPS_RUNTIME"] == ("trainjob" if values == "trainer-v2" else "pytorchjob")
    assert config.image == env["FLASHOPS_IMAGE"]
    assert config.trainjob_runtime == "torch-distributed"
    assert config.checkpoint_root == env["FLASHOPS_CHECKPOINT_ROOT"]
    assert config.s3_endpoint == env["FLASHOPS_S3_ENDPOINT"]
    assert config.s3_secure is (env["FLASHOPS_S3_SECURE"] == "true")
    assert config.s3_secret == env["FLASHOPS_S3_SECRET"]
    assert config.lineage_url == f"http://flashops-lineage.{NAMESPACE}.svc:8080"
    assert config.lineage_secret == "flashops-lineage"
    assert config.namespace is None  # cluster-wide, matching the ClusterRole
    # the Secrets the operator hands to pods in client namespaces exist there (or are the user's own)
    objs = rendered[values]
    for ns in ("default",) if values != "everything-on" else ("team-a", "team-b"):
        for secret in (config.s3_secret, config.lineage_secret):
            made = [s for s in find(objs, "Secret", secret) if s["metadata"]["namespace"] == ns]
            assert made or secret == "minio-flashops-user", f"{secret} missing in client namespace {ns}"


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_operator_env_configures_the_store(rendered, values, monkeypatch):
    from flashops.storage.settings import resolve_s3_settings

    env = env_of(container(rendered[values], "flashops-operator", "operator"))
    for k in ("FLASHOPS_S3_ENDPOINT", "AWS_ENDPOINT_URL", "FLASHOPS_S3_SECURE", "FLASHOPS_S3_CA_BUNDLE",
              "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("FLASHOPS_S3_SECRET_DIR", "/nonexistent")
    monkeypatch.setenv("FLASHOPS_HOME", "/nonexistent")
    for k, v in env.items():
        if k.startswith(("FLASHOPS_S3_", "AWS_")):
            monkeypatch.setenv(k, v)
    settings = resolve_s3_settings()
    expected = {"default": ("flashops-minio.flashops.svc:9000", False),
                "external-minio-tls": ("minio.storage.svc.cluster.local:9000", True),
                "everything-on": ("s3.example.com:443", True)}.get(values, ("flashops-minio.flashops.svc:9000", False))
    assert (settings.endpoint, settings.secure) == expected
    assert settings.access_key == "AKIAEXAMPLE" and settings.secret_key == "s3cr3t"
    assert settings.ca_bundle == ("/etc/flashops/s3-ca/ca.crt" if values in ("external-minio-tls", "everything-on") else None)


def test_lineage_serve_command_parses(rendered):
    c = container(rendered["default"], "flashops-lineage", "lineage")
    cmd = cli_command(*c["command"][1:])
    if cmd is None:
        pytest.skip("`flashops lineage serve` is not registered yet (cli/lineage_commands.py has not landed)")
    args = [a.replace("$(FLASHOPS_LINEAGE_DB)", "postgresql+psycopg://u@h:5432/d") for a in c["args"]]
    ctx = cmd.make_context("serve", args)
    assert "0.0.0.0" in ctx.params.values() and 8080 in {v for v in ctx.params.values() if isinstance(v, int)}
