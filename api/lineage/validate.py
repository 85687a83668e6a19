"""Input checks shared by the direct-SQL store and the HTTP API. Every error names the field, the value
and the fix. Both databases must accept whatever passes here (PostgreSQL rejects NUL characters and
non-finite JSON numbers; SQLite rejects integers beyond 64 bits)."""
from __future__ import annotations

import math
from typing import Any

from flashops.api.lineage.errors import InvalidInput

LINEAGE_PREFIX = "lineage:"
MAX_ID = 2**63 - 1
RUN_STATUSES = ("running", "succeeded", "failed", "cancelled")
# A run's status only moves forward. `failed` is not final: a resumed attempt of the same run (the operator's
# retry, `flashops run` again) may still succeed, or the user may cancel it; succeeded and cancelled are final.
STATUS_FROM = {"running": ("running",), "failed": ("running", "failed"),
               "succeeded": ("running", "failed", "succeeded"), "cancelled": ("running", "failed", "cancelled")}
_STATUS_SYNONYMS = {"completed": "succeeded", "complete": "succeeded", "success": "succeeded", "done": "succeeded",
                    "error": "failed", "canceled": "cancelled", "started": "running"}


def text(field: str, value: Any, max_len: int, *, required: bool = True) -> str:
    """A string that both databases store as-is."""
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise InvalidInput(f"{field}: expected a string, got {type(value).__name__} {_short(value)}")
    if required and not value:
        raise InvalidInput(f"{field}: must not be empty")
    _storable(field, value)
    size = len(value.encode("utf-8"))
    if size > max_len:  # bytes, not characters: an index row holds bytes (4 per emoji)
        raise InvalidInput(f"{field}: {size} bytes (UTF-8) is too long: at most {max_len} bytes; shorten it")
    return value


def _storable(field: str, value: str) -> None:
    if "\x00" in value:
        raise InvalidInput(f"{field}: contains a NUL character (\\u0000), which SQL text cannot hold: remove it")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInput(f"{field}: not valid UTF-8 (a lone surrogate): send well-formed Unicode") from None


def json_value(field: str, value: Any, _depth: int = 0) -> Any:
    """A JSON document made safe for both databases: non-finite floats (a NaN loss is a real metric) become
    the strings "nan"/"inf"/"-inf"; NUL characters and integers beyond 64 bits are rejected."""
    if _depth > 64:
        raise InvalidInput(f"{field}: nested deeper than 64 levels: flatten it")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_ID:
            raise InvalidInput(f"{field}: integer {_short(value)} does not fit in 64 bits: send it as a string")
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else ("nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))
    if isinstance(value, str):
        _storable(field, value)
        return value
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                k = str(k)
            _storable(f"{field} key", k)
            out[k] = json_value(f"{field}.{k}", v, _depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [json_value(f"{field}[{i}]", v, _depth + 1) for i, v in enumerate(value)]
    raise InvalidInput(f"{field}: {type(value).__name__} is not JSON: use numbers, strings, lists and objects")


def json_object(field: str, value: Any) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"{field}: expected a JSON object, got {type(value).__name__} {_short(value)}")
    return json_value(field, value)


EVAL_MODES = ("thinking", "non-thinking")


def evaluation_result(field: str, value: Any) -> dict:
    """An evaluation's result as `flashops eval --json` prints it: {"suites": [{"name", "sha256", "modes":
    [{"mode": "thinking"|"non-thinking", "accuracy", ...}]}], ...}; other keys are kept as they are."""
    result = json_object(field, value)
    suites = result.get("suites")
    if not isinstance(suites, list) or not suites:
        raise InvalidInput(f"{field}.suites: expected a non-empty list of suites "
                           '(e.g. [{"name": "builtin:chat-smoke", "sha256": "...", "modes": [...]}])')
    for i, suite in enumerate(suites):
        where = f"{field}.suites[{i}]"
        if not isinstance(suite, dict):
            raise InvalidInput(f"{where}: expected an object with name, sha256 and modes")
        text(f"{where}.name", suite.get("name"), 2048)
        modes = suite.get("modes")
        if not isinstance(modes, list):
            raise InvalidInput(f"{where}.modes: expected a list of {{mode, accuracy, ...}} objects")
        for j, mode in enumerate(modes):
            if not isinstance(mode, dict) or mode.get("mode") not in EVAL_MODES:
                got = mode.get("mode") if isinstance(mode, dict) else mode
                raise InvalidInput(f"{where}.modes[{j}].mode: {_short(got)} is not one of {', '.join(EVAL_MODES)}")
    return result


def node_id(field: str, value: Any) -> int:
    """An id as the API hands them out: 42, "42" or "lineage:42"."""
    raw = value
    if isinstance(value, str):
        s = value[len(LINEAGE_PREFIX):] if value.startswith(LINEAGE_PREFIX) else value
        if not is_ascii_number(s):
            raise InvalidInput(f"{field}: {_short(raw)} is not a lineage id: use a number or lineage:<number>")
        value = int(s)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field}: {_short(raw)} is not a lineage id: use a number or lineage:<number>")
    if not 1 <= value <= MAX_ID:
        raise InvalidInput(f"{field}: {_short(raw)} is out of range: ids are 1..{MAX_ID}")
    return value


def is_ascii_number(s: str) -> bool:
    """"42", not "¹" or "٤٢": str.isdigit() accepts every Unicode digit, and int() then fails or decodes
    Arabic-Indic digits as an id nobody wrote."""
    return s.isascii() and s.isdigit()


def is_id(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and (is_ascii_number(value) or value.startswith(LINEAGE_PREFIX))


def status(value: Any) -> str:
    s = text("status", value, 16).strip().lower()
    s = _STATUS_SYNONYMS.get(s, s)
    if s not in RUN_STATUSES:
        raise InvalidInput(f"status: {_short(value)} is not one of {', '.join(RUN_STATUSES)}")
    return s


def optional_int(field: str, value: Any, lo: int = -MAX_ID, hi: int = MAX_ID) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"{field}: expected an integer, got {_short(value)}")
    if not lo <= value <= hi:
        raise InvalidInput(f"{field}: {value} is out of range {lo}..{hi}")
    return value


def _short(value: Any) -> str:
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."
