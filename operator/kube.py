"""A small Kubernetes API client for the reconcilers: get/list/create/patch/delete on any resource by
apiVersion + plural, plain dicts in and out, on top of the official `kubernetes` client (auth, TLS,
in-cluster config). Errors come back as ApiError with the API's reason, so callers branch on meaning.

    kube = Kube.from_environment()            # in-cluster, else $KUBECONFIG / ~/.kube/config
    kube.get("kubeflow.org/v1", "pytorchjobs", "default", "pretrain-a")   # dict | None
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

# Who wrote a field (metadata.managedFields, server-side apply conflicts): every write of the operator, through
# this client and through kopf (handlers.login gives kopf's session the same User-Agent), says `flashops`.
# The API server names a manager after the User-Agent's first word when no fieldManager is sent, which is
# how the operator used to appear as `OpenAPI-Generator` (the kubernetes client's default User-Agent).
FIELD_MANAGER = "flashops"
USER_AGENT = f"{FIELD_MANAGER}/0.1.0 (operator)"
WRITES = ("POST", "PUT", "PATCH")


@dataclass
class ApiError(Exception):
    status: int
    reason: str
    message: str

    def __str__(self) -> str:
        return f"{self.status} {self.reason}: {self.message}"

    @property
    def temporary(self) -> bool:
        """Worth retrying as is: the server or network is busy/down, or someone else wrote first."""
        return self.status in (0, 409, 429) or self.status >= 500


def load_configuration(workers: int = 16) -> Any:
    """kubernetes.client.Configuration for this process: in-cluster if running in a pod, else the kubeconfig.

    KUBECONFIG is read now, not when `kubernetes` was imported (its default path is frozen at import).
    """
    from kubernetes import client, config

    cfg = client.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=cfg)
    else:
        path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
        config.load_kube_config(config_file=path, client_configuration=cfg)
    cfg.connection_pool_maxsize = max(cfg.connection_pool_maxsize or 0, workers + 4)
    return cfg


def api_path(api_version: str, plural: str, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
    base = f"/apis/{api_version}" if "/" in api_version else f"/api/{api_version}"
    path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{plural}"
    return path + (f"/{name}" if name else "") + (f"/{subresource}" if subresource else "")


class Kube:
    def __init__(self, configuration: Any):
        from kubernetes.client import ApiClient

        self.configuration = configuration
        self.client = ApiClient(configuration)
        self.client.user_agent = USER_AGENT

    @classmethod
    def from_environment(cls, workers: int = 16) -> "Kube":
        return cls(load_configuration(workers))

    def _call(self, method: str, path: str, body: Any = None, query: list | None = None,
              content_type: str = "application/json") -> Any:
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        query = list(query or [])
        if method in WRITES:
            query.append(("fieldManager", FIELD_MANAGER))
        try:
            return self.client.call_api(
                path, method, query_params=query, body=body,
                header_params={"Accept": "application/json", "Content-Type": content_type},
                response_type="object", auth_settings=["BearerToken"], _return_http_data_only=True,
                _request_timeout=(5, 60),
            )
        except ApiException as e:
            reason, message = e.reason or "", str(e.body or "")
            try:
                import json

                status = json.loads(e.body)
                reason, message = status.get("reason") or reason, status.get("message") or message
            except (TypeError, ValueError):
                pass
            raise ApiError(e.status or 0, reason, message) from None
        except (HTTPError, OSError) as e:
            raise ApiError(0, "ConnectionError", f"{type(e).__name__}: {e}") from None

    def get(self, api_version: str, plural: str, namespace: str | None, name: str) -> dict | None:
        try:
            return self._call("GET", api_path(api_version, plural, namespace, name))
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def list(self, api_version: str, plural: str, namespace: str | None, selector: str | None = None) -> list[dict]:
        query = [("labelSelector", selector)] if selector else []
        try:
            return self._call("GET", api_path(api_version, plural, namespace), query=query).get("items") or []
        except ApiError as e:
            if e.status == 404:  # the resource (CRD) is not installed: nothing of it exists
                return []
            raise

    def create(self, obj: dict, plural: str) -> tuple[dict, bool]:
        """(object, created). An existing object of that name is returned as is: creation is idempotent."""
        ns = obj["metadata"].get("namespace")
        try:
            return self._call("POST", api_path(obj["apiVersion"], plural, ns), body=obj), True
        except ApiError as e:
            if e.reason == "AlreadyExists":
                existing = self.get(obj["apiVersion"], plural, ns, obj["metadata"]["name"])
                if existing is not None:
                    return existing, False
            raise

    def patch(self, api_version: str, plural: str, namespace: str | None, name: str, patch: dict,
              subresource: str | None = None) -> dict | None:
        try:
            return self._call("PATCH", api_path(api_version, plural, namespace, name, subresource), body=patch,
                              content_type="application/merge-patch+json")
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def delete(self, api_version: str, plural: str, namespace: str | None, name: str) -> bool:
        try:
            self._call("DELETE", api_path(api_version, plural, namespace, name),
                       body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"})
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise
