"""Promotion gates through the real kopf operator against the Kubernetes emulator, reading evaluations through the
real lineage HTTP API (issue 15 item 4): a model whose recorded evaluation fails spec.promotion is not rolled out,
the current one keeps serving and condition PromotionBlocked plus a Warning Event carry the numbers; a passing
model is rolled out (to KServe's canary share with canaryTrafficPercent) and mtpTokens: auto picks k from the
recorded acceptance lengths and MTP cost."""
from __future__ import annotations

import pytest
import yaml

from fixtures.k8s import GV, ISVCS, condition, state

pytestmark = pytest.mark.k8s
SUITE = "builtin:rl-heldout"
TOKEN = "promotion-test-token"


def result(accuracy, acceptance=None, cost=None):
    mode = {"mode": "non-thinking", "accuracy": accuracy, "mean_tokens": 12.0,
            "accuracy_per_1k_tokens": 1000 * accuracy / 12.0}
    if acceptance:
        mode["acceptance_length"] = {str(k): v for k, v in acceptance.items()}
    if cost is not None:
        mode["mtp_cost_ratio"] = cost
    return {"suites": [{"name": SUITE, "sha256": "c" * 64, "modes": [mode]}]}


@pytest.fixture
def lineage_api(tmp_path, monkeypatch):
    """The lineage HTTP service the operator reads (a real uvicorn server over SQLite) and a client to record with."""
    from flashops.api.lineage import open_lineage
    from flashops.api.lineage.serve import start_in_thread

    server = start_in_thread(f"sqlite:///{tmp_path}/lineage.db", tokens={TOKEN: frozenset({"read", "write"})})
    monkeypatch.setenv("FLASHOPS_LINEAGE_TOKEN", TOKEN)
    client = open_lineage(server.url, token=TOKEN)
    yield server.url, client
    client.close()
    server.stop()


def record_model(lin, tmp_path, step: int) -> tuple[int, str]:
    """A trained checkpoint and its export, as the trainer records them: (checkpoint id, model URI)."""
    run = lin.start_run(f"q-rl-{step}", "TrainingRun", "rl", {"stage": "rl"}, f"sha256:{step}")
    ck_uri = f"file://{tmp_path}/store/runs/q-rl/step-{step}"
    ck = lin.add_checkpoint(run, ck_uri, step)
    model_uri = f"file://{tmp_path}/store/models/q/step-{step}"
    lin.add_model(ck, model_uri, "q", f"step-{step}")
    lin.finish_run(run, "succeeded")
    return ck, model_uri


def deployment(source: str, **spec) -> str:
    doc = {"apiVersion": GV, "kind": "ModelDeployment", "metadata": {"name": "chat"},
           "spec": {"source": source, "promotion": {"require": [{"suite": SUITE, "metric": "accuracy", "min": 0.4}]},
                    **spec}}
    return yaml.safe_dump(doc)


def served(k8s) -> str | None:
    isvc = k8s.find(*ISVCS, "chat")
    return isvc and isvc["spec"]["predictor"]["containers"][0]["args"][1]


def warnings(k8s, reason: str) -> list[str]:
    return [e["message"] for e in k8s.list("v1", "events")
            if e["involvedObject"]["name"] == "chat" and e["reason"] == reason]


def test_a_failing_evaluation_keeps_the_current_model_serving_with_the_numbers(k8s, start_operator, lineage_api,
                                                                               tmp_path):
    url, lin = lineage_api
    start_operator(lineage_url=url)
    ck1, m1 = record_model(lin, tmp_path, 10)
    # no evaluation yet: nothing is served, and the status names the field and the command that records one
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=deployment(m1))
    md = k8s.wait_for(lambda: (o := k8s.find(GV, "modeldeployments", "chat")) and state(o) == "Pending"
                      and condition(o, "PromotionBlocked").get("status") == "True" and o, message="blocked, unevaluated")
    assert condition(md, "Pending")["reason"] == "PromotionBlocked" and not k8s.list(*ISVCS)
    blocked = condition(md, "PromotionBlocked")
    assert blocked["reason"] == "WaitingForEvaluation"
    assert f"spec.promotion.require[0].suite: '{SUITE}' was never evaluated for {m1}" in blocked["message"]
    assert f"flashops eval --model {m1} --suite {SUITE}" in blocked["message"]

    lin.add_evaluation(ck1, result(0.5))  # the eval stage evaluates the checkpoint; the export is the same weights
    k8s.wait_for(lambda: served(k8s) == m1, message="the evaluated model rolled out")
    md = k8s.wait_for(lambda: (o := k8s.get(GV, "modeldeployments", "chat"))["status"].get("promotion", {}).get("passed")
                      and o, message="promotion status")
    assert condition(md, "PromotionBlocked")["status"] == "False"
    assert md["status"]["promotion"]["checks"][0] == {"suite": SUITE, "mode": "non-thinking", "metric": "accuracy",
                                                      "value": 0.5, "min": 0.4, "passed": True}
    k8s.wait_for(lambda: warnings(k8s, "Promoted"), message="the Promoted event")

    # a worse model: blocked against the current one; the InferenceService is not touched
    ck2, m2 = record_model(lin, tmp_path, 20)
    lin.add_evaluation(ck2, result(0.45))
    k8s.kubectl("patch", "modeldeployments", "chat", "--type=merge", "-p", f'{{"spec": {{"source": "{m2}"}}}}')
    md = k8s.wait_for(lambda: (o := k8s.get(GV, "modeldeployments", "chat")) and
                      condition(o, "PromotionBlocked").get("status") == "True" and o, message="PromotionBlocked")
    message = condition(md, "PromotionBlocked")["message"]
    assert condition(md, "PromotionBlocked")["reason"] == "GateFailed"
    assert f"promotion of {m2} blocked; {m1} keeps serving" in message
    assert "accuracy 0.45 >= min 0.4, < 0.5 (current model 0.5)" in message
    check = md["status"]["promotion"]["checks"][0]
    assert (check["value"], check["min"], check["current"], check["passed"]) == (0.45, 0.4, 0.5, False)
    assert served(k8s) == m1 and md["status"]["latestCheckpoint"] == m1
    assert f"promotion of {m2} blocked" in condition(md, state(md))["message"]  # Pending: KServe has not said Ready
    k8s.wait_for(lambda: any("accuracy 0.45" in m for m in warnings(k8s, "PromotionBlocked")),
                 message="the PromotionBlocked event with the numbers")
    assert "PromotionBlocked" in k8s.kubectl("describe", "modeldeployments", "chat").stdout

    # a new evaluation of the same model that passes: it is rolled out without touching the deployment
    lin.add_evaluation(ck2, result(0.55))
    k8s.wait_for(lambda: served(k8s) == m2, timeout=30, message="the re-evaluated model rolled out")
    md = k8s.wait_for(lambda: (o := k8s.get(GV, "modeldeployments", "chat")) and
                      condition(o, "PromotionBlocked").get("status") == "False" and o)
    assert md["status"]["promotion"]["current"] == m1 and md["status"]["promotion"]["checks"][0]["current"] == 0.5
    assert len(warnings(k8s, "PromotionBlocked")) >= 1 and len(warnings(k8s, "Promoted")) == 2


