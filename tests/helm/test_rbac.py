"""The operator's RBAC grants exactly what it manages, in every value set, and nothing else.

A permission added to templates/operator-rbac.yaml must be added to ALLOWED here too: a deliberate,
reviewed change.
"""
from __future__ import annotations

import pytest

from fixtures.helm import NAMESPACE, VALUE_SETS, find

pytestmark = pytest.mark.helm

MANAGE = {"get", "list", "watch", "create", "update", "patch", "delete"}


def _grants(group: str, resources: list[str], verbs: set[str]) -> set[tuple[str, str, str]]:
    return {(group, r, v) for r in resources for v in verbs}


ALLOWED = (
    _grants("flashops.dev", ["trainingruns", "trainingpipelines", "modeldeployments"], MANAGE)
    | _grants("flashops.dev", ["trainingruns/status", "trainingpipelines/status", "modeldeployments/status"],
              {"get", "update", "patch"})
    | _grants("flashops.dev", ["trainingruns/finalizers", "trainingpipelines/finalizers", "modeldeployments/finalizers"],
              {"update"})
    | _grants("kubeflow.org", ["pytorchjobs"], MANAGE)
    | _grants("batch", ["jobs"], MANAGE)
    | _grants("trainer.kubeflow.org", ["trainjobs"], MANAGE)
    | _grants("serving.kserve.io", ["inferenceservices"], MANAGE)
    | _grants("", ["configmaps"], MANAGE)           # the rendered spec each trainer pod mounts
    | _grants("", ["pods"], {"get", "list"})         # a failed attempt's termination message (exit 2: no retry)
    | _grants("", ["events"], {"create"})           # the operator's decisions (operator/events.py), kopf's errors
    | _grants("apiextensions.k8s.io", ["customresourcedefinitions"], {"list", "watch"})  # kopf's CRD scan
)


def granted(role: dict) -> set[tuple[str, str, str]]:
    out = set()
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule, rule
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    out.add((group, resource, verb))
    return out


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_rbac_grants_exactly_the_allow_list(rendered, values):
    objs = rendered[values]
    roles = find(objs, "ClusterRole") + find(objs, "Role")
    assert [r["metadata"]["name"] for r in roles] == [f"flashops-operator-{NAMESPACE}"]
    grants = granted(roles[0])
    assert not {g for g in grants if "*" in g}, "wildcards grant everything"
    assert grants - ALLOWED == set(), "grants beyond the allow-list"
    assert ALLOWED - grants == set(), "the operator would miss a permission it needs"


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_only_the_operator_gets_the_role(rendered, values):
    objs = rendered[values]
    bindings = find(objs, "ClusterRoleBinding") + find(objs, "RoleBinding")
    assert len(bindings) == 1
    (binding,) = bindings
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": f"flashops-operator-{NAMESPACE}"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "flashops-operator", "namespace": NAMESPACE}]
    (operator,) = find(objs, "Deployment", "flashops-operator")
    assert operator["spec"]["template"]["spec"]["serviceAccountName"] == "flashops-operator"
    # every other pod runs without a Kubernetes API token
    for o in objs:
        if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"] != "flashops-operator":
            assert o["spec"]["template"]["spec"]["automountServiceAccountToken"] is False, o["metadata"]["name"]


def test_the_allow_list_check_can_fail(rendered):
    role = find(rendered["default"], "ClusterRole")[0]
    widened = {**role, "rules": role["rules"] + [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]}
    assert granted(widened) - ALLOWED == {("", "secrets", "get")}
