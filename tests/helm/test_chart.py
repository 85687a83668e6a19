"""The chart lints, renders in every value set, and every rendered object is a valid Kubernetes object.

    .venv/bin/pytest tests/helm -q
"""
from __future__ import annotations

import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from fixtures.helm import CHART, NAMESPACE, VALUE_SETS, container_env, find, pod_templates, run_helm

pytestmark = pytest.mark.helm

# Kubernetes versions the objects must be valid for: the kubectl we ship (1.35) and the newest
# schemas kubernetes-validate carries (they ship inside the package: no network needed).
K8S_VERSIONS = ["1.35.0", kubernetes_validate.utils.latest_version()]
# Kinds whose schemas are CRDs that kubernetes-validate does not carry; each gets its own test below.
NOT_IN_CORE_SCHEMAS = {"ServiceMonitor"}


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_lint_strict(values):
    args = ["lint", "--strict", str(CHART), "--namespace", NAMESPACE]
    if VALUE_SETS[values]:
        args += ["-f", str(VALUE_SETS[values])]
    out = run_helm(*args).stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_every_rendered_object_validates(rendered, values, version):
    objs = rendered[values]
    errors = []
    for obj in objs:
        if obj["kind"] in NOT_IN_CORE_SCHEMAS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: no schema ({e.message})")
    assert errors == []