def test_a_passing_model_goes_to_the_canary_with_mtp_tokens_auto(k8s, start_operator, lineage_api, tmp_path):
    url, lin = lineage_api
    start_operator(lineage_url=url)
    ck1, m1 = record_model(lin, tmp_path, 10)
    lin.add_evaluation(ck1, result(0.5, acceptance={1: 1.8, 2: 2.3, 3: 2.45}, cost=0.1))
    k8s.kubectl("apply", "--validate=false", "-f", "-",
                input=deployment(m1, canaryTrafficPercent=20, speculative={"mtpTokens": "auto"}))
    k8s.wait_for(lambda: served(k8s) == m1, message="the first model")
    args = k8s.get(*ISVCS, "chat")["spec"]["predictor"]["containers"][0]["args"]
    assert args[args.index("--mtp-tokens") + 1] == "2"  # 2.3/1.2 beats 1.8/1.1 and 2.45/1.3
    md = k8s.wait_for(lambda: (o := k8s.get(GV, "modeldeployments", "chat")).get("status", {}).get("mtpTokens") is not None
                      and o, message="status.mtpTokens")
    assert md["status"]["mtpTokens"] == 2 and "k=2: 1.92x" in md["status"]["mtpChoice"]
    assert "canaryModel" not in md["status"]  # the first model takes all traffic

    ck2, m2 = record_model(lin, tmp_path, 20)
    lin.add_evaluation(ck2, result(0.6, acceptance={1: 1.9, 2: 2.8, 3: 3.6}, cost=0.05))
    k8s.kubectl("patch", "modeldeployments", "chat", "--type=merge", "-p", f'{{"spec": {{"source": "{m2}"}}}}')
    k8s.wait_for(lambda: served(k8s) == m2, message="the passing model on the canary")
    isvc = k8s.get(*ISVCS, "chat")
    assert isvc["spec"]["predictor"]["canaryTrafficPercent"] == 20  # KServe: the new revision gets 20%, m1 the rest
    args = isvc["spec"]["predictor"]["containers"][0]["args"]
    assert args[args.index("--mtp-tokens") + 1] == "3"
    k8s.patch(*ISVCS, "chat", {"status": {"url": "http://chat.default.example.com", "conditions": [
        {"type": "PredictorReady", "status": "True"}, {"type": "Ready", "status": "True"}]}}, subresource="status")
    md = k8s.wait_for(lambda: (o := k8s.get(GV, "modeldeployments", "chat")) and state(o) == "Running" and
                      o["status"].get("canaryModel") == m2 and o, message="the canary in status")
    assert f"canary: 20% of requests go to {m2}, 80% stay on {m1}" in condition(md, "Running")["message"]
    k8s.wait_for(lambda: any("canary" in m for m in warnings(k8s, "Promoted")), message="Promoted (canary)")
    # promote fully: canaryTrafficPercent removed -> the canary note goes, the model stays
    k8s.kubectl("patch", "modeldeployments", "chat", "--type=json", "-p",
                '[{"op": "remove", "path": "/spec/canaryTrafficPercent"}]')
    md = k8s.wait_for(lambda: (o := k8s.get(GV, "modeldeployments", "chat")) and "canaryModel" not in o["status"] and o,
                      message="the canary promoted fully")
    assert served(k8s) == m2 and "canaryTrafficPercent" not in k8s.get(*ISVCS, "chat")["spec"]["predictor"]


def test_a_gate_without_lineage_says_how_to_connect_it(k8s, start_operator, tmp_path):
    start_operator()  # no lineage_url
    k8s.kubectl("apply", "--validate=false", "-f", "-", input=deployment(f"file://{tmp_path}/models/q/v1"))
    md = k8s.wait_for(lambda: (o := k8s.find(GV, "modeldeployments", "chat")) and
                      condition(o, "PromotionBlocked").get("status") == "True" and o)
    assert "FLASHOPS_LINEAGE_URL" in condition(md, "PromotionBlocked")["message"] and not k8s.list(*ISVCS)
