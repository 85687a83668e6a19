"""Evaluation suites and their figures, decided once for `flashops eval`, the pipeline's eval stage and the
promotion gates (torch-free: the operator and the lineage API read results too).

A suite is JSONL, one task per line:

    {"prompt": "What is 2 + 3?", "answer": "5", "match": "number", "domain": "arithmetic", "thinking": null}

- match: how the generated answer is compared with `answer`:
    exact     equal after trimming whitespace at both ends
    number    the first number in the answer equals the expected number (5, 5.0, -3, 1e3)
    regex     `answer` is a regular expression that matches the whole generated answer (trimmed)
    contains  `answer` is a substring of the generated answer
- thinking: true (thinking mode only), false (non-thinking only), null or absent (both modes). In thinking mode
  only the text after the reasoning block (`</think>`) is compared.
- domain: optional (default "default"); accuracy is also reported per domain.

    suite = parse_suite("file:///data/qa.jsonl", data)         # SuiteError names the file, line, field and fix
    matches("number", "The answer is 5.", "5")                 # True

Builtin suites: `builtin:chat-smoke` (here) and `builtin:rl-heldout` (the RL task domains on prompts training
never samples; flashops.trainers.tasks owns that split). The result of an evaluation (`result_dict`) is what
`flashops eval --json` prints and what lineage records on the evaluated checkpoint or model.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

MATCH_RULES = ("exact", "number", "regex", "contains")
MODES = ("thinking", "non-thinking")
SUITE_SCHEMES = ("builtin:", "file://", "s3://")
ACCEPTANCE_K = (1, 2, 3)
TASK_FIELDS = ("prompt", "answer", "match", "domain", "thinking")
EXAMPLE_LINE = '{"prompt": "What is 2 + 3?", "answer": "5", "match": "number", "domain": "arithmetic", "thinking": null}'


class SuiteError(ValueError):
    """A suite that cannot be used (bad line, unknown builtin, unreadable file): a usage error, exit 2."""


@dataclass(frozen=True)
class SuiteTask:
    prompt: str
    answer: str
    match: str = "exact"
    domain: str = "default"
    thinking: bool | None = None
    line: int = 0

    @property
    def modes(self) -> tuple[str, ...]:
        if self.thinking is None:
            return MODES
        return ("thinking",) if self.thinking else ("non-thinking",)


@dataclass(frozen=True)
class Suite:
    name: str  # the URI it was given as (builtin:chat-smoke, file:///..., s3://...)
    sha256: str  # "sha256:<hex>" of its content: what lineage records, so a changed suite is a new suite
    tasks: tuple[SuiteTask, ...]

    def tasks_in(self, mode: str) -> list[SuiteTask]:
        return [t for t in self.tasks if mode in t.modes]


def content_hash(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def check_suite_uri(uri: str) -> str:
    if not isinstance(uri, str) or not uri.startswith(SUITE_SCHEMES):
        raise SuiteError(f"suite {uri!r}: use builtin:NAME ({', '.join(BUILTIN_SUITES)}), file:///path/suite.jsonl "
                         "or s3://bucket/suite.jsonl")
    return uri


def parse_suite(name: str, data: bytes) -> Suite:
    """A JSONL suite -> Suite. Every error names the suite, the line number, the field and the fix."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SuiteError(f"{name}: not UTF-8 text (byte {e.start}): save the suite as UTF-8 JSONL") from None
    tasks = []
    for n, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        where = f"{name} line {n}"
        try:
            row = json.loads(raw)
        except json.JSONDecodeError as e:
            raise SuiteError(f"{where}: not valid JSON ({e.msg} at column {e.colno}): write one JSON object per line, "
                             f"e.g. {EXAMPLE_LINE}") from None
        tasks.append(task_from_row(row, where, n))
    if not tasks:
        raise SuiteError(f"{name}: no tasks (empty file): write one JSON object per line, e.g. {EXAMPLE_LINE}")
    return Suite(name, content_hash(data), tuple(tasks))


def task_from_row(row: Any, where: str, line: int = 0) -> SuiteTask:
    if not isinstance(row, dict):
        raise SuiteError(f"{where}: a {type(row).__name__}, not an object: write {EXAMPLE_LINE}")
    unknown = sorted(set(row) - set(TASK_FIELDS))
    if unknown:
        raise SuiteError(f"{where}: field {unknown[0]!r} is not a task field: use only {', '.join(TASK_FIELDS)}")
    for key in ("prompt", "answer"):
        value = row.get(key)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if key not in row else f"{value!r} is not a non-empty string"
            raise SuiteError(f"{where}: field '{key}': {got}: give the {key} as a string, e.g. {EXAMPLE_LINE}")
    match = row.get("match", "exact")
    if match not in MATCH_RULES:
        raise SuiteError(f"{where}: field 'match': {match!r} is not a match rule: use one of {', '.join(MATCH_RULES)}")
    domain = row.get("domain", "default")
    if not isinstance(domain, str) or not domain:
        raise SuiteError(f"{where}: field 'domain': {domain!r} is not a non-empty string: name the domain, e.g. "
                         '"arithmetic", or leave the field out')
    thinking = row.get("thinking")
    if thinking is not None and not isinstance(thinking, bool):
        raise SuiteError(f"{where}: field 'thinking': {thinking!r} is not true, false or null: use true (thinking "
                         "mode only), false (non-thinking only) or null (both modes)")
    answer = row["answer"]
    if match == "regex":
        try:
            re.compile(answer)
        except re.error as e:
            raise SuiteError(f"{where}: field 'answer': {answer!r} is not a valid regular expression ({e}): fix it "
                             "or use match exact or contains") from None
    if match == "number" and first_number(answer) is None:
        raise SuiteError(f"{where}: field 'answer': {answer!r} holds no number for match 'number': give a number, "
                         "e.g. \"42\", or use match exact")
    return SuiteTask(row["prompt"], answer, match, domain, thinking, line)


