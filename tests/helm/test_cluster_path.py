"""README's "On a cluster" path, as far as it runs without a real cluster: the commands name objects the
chart really creates, the NOTES say the same, and the chart's CRDs (applied by the real kubectl to the
Kubernetes API emulator) accept examples/quickstart.yaml and reject a bad object.

    .venv/bin/pytest tests/helm/test_cluster_path.py -q
"""
from __future__ import annotations

import re

import pytest

from fixtures.helm import CHART, NAMESPACE, REPO, find, run_helm

pytestmark = pytest.mark.helm

INSTALL = "helm install flashops ./helm/flashops -n flashops --create-namespace"


def cluster_section() -> str:
    text = (REPO / "README.md").read_text()
    start = text.index("## On a cluster")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def commands(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.split("#")[0].strip() for b in blocks for line in b.splitlines() if line.split("#")[0].strip()]


def test_readme_installs_with_the_documented_command_and_names_real_objects(rendered):
    section = cluster_section()
    cmds = commands(section)
    assert INSTALL in cmds
    assert cmds.index(INSTALL) < cmds.index("kubectl apply -f examples/quickstart.yaml")
    objs = rendered["default"]
    assert NAMESPACE == "flashops" and "-n flashops" in INSTALL  # the fixtures render what README installs
    for kind, name in re.findall(r"\b(deployment|svc|statefulset)/([a-z0-9-]+)", section):
        kind = {"svc": "Service", "deployment": "Deployment", "statefulset": "StatefulSet"}[kind]
        assert find(objs, kind, name), f"README names {kind}/{name}; the chart makes no such object"
    for name in re.findall(r"get secret ([a-z0-9-]+)", section):
        assert [s for s in find(objs, "Secret", name) if s["metadata"]["namespace"] == NAMESPACE], name
    assert "jsonpath='{.data.token}'" in section and "token" in find(objs, "Secret", "flashops-lineage")[0]["stringData"]
    for port in re.findall(r"port-forward svc/flashops-lineage (\d+):(\d+)", section):
        assert int(port[1]) in [p["port"] for p in find(objs, "Service", "flashops-lineage")[0]["spec"]["ports"]]
    for path in re.findall(r"(?:examples|helm/flashops)/[\w./-]*\w", section):
        assert (REPO / path).exists() or (CHART / path).exists(), f"README mentions {path}: it does not exist"
    for ci in re.findall(r"`ci/([\w-]+\.yaml)`", section):
        assert (CHART / "ci" / ci).exists(), ci


def test_notes_tell_the_next_command():
    out = run_helm("install", "flashops", str(CHART), "-n", NAMESPACE, "--dry-run=client").stdout
    notes = out[out.index("NOTES:"):]
    section = cluster_section()
    for line in ("kubectl apply -f examples/quickstart.yaml",
                 f"kubectl -n {NAMESPACE} wait --for=condition=Available --timeout=10m "
                 "deployment/flashops-operator deployment/flashops-lineage",
                 f"kubectl -n {NAMESPACE} port-forward svc/flashops-lineage 8080:8080 &"):
        assert line in notes and line in section, line
    assert "http://flashops-lineage.flashops.svc:8080" in notes


def test_chart_crds_accept_the_quickstart_and_reject_a_bad_run(k8s_bare, tmp_path):
    """What `helm install` applies first (crds/), then step 2 of the README, with the real kubectl."""
    k8s_bare.kubectl("apply", "--validate=false", "-f", str(CHART / "crds"))
    applied = k8s_bare.kubectl("apply", "--validate=false", "-f", str(REPO / "examples" / "quickstart.yaml")).stdout
    assert "trainingpipeline.flashops.dev/quickstart created" in applied
    assert "modeldeployment.flashops.dev/quickstart-chat created" in applied
    listed = k8s_bare.kubectl("get", "trainingpipelines,trainingruns,modeldeployments").stdout
    assert "quickstart" in listed and "quickstart-chat" in listed
    assert "quickstart-chat" in k8s_bare.kubectl("get", "fmd").stdout  # the short name works
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: flashops.dev/v1alpha1\nkind: TrainingRun\nmetadata: {name: bad}\n"
                   "spec: {stage: rl, rl: {groupSize: four}}\n")
    proc = k8s_bare.kubectl("apply", "--validate=false", "-f", str(bad), check=False)
    assert proc.returncode != 0 and "spec.rl.groupSize" in proc.stderr


def _namespaced_setup(namespaces: str, *values: str) -> list[dict]:
    """The chart's Namespaces and Secrets (what a real install writes into client namespaces), rendered by helm."""
    from fixtures.helm import parse_manifests, template

    objs = parse_manifests(template("--set", f"clientNamespaces={{{namespaces}}}", *values))
    return [o for o in objs if o["kind"] in ("Namespace", "Secret")]


def test_client_namespaces_are_created_by_the_chart(k8s_bare, tmp_path):
    """Issue 17 item 5: `helm install` failed with `namespaces "team-b" not found` when a clientNamespaces
    entry did not exist. createClientNamespaces (default on) creates them, kept on uninstall; the
    default and release namespaces are never rendered (they exist)."""
    import yaml

    objs = _namespaced_setup("default,team-a,team-b")
    created = [o for o in objs if o["kind"] == "Namespace"]
    assert [o["metadata"]["name"] for o in created] == ["team-a", "team-b"]
    assert all(o["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for o in created)
    assert {s["metadata"]["namespace"] for s in objs if s["kind"] == "Secret"} == {NAMESPACE, "default", "team-a", "team-b"}
    k8s_bare.kubectl("apply", "--validate=false", "-f", "-",  # helm install --create-namespace
                     input=yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}))
    manifest = tmp_path / "setup.yaml"
    manifest.write_text(yaml.safe_dump_all(objs))
    k8s_bare.kubectl("apply", "--validate=false", "-f", str(manifest))
    assert k8s_bare.find("v1", "secrets", "flashops-s3", namespace="team-b") is not None

    # Switched off: the chart renders no Namespace, and the API server refuses the Secrets (what users saw).
    off = _namespaced_setup("default,team-c", "--set", "createClientNamespaces=false")
    assert not [o for o in off if o["kind"] == "Namespace"]
    manifest.write_text(yaml.safe_dump_all(off))
    proc = k8s_bare.kubectl("apply", "--validate=false", "-f", str(manifest), check=False)
    assert proc.returncode != 0 and 'namespaces "team-c" not found' in proc.stderr


def test_values_say_how_to_live_without_created_namespaces():
    values = (CHART / "values.yaml").read_text()
    assert "createClientNamespaces: true" in values and "kubectl create namespace" in values
