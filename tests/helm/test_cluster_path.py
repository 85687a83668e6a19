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