def suite_from_rows(name: str, rows: Iterable[dict]) -> Suite:
    """A builtin suite from its rows; hashed as the JSONL a user would write for it."""
    rows = list(rows)
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode()
    return parse_suite(name, data)


# ------------------------------------------------------------------------------------------ matching

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def first_number(text: str) -> float | None:
    m = _NUMBER.search(text)
    return float(m.group()) if m else None


def matches(rule: str, generated: str, expected: str) -> bool:
    """Does the generated answer (already without its reasoning block) count as `expected` under `rule`?"""
    got = generated.strip()
    if rule == "exact":
        return got == expected.strip()
    if rule == "number":
        a, b = first_number(got), first_number(expected)
        return a is not None and b is not None and a == b
    if rule == "regex":
        return re.fullmatch(expected, got, flags=re.DOTALL) is not None
    if rule == "contains":
        return expected in got
    raise ValueError(f"match {rule!r}: use one of {', '.join(MATCH_RULES)}")


# ------------------------------------------------------------------------------------------ builtin suites

# Chat smoke: short questions in the shape the builtin corpora teach, one per domain and match rule, both modes.
CHAT_SMOKE = [
    {"prompt": "What is 2 + 3?", "answer": "5", "match": "number", "domain": "arithmetic"},
    {"prompt": "What is 14 + 5?", "answer": "19", "match": "exact", "domain": "arithmetic"},
    {"prompt": "Sort: 3 1 2", "answer": "1 2 3", "match": "exact", "domain": "sorting"},
    {"prompt": "Sort: 9 4 7 4", "answer": "4 4 7 9", "match": "contains", "domain": "sorting"},
    {"prompt": "Count a in: abca", "answer": "2", "match": "number", "domain": "counting"},
    {"prompt": "Count b in: bbcab", "answer": "3", "match": "regex", "domain": "counting"},
    {"prompt": "Reverse: abc", "answer": "cba", "match": "exact", "domain": "string"},
    {"prompt": "Reverse: hijf", "answer": "fjih", "match": "contains", "domain": "string"},
]
BUILTIN_SUITES = ("rl-heldout", "chat-smoke")


def chat_smoke() -> Suite:
    return suite_from_rows("builtin:chat-smoke", CHAT_SMOKE)


# ------------------------------------------------------------------------------------------ figures


@dataclass
class TaskOutcome:
    task: SuiteTask
    mode: str
    answer: str  # the compared text (after the reasoning block in thinking mode)
    text: str  # everything generated
    tokens: int
    correct: bool


@dataclass
class ModeRun:
    """One suite in one mode: the answering pass's outcomes, and the acceptance length at each k measured."""
    mode: str
    outcomes: list[TaskOutcome] = field(default_factory=list)
    acceptance: dict[int, float | None] = field(default_factory=dict)
    wall_s: float = 0.0

    def figures(self) -> dict:
        n = len(self.outcomes)
        accuracy = sum(o.correct for o in self.outcomes) / n if n else 0.0
        mean_tokens = sum(o.tokens for o in self.outcomes) / n if n else 0.0
        domains: dict[str, list[bool]] = {}
        for o in self.outcomes:
            domains.setdefault(o.task.domain, []).append(o.correct)
        return {"mode": self.mode, "accuracy": round(accuracy, 6), "mean_tokens": round(mean_tokens, 3),
                "accuracy_per_1k_tokens": round(1000.0 * accuracy / mean_tokens, 4) if mean_tokens else None,
                "acceptance_length": {str(k): (None if v is None else round(v, 4))
                                      for k, v in sorted(self.acceptance.items())},
                "per_domain": {d: round(sum(v) / len(v), 6) for d, v in sorted(domains.items())},
                "tasks": n, "wall_s": round(self.wall_s, 3)}


def suite_result(suite: Suite, runs: list[ModeRun], wall_s: float) -> dict:
    return {"name": suite.name, "sha256": suite.sha256, "tasks": len(suite.tasks),
            "modes": [r.figures() for r in runs], "wall_s": round(wall_s, 3)}


def mode_figures(result: dict, suite: str, mode: str) -> dict | None:
    """The figures of one suite and mode in a recorded result (None when it was not evaluated)."""
    for s in result.get("suites") or []:
        if s.get("name") == suite:
            for m in s.get("modes") or []:
                if m.get("mode") == mode:
                    return m
    return None
