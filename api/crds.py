"""CustomResourceDefinitions generated from the spec models (never written by hand).

    flashops crds > helm/flashops/crds/flashops.yaml     # the committed copy; a test checks it matches

pydantic's JSON schema is turned into a Kubernetes *structural* schema: $refs inlined, Optional[X]
as X with nullable, the stage union merged into one object whose `stage` is an enum, free-form maps
marked x-kubernetes-preserve-unknown-fields.
"""
from __future__ import annotations

import copy
from typing import Any

import yaml

from flashops.api import spec as S

SHORT_NAMES = {"TrainingRun": ["ftr"], "TrainingPipeline": ["ftp"], "ModelDeployment": ["fmd"]}
CATEGORIES = ["flashops", "all"]

PRINTER_COLUMNS = {
    "TrainingRun": [
        {"name": "Stage", "type": "string", "jsonPath": ".spec.stage"},
        {"name": "State", "type": "string", "jsonPath": ".status.state"},
        {"name": "Retries", "type": "integer", "jsonPath": ".status.retries"},
        {"name": "Checkpoint", "type": "string", "jsonPath": ".status.latestCheckpoint", "priority": 1},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    "TrainingPipeline": [
        {"name": "Stage", "type": "string", "jsonPath": ".status.stage"},
        {"name": "State", "type": "string", "jsonPath": ".status.state"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
    "ModelDeployment": [
        {"name": "Source", "type": "string", "jsonPath": ".spec.source"},
        {"name": "State", "type": "string", "jsonPath": ".status.state"},
        {"name": "URL", "type": "string", "jsonPath": ".status.url"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ],
}


def structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """One pydantic JSON-schema node -> a structural OpenAPI v3 node."""
    node = copy.deepcopy(schema)
    if "$ref" in node:
        ref = defs[node.pop("$ref").split("/")[-1]]
        node = {**copy.deepcopy(ref), **node}
        return structural(node, defs)
    for key in ("title", "$defs", "discriminator"):
        node.pop(key, None)
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if "default" in node and node["default"] is None:
        node.pop("default")
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[plain], node[bound] = node[bound], True  # JSON Schema 2020 -> OpenAPI 3.0 form
    if "anyOf" in node or "oneOf" in node:
        variants = [structural(v, defs) for v in node.pop("anyOf", []) + node.pop("oneOf", [])]
        nullable = any(v.get("type") == "null" for v in variants)
        variants = [v for v in variants if v.get("type") != "null"]
        merged = _merge(variants)
        merged.update({k: v for k, v in node.items() if k in ("description", "default", "x-kubernetes-validations")})
        if nullable:
            merged["nullable"] = True
        return merged
    t = node.get("type")
    if t == "object":
        props = node.get("properties")
        addl = node.get("additionalProperties")
        if props:
            node["properties"] = {k: structural(v, defs) for k, v in props.items()}
            node.pop("additionalProperties", None)
        elif isinstance(addl, dict):
            value = structural(addl, defs)
            if "type" in value:
                node["additionalProperties"] = value
            else:  # a map of mixed scalar types (model overrides)
                node.pop("additionalProperties")
                node["x-kubernetes-preserve-unknown-fields"] = True
        else:
            node.pop("additionalProperties", None)
            node["x-kubernetes-preserve-unknown-fields"] = True
    elif t == "array":
        if "prefixItems" in node:  # a fixed-length tuple of one type (betas)
            items = [structural(i, defs) for i in node.pop("prefixItems")]
            node["items"] = items[0]
        elif "items" in node:
            node["items"] = structural(node["items"], defs)
    return node


def _merge(variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Union -> one structural node. Objects: union of properties (enums joined, e.g. stage)."""
    if len(variants) == 1:
        return variants[0]
    types = {v.get("type") for v in variants}
    if types == {"object"}:
        props: dict[str, Any] = {}
        for v in variants:
            for k, p in v.get("properties", {}).items():
                if k in props and "enum" in props[k] and "enum" in p:
                    props[k] = {**props[k], "enum": props[k]["enum"] + [e for e in p["enum"] if e not in props[k]["enum"]]}
                else:
                    props.setdefault(k, p)
        required = set.intersection(*(set(v.get("required", [])) for v in variants))
        common = set.intersection(*(set(v.get("properties", {})) for v in variants))
        for k in set(props) - common:  # a default only some variants have must not land on the others (the
            if "default" in props[k]:  # API server would fill a training stage's `suspend` into an eval stage)
                props[k] = {key: val for key, val in props[k].items() if key != "default"}
        out: dict[str, Any] = {"type": "object", "properties": props}
        if required:
            out["required"] = sorted(required)
        return out
    scalar = [v for v in variants if v.get("type") in ("integer", "number", "string", "boolean")]
    if len(scalar) == len(variants):
        if types <= {"integer", "number"}:
            return {"type": "number"}
        if types <= {"integer", "string"}:
            return {"x-kubernetes-int-or-string": True}
        return {}  # mixed scalars incl. booleans: no structural type; the caller preserves unknown fields
    return variants[0]


def openapi_schema(kind: str) -> dict[str, Any]:
    model = S.KINDS[kind]
    js = model.model_json_schema(by_alias=True, mode="validation")
    defs = js.get("$defs", {})
    spec = structural(js["properties"]["spec"], defs)
    status = structural(js["properties"]["status"], defs)
    status.pop("nullable", None)
    status["x-kubernetes-preserve-unknown-fields"] = True  # kopf writes its own bookkeeping here
    return {
        "type": "object",
        "required": ["spec"],
        "x-kubernetes-validations": S.name_rules(kind),
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd(kind: str) -> dict[str, Any]:
    plural = S.PLURALS[kind]
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{S.API_GROUP}", "labels": {"app.kubernetes.io/part-of": "flashops"}},
        "spec": {
            "group": S.API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": SHORT_NAMES[kind],
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": S.API_VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema(kind)},
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS[kind],
                }
            ],
        },
    }


def all_crds() -> list[dict[str, Any]]:
    return [crd(kind) for kind in S.KINDS]


def crds_yaml() -> str:
    header = "# Generated by `flashops crds` from flashops.api.spec. Do not edit by hand.\n"
    return header + yaml.safe_dump_all(all_crds(), sort_keys=False, width=120)
