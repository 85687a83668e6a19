"""The chart's half of `runtime: vllm` (issue 14): KServe's storage initializer downloads the model with the S3
settings of the predictor's ServiceAccount, so the chart makes that account in every client namespace, listing the
S3 Secret, writes on the Secrets it makes the serving.kserve.io/s3-* annotations that agree with the operator's
own S3 settings (TLS explicit, never KServe's https default), and tells the operator both names."""
from __future__ import annotations

import pytest

from fixtures.helm import NAMESPACE, VALUE_SETS, container_env, find

pytestmark = pytest.mark.helm


def _operator_env(objs):
    spec = find(objs, "Deployment", "flashops-operator")[0]["spec"]["template"]["spec"]
    return container_env(next(c for c in spec["containers"] if c["name"] == "operator") if any(
        c["name"] == "operator" for c in spec["containers"]) else spec["containers"][0])


@pytest.mark.parametrize("values", list(VALUE_SETS))
def test_every_client_namespace_has_the_serving_account_with_the_s3_secret(rendered, values):
    objs = rendered[values]
    env = _operator_env(objs)
    account, secret = env["FLASHOPS_SERVING_SERVICE_ACCOUNT"], env["FLASHOPS_S3_SECRET"]
    assert env["FLASHOPS_VLLM_RUNTIME"] == "kserve-huggingfaceserver"
    accounts = {o["metadata"]["namespace"]: o for o in find(objs, "ServiceAccount", account)}
    s3_copies = {o["metadata"]["namespace"] for o in find(objs, "Secret", "flashops-s3")}
    assert NAMESPACE in accounts and (not s3_copies or set(accounts) == s3_copies)
    for sa in accounts.values():
        assert sa["secrets"] == [{"name": secret}] and sa["automountServiceAccountToken"] is False


@pytest.mark.parametrize("values", ["default", "everything-on"])
def test_the_s3_secret_tells_kserve_what_the_operator_is_told(rendered, values):
    objs = rendered[values]
    env = _operator_env(objs)
    endpoint = env["FLASHOPS_S3_ENDPOINT"]
    for s in find(objs, "Secret", env["FLASHOPS_S3_SECRET"]):
        a = s["metadata"]["annotations"]
        assert a["serving.kserve.io/s3-endpoint"] == endpoint.split("://", 1)[-1].rstrip("/")
        assert a["serving.kserve.io/s3-usehttps"] == ("1" if env["FLASHOPS_S3_SECURE"] == "true" else "0")
        assert a["serving.kserve.io/s3-region"]


def test_the_operator_renders_vllm_predictors_with_the_charts_account(rendered):
    """The operator, configured from the chart's environment, names an account the chart makes."""
    from flashops.api import spec as S
    from flashops.operator.config import OperatorConfig
    from flashops.operator.inference import build_inference_service

    env = {k: v for k, v in _operator_env(rendered["default"]).items() if isinstance(v, str)}
    config = OperatorConfig.from_env(env)
    md = S.parse_object({"apiVersion": S.API_GROUP_VERSION, "kind": "ModelDeployment",
                         "metadata": {"name": "chat", "namespace": "default"},
                         "spec": {"source": "s3://flashops/models/default/chat/v1", "runtime": "vllm"}})
    pred = build_inference_service(md, md.spec.source, config)["spec"]["predictor"]
    made = {(o["metadata"].get("namespace", NAMESPACE), o["metadata"]["name"]) for o in find(rendered["default"], "ServiceAccount")}
    assert ("default", pred["serviceAccountName"]) in made
    assert pred["model"]["runtime"] == "kserve-huggingfaceserver"