def test_validator_rejects_a_broken_object(rendered):
    """The check above can fail: the same validator catches a typo in a rendered Deployment."""
    deployment = yaml.safe_load(yaml.safe_dump(find(rendered["default"], "Deployment")[0]))
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "Sometimes"
    deployment["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_value_sets_render_what_they_say(rendered):
    def names(values, kind):
        return {o["metadata"]["name"] for o in find(rendered[values], kind)}

    assert names("default", "StatefulSet") == {"flashops-postgresql", "flashops-minio"}
    assert names("external-postgresql", "StatefulSet") == {"flashops-minio"}
    assert names("external-minio-tls", "StatefulSet") == {"flashops-postgresql"}
    assert names("default", "Deployment") == {"flashops-operator", "flashops-lineage"}
    assert names("default", "CustomResourceDefinition") == {
        "trainingruns.flashops.dev", "trainingpipelines.flashops.dev", "modeldeployments.flashops.dev"}
    assert not find(rendered["default"], "NetworkPolicy") and not find(rendered["default"], "ServiceMonitor")
    assert len(find(rendered["everything-on"], "NetworkPolicy")) == 3  # lineage, operator, postgresql (MinIO external)
    # existingSecret: the chart makes no Secret of its own for that credential
    assert "flashops-db" not in names("external-postgresql", "Secret")
    assert "flashops-s3" not in names("external-minio-tls", "Secret")


def _env(objs, deployment, container=None):
    spec = find(objs, "Deployment", deployment)[0]["spec"]["template"]["spec"]
    return container_env(next(c for c in spec["containers"] if container in (None, c["name"])))


def test_operator_settings_follow_the_values(rendered):
    default = _env(rendered["default"], "flashops-operator")
    assert default["FLASHOPS_RUNTIME"] == "pytorchjob"
    assert default["FLASHOPS_S3_ENDPOINT"] == f"http://flashops-minio.{NAMESPACE}.svc:9000"
    assert default["FLASHOPS_S3_SECURE"] == "false"
    assert default["FLASHOPS_LINEAGE_URL"] == f"http://flashops-lineage.{NAMESPACE}.svc:8080"
    assert default["FLASHOPS_CHECKPOINT_ROOT"] == "s3://flashops/checkpoints"
    assert default["FLASHOPS_S3_SECRET"] == "flashops-s3" and default["FLASHOPS_LINEAGE_SECRET"] == "flashops-lineage"
    assert default["FLASHOPS_IMAGE"] == "ghcr.io/flashops/flashops:0.1.0"
    assert "FLASHOPS_S3_CA_BUNDLE" not in default

    v2 = _env(rendered["trainer-v2"], "flashops-operator")
    assert v2["FLASHOPS_RUNTIME"] == "trainjob" and v2["FLASHOPS_TRAINJOB_RUNTIME"] == "torch-distributed"
    assert v2["FLASHOPS_IMAGE"] == "ghcr.io/flashops/flashops:0.1.0-cuda"

    tls = _env(rendered["external-minio-tls"], "flashops-operator")
    assert tls["FLASHOPS_S3_ENDPOINT"] == "https://minio.storage.svc.cluster.local:9000"
    assert tls["FLASHOPS_S3_SECURE"] == "true"
    assert tls["FLASHOPS_S3_CA_BUNDLE"] == "/etc/flashops/s3-ca/ca.crt"
    assert tls["FLASHOPS_S3_CA_BUNDLE_SECRET"] == "minio-ca"
    assert tls["AWS_ACCESS_KEY_ID"] == {"secretKeyRef": {"name": "minio-flashops-user", "key": "AWS_ACCESS_KEY_ID"}}
    assert tls["FLASHOPS_CHECKPOINT_ROOT"] == "s3://ml-checkpoints/checkpoints"
    assert tls["FLASHOPS_S3_SECRET"] == "minio-flashops-user"
    spec = find(rendered["external-minio-tls"], "Deployment", "flashops-operator")[0]["spec"]["template"]["spec"]
    ca_volume = next(v for v in spec["volumes"] if v["name"] == "s3-ca")
    assert ca_volume["secret"] == {"secretName": "minio-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]}


def test_client_namespaces_get_the_same_credentials(rendered):
    """Trainer and predictor pods in a client namespace mount the S3 and lineage Secrets by name:
    each client namespace gets a copy with the very same (possibly generated) values."""
    objs = rendered["everything-on"]
    for name in ("flashops-s3", "flashops-lineage", "flashops-s3-ca"):
        copies = {o["metadata"]["namespace"]: o["stringData"] for o in find(objs, "Secret", name)}
        assert sorted(copies) == sorted([NAMESPACE, "team-a", "team-b"]), name
        assert len({tuple(sorted(d.items())) for d in copies.values()}) == 1, name
    default = {o["metadata"]["namespace"]: o["stringData"] for o in find(rendered["default"], "Secret", "flashops-s3")}
    assert sorted(default) == sorted([NAMESPACE, "default"])
    a, b = default.values()
    assert a == b and len(a["AWS_SECRET_ACCESS_KEY"]) == 40  # generated once, shared
    assert [o["metadata"]["namespace"] for o in find(rendered["default"], "Secret", "flashops-db")] == [NAMESPACE]


def test_lineage_api_uses_the_database_it_is_given(rendered):
    bundled = _env(rendered["default"], "flashops-lineage")
    assert bundled["FLASHOPS_LINEAGE_DB"] == f"postgresql+psycopg://flashops@flashops-postgresql.{NAMESPACE}.svc:5432/flashops"
    assert bundled["PGPASSWORD"] == {"secretKeyRef": {"name": "flashops-db", "key": "password"}}
    external = _env(rendered["external-postgresql"], "flashops-lineage")
    assert external["FLASHOPS_LINEAGE_DB"] == (
        "postgresql+psycopg://flashops_app@pg.databases.svc.cluster.local:5432/lineage?sslmode=verify-full")
    assert external["PGPASSWORD"] == {"secretKeyRef": {"name": "flashops-db-credentials", "key": "pg-password"}}
    c = find(rendered["default"], "Deployment", "flashops-lineage")[0]["spec"]["template"]["spec"]["containers"][0]
    assert c["command"] + c["args"] == ["flashops", "lineage", "serve", "--db", "$(FLASHOPS_LINEAGE_DB)",
                                        "--host", "0.0.0.0", "--port", "8080"]


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_every_reference_resolves(rendered, values):
    """Services select pods that exist; pods use ServiceAccounts, ConfigMaps and Secrets that exist
    (or that the values name as existingSecret)."""
    objs = rendered[values]
    external_secrets = {"flashops-db-credentials", "minio-flashops-user", "minio-ca"}
    secrets = {o["metadata"]["name"] for o in find(objs, "Secret")} | external_secrets
    configmaps = {o["metadata"]["name"] for o in find(objs, "ConfigMap")}
    accounts = {o["metadata"]["name"] for o in find(objs, "ServiceAccount")}
    templates = [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]
    for svc in find(objs, "Service"):
        selector = svc["spec"]["selector"]
        matches = [t for t in templates if selector.items() <= t["spec"]["template"]["metadata"]["labels"].items()]
        assert len(matches) == 1, f"Service {svc['metadata']['name']} selects {len(matches)} workloads"
        ports = {p["name"] for c in matches[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} <= ports
    for name, pod in pod_templates(objs):
        if "serviceAccountName" in pod:
            assert pod["serviceAccountName"] in accounts, name
        for v in pod.get("volumes", []):
            if "secret" in v:
                assert v["secret"]["secretName"] in secrets, name
            if "configMap" in v:
                assert v["configMap"]["name"] in configmaps, name
        for c in pod.get("initContainers", []) + pod["containers"]:
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] in secrets, f"{name} {c['name']} {e['name']}"
                    made = find(objs, "Secret", ref["name"])
                    if made:  # a Secret the chart makes has the key the pod reads
                        assert ref["key"] in made[0]["stringData"], f"{name} {e['name']}"
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod.get("volumes", [])} | {
                t["metadata"]["name"] for o in objs if o["kind"] == "StatefulSet" and o["spec"]["template"]["spec"] is pod
                for t in o["spec"].get("volumeClaimTemplates", [])}, name


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_pods_are_locked_down(rendered, values):
    """Non-root, read-only root filesystem, no privilege escalation, probes and resource requests."""
    for name, pod in pod_templates(rendered[values]):
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"].get("runAsUser", 0) != 0, name
        for c in pod.get("initContainers", []) + pod["containers"]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, f"{name}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, f"{name}/{c['name']}"
            assert sc["capabilities"]["drop"] == ["ALL"], f"{name}/{c['name']}"
            assert c["resources"]["requests"].keys() >= {"cpu", "memory"}, f"{name}/{c['name']}"
        for c in pod["containers"]:
            assert "livenessProbe" in c and "readinessProbe" in c, f"{name}/{c['name']}"
            # a read-only root needs somewhere writable for $HOME and temp files
            assert any(m["mountPath"] == "/tmp" for m in c["volumeMounts"]), f"{name}/{c['name']}"


def test_service_monitor_scrapes_the_lineage_service(rendered):
    """ServiceMonitor is a Prometheus Operator CRD (no schema in kubernetes-validate): check it points
    at a real Service port in this namespace."""
    objs = rendered["everything-on"]
    (monitor,) = find(objs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    services = [s for s in find(objs, "Service")
                if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in services] == ["flashops-lineage"]
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= {p["name"] for p in services[0]["spec"]["ports"]}


def test_network_policies_keep_the_database_private(rendered):
    objs = rendered["everything-on"]
    (pg,) = [p for p in find(objs, "NetworkPolicy") if p["metadata"]["name"] == "flashops-postgresql"]
    (rule,) = pg["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": {"matchLabels": {
        "app.kubernetes.io/name": "flashops", "app.kubernetes.io/instance": "flashops",
        "app.kubernetes.io/component": "lineage"}}}]
    (lineage,) = [p for p in find(objs, "NetworkPolicy") if p["metadata"]["name"] == "flashops-lineage"]
    assert {"namespaceSelector": {"matchLabels": {"flashops.dev/client": "true"}}} in lineage["spec"]["ingress"][0]["from"]


def test_chart_crds_are_the_generated_ones(repo_root):
    """helm/flashops/crds/ holds exactly `flashops crds` (regenerate after api/spec.py changes:
    `.venv/bin/flashops crds > helm/flashops/crds/flashops.yaml`)."""
    from flashops.api.crds import crds_yaml
    from flashops.cli.app import app

    files = sorted((CHART / "crds").glob("*.yaml"))
    assert [f.name for f in files] == ["flashops.yaml"]
    committed = files[0].read_text()
    hint = "stale: run `.venv/bin/flashops crds > helm/flashops/crds/flashops.yaml`"
    assert committed == crds_yaml(), hint
    result = CliRunner().invoke(app, ["crds"])
    assert result.exit_code == 0 and result.output == committed, hint


def test_helm_installs_the_crds_it_ships(rendered):
    """`helm template --include-crds` (what `helm install` applies first) carries the CRDs unchanged."""
    from flashops.api.crds import all_crds

    assert find(rendered["default"], "CustomResourceDefinition") == all_crds()
