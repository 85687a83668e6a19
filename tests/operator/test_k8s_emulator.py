"""The API emulator behaves like an API server where our clients depend on it (the fixture itself is tested
here, because every operator test trusts it)."""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from fixtures.k8s import GV, PYTORCHJOBS, TRAINJOBS, KubeHTTPError, label_selector_matches

pytestmark = pytest.mark.k8s


def run(name: str, **spec) -> dict:
    return {"apiVersion": GV, "kind": "TrainingRun", "metadata": {"name": name, "labels": {"team": "a"}},
            "spec": {"stage": "sft", **spec}}


def test_create_get_conflict_and_not_found(k8s):
    created = k8s.create(run("r1"), "trainingruns")
    assert created["metadata"]["uid"] and created["metadata"]["resourceVersion"] and created["metadata"]["generation"] == 1
    assert created["spec"]["backoffLimit"] == 3 and created["spec"]["suspend"] is False  # CRD schema defaults
    r = httpx.post(k8s.url + k8s.path(GV, "trainingruns"), json=run("r2"))
    assert r.status_code == 201
    with pytest.raises(KubeHTTPError) as e:
        k8s.create(run("r1"), "trainingruns")
    assert (e.value.status, e.value.reason) == (409, "AlreadyExists")
    with pytest.raises(KubeHTTPError) as e:
        k8s.get(GV, "trainingruns", "nope")
    assert (e.value.status, e.value.reason) == (404, "NotFound")
    listed = k8s.request("GET", k8s.path(GV, "trainingruns"), params={"labelSelector": "team=a"})
    assert listed["kind"] == "TrainingRunList" and [i["metadata"]["name"] for i in listed["items"]] == ["r1", "r2"]


def test_schema_validation_rejects_what_the_crd_forbids(k8s):
    with pytest.raises(KubeHTTPError) as e:
        k8s.create(run("bad", backoffLimit="three"), "trainingruns")
    assert (e.value.status, e.value.reason) == (422, "Invalid") and "backoffLimit" in str(e.value)


def test_status_subresource_merge_patch_and_generation(k8s):
    k8s.create(run("r1"), "trainingruns")
    after = k8s.patch(GV, "trainingruns", "r1", {"status": {"state": "Running"}, "metadata": {"labels": {"x": "1"}}})
    assert "status" not in after and after["metadata"]["labels"]["x"] == "1"  # status ignored on the main resource
    after = k8s.patch(GV, "trainingruns", "r1", {"status": {"state": "Running"}, "spec": {"suspend": True}},
                      subresource="status")
    assert after["status"]["state"] == "Running" and after["spec"]["suspend"] is False and after["metadata"]["generation"] == 1
    after = k8s.patch(GV, "trainingruns", "r1", {"spec": {"suspend": True}, "metadata": {"labels": {"team": None}}})
    assert after["metadata"]["generation"] == 2 and "team" not in after["metadata"]["labels"]
    stale = str(int(after["metadata"]["resourceVersion"]) - 1)
    with pytest.raises(KubeHTTPError) as e:
        k8s.request("PATCH", k8s.path(GV, "trainingruns", "default", "r1"),
                    [{"op": "test", "path": "/metadata/resourceVersion", "value": stale},
                     {"op": "add", "path": "/metadata/finalizers", "value": ["x"]}],
                    content_type="application/json-patch+json")
    assert e.value.status == 422


def test_finalizers_and_garbage_collection(k8s):
    owner = k8s.create({**run("owner"), "metadata": {"name": "owner", "finalizers": ["flashops.dev/finalizer"]}}, "trainingruns")
    job = {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "child", "ownerReferences": [
        {"apiVersion": GV, "kind": "TrainingRun", "name": "owner", "uid": owner["metadata"]["uid"]}]},
        "spec": {"pytorchReplicaSpecs": {}}}
    k8s.create(job, "pytorchjobs")
    k8s.delete(GV, "trainingruns", "owner")
    assert k8s.get(GV, "trainingruns", "owner")["metadata"]["deletionTimestamp"]
    assert k8s.find(*PYTORCHJOBS, "child") is not None
    k8s.patch(GV, "trainingruns", "owner", {"metadata": {"finalizers": None}})
    assert k8s.find(GV, "trainingruns", "owner") is None
    assert k8s.find(*PYTORCHJOBS, "child") is None  # collected with its owner


def test_watch_resumes_from_a_resource_version(k8s):
    first = k8s.create(run("w1"), "trainingruns")
    k8s.create(run("w2"), "trainingruns")
    events: list[dict] = []

    def watch() -> None:
        params = {"watch": "true", "resourceVersion": first["metadata"]["resourceVersion"], "timeoutSeconds": "2"}
        with httpx.stream("GET", k8s.url + k8s.path(GV, "trainingruns"), params=params, timeout=10) as r:
            for line in r.iter_lines():
                if line:
                    events.append(json.loads(line))

    t = threading.Thread(target=watch)
    t.start()
    k8s.wait_for(lambda: events, timeout=5)
    k8s.delete(GV, "trainingruns", "w1")
    t.join(10)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", "w2"), ("DELETED", "w1")]


def test_label_selector_grammar():
    labels = {"app": "x", "tier": "db"}
    assert label_selector_matches("app=x,tier in (db, cache),!gone", labels)
    assert not label_selector_matches("app!=x", labels)
    assert label_selector_matches("tier notin (web),app", labels)


def test_kubectl_get_prints_the_crd_printer_columns(k8s):
    k8s.create(run("shown"), "trainingruns")
    k8s.patch(GV, "trainingruns", "shown", {"status": {"state": "Running", "retries": 1}}, subresource="status")
    out = k8s.kubectl("get", "ftr").stdout.split("\n")
    assert out[0].split() == ["NAME", "STAGE", "STATE", "RETRIES", "AGE"]
    assert out[1].split()[:4] == ["shown", "sft", "Running", "1"]


def test_cel_rules_of_the_upstream_crds_are_enforced_on_create_and_update(k8s):
    """What a real API server refuses: a TrainJob named 9lives (RFC 1035 CEL rule) and a change of an
    immutable field (a `self == oldSelf` transition rule)."""
    api, plural = TRAINJOBS
    job = {"apiVersion": api, "kind": "TrainJob", "metadata": {"name": "9lives"},
           "spec": {"runtimeRef": {"name": "torch-distributed"}}}
    with pytest.raises(KubeHTTPError) as e:
        k8s.create(job, plural)
    assert e.value.status == 422 and "RFC 1035" in str(e.value)
    k8s.create({**job, "metadata": {"name": "lives9"}}, plural)
    with pytest.raises(KubeHTTPError) as e:
        k8s.patch(api, plural, "lives9", {"spec": {"runtimeRef": {"name": "other"}}})
    assert e.value.status == 422 and "field is immutable" in str(e.value)
    k8s.patch(api, plural, "lives9", {"spec": {"suspend": True}})  # a mutable field still changes
