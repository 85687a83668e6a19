"""Validate objects against a CRD's openAPIV3Schema with jsonschema, the way the API server would.

A plain JSON-Schema validator does not know the Kubernetes extensions; this module translates them:
`nullable` (null allowed), `x-kubernetes-int-or-string` (integer or string), and
`x-kubernetes-preserve-unknown-fields` (anything goes below). CEL rules (`x-kubernetes-validations`)
are not checked. Used for our own generated CRDs and for the upstream Kubeflow and KServe CRDs.

    from flashops.api.crdschema import CRDValidator
    v = CRDValidator.from_file("tests/fixtures/crds/kubeflow.org_pytorchjobs.yaml")
    v.errors(manifest)   # [] when valid, else ["spec.pytorchReplicaSpecs.Master.replicas: 'x' is not of type 'integer'"]
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml


def to_json_schema(node: Any) -> Any:
    """openAPIV3Schema (Kubernetes dialect) -> JSON Schema draft 2020-12."""
    if isinstance(node, list):
        return [to_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: to_json_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if node.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    if node.get("nullable"):
        out = {"anyOf": [out, {"type": "null"}]}
    return out


class CRDValidator:
    def __init__(self, crd: dict[str, Any], version: str | None = None):
        versions = crd["spec"]["versions"]
        chosen = next((v for v in versions if v["name"] == version), None) if version else (
            next((v for v in versions if v.get("storage")), versions[0]))
        if chosen is None:
            raise ValueError(f"CRD {crd['metadata']['name']} has no version {version!r}")
        self.kind = crd["spec"]["names"]["kind"]
        self.api_version = f"{crd['spec']['group']}/{chosen['name']}"
        schema = to_json_schema(chosen["schema"]["openAPIV3Schema"])
        self._validator = jsonschema.Draft202012Validator(schema)

    @classmethod
    def from_file(cls, path: str | Path, version: str | None = None) -> "CRDValidator":
        return _cached(str(path), version)

    def errors(self, obj: dict[str, Any]) -> list[str]:
        problems = []
        for e in sorted(self._validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            path = ".".join(str(p) for p in e.absolute_path) or "<root>"
            problems.append(f"{path}: {e.message}")
        return problems

    def validate(self, obj: dict[str, Any]) -> None:
        problems = self.errors(obj)
        if problems:
            name = obj.get("metadata", {}).get("name", "?")
            raise ValueError(f"{self.kind}/{name} does not match the {self.api_version} CRD schema:\n  " + "\n  ".join(problems))


@lru_cache(maxsize=None)
def _cached(path: str, version: str | None) -> CRDValidator:
    return CRDValidator(yaml.safe_load(Path(path).read_text()), version)
