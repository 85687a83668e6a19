"""The lineage HTTP client: the same methods as the direct-SQL store, over the API.

    from flashops.api.lineage import open_lineage
    lin = open_lineage("http://127.0.0.1:8080")          # token from $FLASHOPS_LINEAGE_TOKEN
    run = lin.start_run("r", "TrainingRun", "sft", spec, spec_hash)

Errors keep their type: 4xx answers raise the permanent InvalidInput/NotFound/Conflict/Unauthorized/
Forbidden (do not retry), a 500 the permanent DatabaseError; an unreachable server or a 502/503/504 raises
Unavailable (temporary: retry).
"""
from __future__ import annotations

import os
from typing import Any, Iterable

import httpx

from flashops.api.lineage import validate as V
from flashops.api.lineage.errors import (Conflict, DatabaseError, Forbidden, InvalidInput, LineageError, NotFound,
                                         Unauthorized, Unavailable)

_BY_STATUS = {400: InvalidInput, 401: Unauthorized, 403: Forbidden, 404: NotFound, 409: Conflict,
              422: InvalidInput, 500: DatabaseError}


class HttpLineage:
    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None):
        self.url = url.rstrip("/")
        token = token or os.environ.get("FLASHOPS_LINEAGE_TOKEN") or ""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __repr__(self) -> str:
        return f"HttpLineage({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, *, json: Any = None, params: dict | None = None) -> Any:
        params = {k: v for k, v in (params or {}).items() if v is not None}
        try:
            r = self._http.request(method, path, json=json, params=params)
        except httpx.TransportError as e:
            raise Unavailable(f"lineage API {self.url} unreachable: {type(e).__name__}: {e}") from None
        if r.status_code < 400:
            return r.json()
        try:
            detail = r.json().get("detail") or r.text
        except ValueError:
            detail = r.text
        err = _BY_STATUS.get(r.status_code)
        if err is None:
            err = Unavailable if r.status_code >= 500 else LineageError
        raise err(f"{detail} ({method} {path} -> {r.status_code})")

    def _id(self, ref: Any) -> int:
        return V.node_id("id", ref) if V.is_id(ref) else self.find(ref)

    # ------------------------------------------------------------------ recording

    def upsert_dataset(self, uri: str, content_hash: str | None = None, version: str | None = None,
                       derived_from: Any = None) -> int:
        return self._call("POST", "/v1/datasets", json={"uri": uri, "content_hash": content_hash,
                                                         "version": version, "derived_from": derived_from})["id"]

    def start_run(self, name: str, kind: str, stage: str, spec: dict, spec_hash: str, k8s_ref: Any = None,
                  consumed: Iterable[Any] = (), initialized_from: Any = None, pipeline: str | None = None) -> int:
        body = {"name": name, "kind": kind, "stage": stage, "spec": V.json_object("spec", spec),
                "spec_hash": spec_hash, "k8s_ref": k8s_ref, "consumed": list(consumed or ()),
                "initialized_from": initialized_from, "pipeline": pipeline}
        return self._call("POST", "/v1/runs", json=body)["id"]

    def finish_run(self, run_id: Any, status: str, metrics: dict | None = None) -> None:
        rid = V.node_id("run_id", run_id)
        self._call("POST", f"/v1/runs/{rid}/finish",
                   json={"status": status, "metrics": V.json_object("metrics", metrics)})

    def add_checkpoint(self, run_id: Any, uri: str, step: int | None, manifest_hash: str | None = None,
                       metrics: dict | None = None) -> int:
        return self._call("POST", "/v1/checkpoints", json={
            "run_id": run_id, "uri": uri, "step": step, "manifest_hash": manifest_hash,
            "metrics": V.json_object("metrics", metrics)})["id"]

    def add_model(self, checkpoint_id: Any, uri: str, name: str, version: str, quantization: str = "none",
                  manifest_hash: str | None = None) -> int:
        return self._call("POST", "/v1/models", json={
            "checkpoint_id": checkpoint_id, "uri": uri, "name": name, "version": str(version),
            "quantization": quantization or "none", "manifest_hash": manifest_hash})["id"]

    def add_deployment(self, model_id: Any, name: str, namespace: str | None = None, k8s_ref: Any = None,
                       traffic_percent: int | None = 100) -> int:
        traffic = V.optional_int("traffic_percent", 100 if traffic_percent is None else traffic_percent, 0, 100)
        return self._call("POST", "/v1/deployments", json={
            "model_id": model_id, "name": name, "namespace": namespace, "k8s_ref": k8s_ref,
            "traffic_percent": traffic})["id"]

    def close_deployment(self, deployment_id: Any) -> None:
        self._call("POST", f"/v1/deployments/{V.node_id('deployment_id', deployment_id)}/close")

    def record_metrics(self, run_id: Any, rows: list[dict]) -> int:
        rid = V.node_id("run_id", run_id)
        return self._call("POST", f"/v1/runs/{rid}/metrics", json={"rows": V.json_value("rows", list(rows))})["rows"]

    def add_evaluation(self, target_id: Any, result: dict, name: str | None = None) -> int:
        return self._call("POST", "/v1/evaluations", json={
            "target_id": target_id, "result": V.json_object("result", result), "name": name})["id"]

    def record_events(self, events: list[dict]) -> list[Any]:
        return self._call("POST", "/v1/events", json={"events": events})["results"]

    # ------------------------------------------------------------------ queries

    def resolve(self, ref: Any) -> dict:
        return self._call("GET", "/v1/resolve", params={"ref": str(ref)})

    def find(self, ref: Any) -> int:
        return self._call("GET", "/v1/find", params={"ref": str(ref)})["id"]

    def node(self, ref: Any, limit: int = 100) -> dict:
        return self._call("GET", f"/v1/nodes/{self._id(ref)}", params={"limit": limit})

    def list_nodes(self, type: str | None = None, name: str | None = None, uri: str | None = None,
                   pipeline: str | None = None, status: str | None = None, after: int | None = None,
                   limit: int = 50) -> dict:
        return self._call("GET", "/v1/nodes", params=dict(type=type, name=name, uri=uri, pipeline=pipeline,
                                                           status=status, after=after, limit=limit))

    def ancestors(self, ref: Any, depth: int = 10, limit: int = 1000) -> dict:
        return self._call("GET", f"/v1/nodes/{self._id(ref)}/ancestors", params={"depth": depth, "limit": limit})

    def descendants(self, ref: Any, depth: int = 10, limit: int = 1000) -> dict:
        return self._call("GET", f"/v1/nodes/{self._id(ref)}/descendants", params={"depth": depth, "limit": limit})

    def provenance(self, ref: Any) -> dict:
        return self._call("GET", f"/v1/nodes/{self._id(ref)}/provenance")

    def derived(self, ref: Any) -> dict:
        return self._call("GET", f"/v1/nodes/{self._id(ref)}/derived")

    def diff_runs(self, a: Any, b: Any) -> dict:
        return self._call("GET", "/v1/runs/diff", params={"a": self._id(a), "b": self._id(b)})

    def run_metrics(self, ref: Any, max_points: int = 2000) -> dict:
        return self._call("GET", f"/v1/runs/{self._id(ref)}/metrics", params={"max_points": max_points})

    def evaluations(self, target_id: Any) -> list[dict]:
        return self._call("GET", f"/v1/nodes/{self._id(target_id)}/evaluations")["items"]

    def health(self) -> dict:
        return self._call("GET", "/healthz")
