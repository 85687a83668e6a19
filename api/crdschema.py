"""Validate objects against a CRD's openAPIV3Schema the way the API server does: structure and CEL rules.

A plain JSON-Schema validator does not know the Kubernetes extensions; this module translates them:
`nullable` (null allowed), `x-kubernetes-int-or-string` (integer or string), and
`x-kubernetes-preserve-unknown-fields` (anything goes below). On top of that it checks what the API
server checks beyond JSON Schema:

- `x-kubernetes-validations` (CEL rules), evaluated with the `common-expression-language` package:
  `self` is the value at the rule's node, typed by the schema (a `number` field is a CEL double even when
  written as `1`); transition rules (those naming `oldSelf`) run only on updates, where the old value at
  the same place exists (object fields and list-map entries correlate; atomic/set lists do not);
  `messageExpression` and `fieldPath` are honoured. A rule that fails to evaluate is an error, as on the server.
- `x-kubernetes-list-type: map` / `set`: duplicate keys / items are rejected.

Used for our own generated CRDs, for the upstream Kubeflow and KServe CRDs, and by the test API emulator.

    from flashops.api.crdschema import CRDValidator
    v = CRDValidator.from_file("tests/fixtures/crds/trainer.kubeflow.org_trainjobs.yaml")
    v.errors(trainjob)              # ["<root>: must be a valid RFC 1035 label ..."] for metadata.name 9lives
    v.errors(new, old=previous)     # an update: transition rules such as `self == oldSelf` run too
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import jsonschema
import yaml

_MISSING = object()


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


def apply_defaults(obj: Any, schema: dict | None) -> Any:
    """Fill `default`s of the structural schema into objects that exist, as the API server does."""
    if not isinstance(schema, dict) or not isinstance(obj, dict):
        if isinstance(obj, list) and isinstance(schema, dict) and isinstance(schema.get("items"), dict):
            return [apply_defaults(i, schema["items"]) for i in obj]
        return obj
    for name, sub in (schema.get("properties") or {}).items():
        if name not in obj and isinstance(sub, dict) and "default" in sub:
            obj[name] = copy.deepcopy(sub["default"])
        if name in obj:
            obj[name] = apply_defaults(obj[name], sub)
    addl = schema.get("additionalProperties")
    if isinstance(addl, dict):
        for name in obj:
            obj[name] = apply_defaults(obj[name], addl)
    return obj


# ------------------------------------------------------------------------------------------- CEL rules


@lru_cache(maxsize=4096)
def _program(expression: str) -> Any:
    import cel  # common-expression-language: CEL in Rust (the same regex semantics as the server's RE2)

    return cel.compile(expression)


def _is_transition(rule: dict) -> bool:
    return "oldSelf" in rule.get("rule", "")


def _typed(value: Any, schema: dict | None) -> Any:
    """The value as the API server hands it to CEL: `number` fields are doubles even when written as ints."""
    if not isinstance(schema, dict):
        return value
    t = schema.get("type")
    if t == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t == "object" and isinstance(value, dict):
        props = schema.get("properties") or {}
        addl = schema.get("additionalProperties")
        return {k: _typed(v, props.get(k, addl if isinstance(addl, dict) else None)) for k, v in value.items()}
    if t == "array" and isinstance(value, list):
        return [_typed(v, schema.get("items")) for v in value]
    return value


def _matches_type(value: Any, schema: dict) -> bool:
    t = schema.get("type")
    if value is None:
        return False
    return {"object": isinstance(value, dict), "array": isinstance(value, list),
            "string": isinstance(value, str), "boolean": isinstance(value, bool),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool)}.get(t, True)


def _join(path: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)


class _RuleWalker:
    """Evaluates every x-kubernetes-validations rule of a schema against one object (and its old version)."""

    def __init__(self, schema: dict):
        self.schema = schema
        self._has_rules: dict[int, bool] = {}

    def has_rules(self, node: Any) -> bool:
        """Does this subtree hold any rule or list-type constraint? (skips most of a 10k-line upstream schema)."""
        if not isinstance(node, dict):
            return False
        key = id(node)
        if key not in self._has_rules:
            self._has_rules[key] = False  # cycles cannot happen in structural schemas; this guards anyway
            found = bool(node.get("x-kubernetes-validations")) or node.get("x-kubernetes-list-type") in ("map", "set")
            children = list((node.get("properties") or {}).values())
            for k in ("items", "additionalProperties"):
                if isinstance(node.get(k), dict):
                    children.append(node[k])
            self._has_rules[key] = found or any(self.has_rules(c) for c in children)
        return self._has_rules[key]

    def errors(self, value: Any, old: Any = _MISSING) -> list[str]:
        return list(self._walk(self.schema, value, old, ""))

    def _walk(self, schema: dict, value: Any, old: Any, path: str) -> Iterator[str]:
        if not self.has_rules(schema) or not _matches_type(value, schema):
            return
        t = schema.get("type")
        if t == "object":
            props = schema.get("properties") or {}
            addl = schema.get("additionalProperties")
            for k, v in value.items():
                sub = props.get(k, addl if isinstance(addl, dict) else None)
                if sub is not None:
                    prev = old.get(k, _MISSING) if isinstance(old, dict) else _MISSING
                    yield from self._walk(sub, v, prev, _join(path, k))
        elif t == "array":
            yield from self._list_type(schema, value, path)
            items = schema.get("items")
            if isinstance(items, dict):
                olds = self._correlate(schema, value, old)
                for i, v in enumerate(value):
                    yield from self._walk(items, v, olds[i], _join(path, i))
        yield from self._rules(schema, value, old, path)

    @staticmethod
    def _list_type(schema: dict, value: list, path: str) -> Iterator[str]:
        lt = schema.get("x-kubernetes-list-type")
        if lt == "set":
            seen = []
            for i, v in enumerate(value):
                if v in seen:
                    yield f"{_join(path, i)}: Duplicate value: {json.dumps(v)}"
                seen.append(v)
        elif lt == "map":
            keys = schema.get("x-kubernetes-list-map-keys") or []
            seen_keys: list = []
            for i, v in enumerate(value):
                if not isinstance(v, dict):
                    continue
                k = {name: v.get(name) for name in keys}
                if k in seen_keys:
                    yield f"{_join(path, i)}: Duplicate value: {json.dumps(k)}"
                seen_keys.append(k)

    @staticmethod
    def _correlate(schema: dict, value: list, old: Any) -> list[Any]:
        """Old entry for each new entry: only list-type map entries correlate (by their keys), as on the server."""
        if schema.get("x-kubernetes-list-type") != "map" or not isinstance(old, list):
            return [_MISSING] * len(value)
        keys = schema.get("x-kubernetes-list-map-keys") or []
        index = {tuple(o.get(k) for k in keys): o for o in old if isinstance(o, dict)}
        return [index.get(tuple(v.get(k) for k in keys), _MISSING) if isinstance(v, dict) else _MISSING for v in value]

    def _rules(self, schema: dict, value: Any, old: Any, path: str) -> Iterator[str]:
        rules = schema.get("x-kubernetes-validations") or []
        if not rules:
            return
        typed = _typed(value, schema)
        old_typed = _typed(old, schema) if old is not _MISSING else _MISSING
        for rule in rules:
            if _is_transition(rule) and old_typed is _MISSING:
                continue  # a create, or no old value at this place: transition rules do not apply
            context = {"self": typed} if old_typed is _MISSING else {"self": typed, "oldSelf": old_typed}
            where = path or "<root>"
            if rule.get("fieldPath"):
                where = (path or "") + rule["fieldPath"] if rule["fieldPath"].startswith(".") else rule["fieldPath"]
                where = where.lstrip(".") or "<root>"
            try:
                ok = _program(rule["rule"]).execute(context)
            except Exception as e:  # noqa: BLE001 - the server reports evaluation errors as invalid too
                yield f"{where}: Invalid value: rule {rule['rule']!r} could not be evaluated: {e}"
                continue
            if ok is True:
                continue
            message = rule.get("message") or f"failed rule: {rule['rule']}"
            if rule.get("messageExpression"):
                try:
                    message = str(_program(rule["messageExpression"]).execute(context)) or message
                except Exception:  # noqa: BLE001 - the server falls back to `message` too
                    pass
            yield f"{where}: Invalid value: {message}"


# ------------------------------------------------------------------------------------------- validators


class SchemaValidator:
    """One openAPIV3Schema: JSON-Schema structure plus CEL rules and list types."""

    def __init__(self, schema: dict[str, Any]):
        self.schema = schema
        self._structure = jsonschema.Draft202012Validator(to_json_schema(schema))
        self._rules = _RuleWalker(schema)

    def errors(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> list[str]:
        """Problems, one line each ("path: what"); `old` is the stored object on an update (transition rules).
        The schema's defaults are filled in first (on a copy), as the server does before it validates."""
        obj = apply_defaults(copy.deepcopy(obj), self.schema)
        if old is not None:  # stored objects were defaulted when written
            old = apply_defaults(copy.deepcopy(old), self.schema)
        problems = []
        for e in sorted(self._structure.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
            path = ".".join(str(p) for p in e.absolute_path) or "<root>"
            problems.append(f"{path}: {e.message}")
        problems += self._rules.errors(obj, _MISSING if old is None else old)
        return problems


class CRDValidator(SchemaValidator):
    def __init__(self, crd: dict[str, Any], version: str | None = None):
        versions = crd["spec"]["versions"]
        chosen = next((v for v in versions if v["name"] == version), None) if version else (
            next((v for v in versions if v.get("storage")), versions[0]))
        if chosen is None:
            raise ValueError(f"CRD {crd['metadata']['name']} has no version {version!r}")
        self.kind = crd["spec"]["names"]["kind"]
        self.api_version = f"{crd['spec']['group']}/{chosen['name']}"
        super().__init__(chosen["schema"]["openAPIV3Schema"])

    @classmethod
    def from_file(cls, path: str | Path, version: str | None = None) -> "CRDValidator":
        return _cached(str(path), version)

    def validate(self, obj: dict[str, Any], old: dict[str, Any] | None = None) -> None:
        problems = self.errors(obj, old)
        if problems:
            name = obj.get("metadata", {}).get("name", "?")
            raise ValueError(f"{self.kind}/{name} does not match the {self.api_version} CRD schema:\n  " + "\n  ".join(problems))


def rules(schema: dict[str, Any]) -> Iterator[tuple[str, dict]]:
    """Every (schema path, rule) in a schema: to compile-check a CRD's rules."""
    def walk(node: Any, path: str) -> Iterator[tuple[str, dict]]:
        if not isinstance(node, dict):
            return
        for r in node.get("x-kubernetes-validations") or []:
            yield path or "<root>", r
        for k, sub in (node.get("properties") or {}).items():
            yield from walk(sub, _join(path, k))
        if isinstance(node.get("items"), dict):
            yield from walk(node["items"], path + "[]")
        if isinstance(node.get("additionalProperties"), dict):
            yield from walk(node["additionalProperties"], path + "{}")

    yield from walk(schema, "")


def compile_rule(expression: str) -> Any:
    """Compile one CEL expression (raises on a syntax error), cached."""
    return _program(expression)


@lru_cache(maxsize=None)
def _cached(path: str, version: str | None) -> CRDValidator:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return CRDValidator(yaml.load(Path(path).read_text(), Loader=loader), version)
