"""Training data: the builtin corpora (generated, nothing to download) and user data from JSONL or
Parquet at file:// or s3:// URIs. Every dataset is indexable and deterministic: example i is the same
in every process and after every restart, so the data position of a run is just its step.

    from flashops.trainers.corpora import open_dataset
    ds = open_dataset("builtin:sft-chat", stage="sft", seed=0)
    ds[0]    # {'messages': [...], 'thinking': True}

Examples per stage (user rows must have these keys):
    pretrain  {"text": str}
    sft       {"messages": [{"role", "content", "reasoning"?}, ...], "thinking": bool?}
    dpo       {"prompt": str | messages, "chosen": str, "rejected": str}
    rl        {"question": str, "answer": str, "domain": str?, "level": int?}
"""
from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flashops.trainers.errors import DataError
from flashops.trainers.tasks import DOMAINS, LEVELS, Task, make_task, random_task, task_pool, wrong_answer

BUILTIN = {
    "pretrain-text": "pretrain",
    "sft-chat": "sft",
    "dpo-pairs": "dpo",
    "rl-tasks": "rl",
}
DEFAULT_DATA = {stage: f"builtin:{name}" for name, stage in BUILTIN.items()}
REQUIRED_KEYS = {"pretrain": ("text",), "sft": ("messages",), "dpo": ("prompt", "chosen", "rejected"),
                 "rl": ("question", "answer")}
RL_POOL_PER_LEVEL = 24  # builtin RL pool: 4 domains x 3 levels x 24 = 288 prompts
EVAL_SEED_OFFSET = 10_007  # held-out evaluation prompts use another seed than the training pool


def _rng(seed: int, index: int, salt: str) -> random.Random:
    return random.Random(f"{salt}:{seed}:{index}")  # str seeds hash deterministically (sha512)


# ------------------------------------------------------------------------------- builtin generators


def pretrain_document(rng: random.Random) -> str:
    """A few question/answer lines in plain text, some with the worked reasoning."""
    lines = []
    for _ in range(rng.randint(3, 6)):
        t = random_task(rng)
        if rng.random() < 0.3:
            lines.append(f"{t.question} {t.reasoning}. So the answer is {t.answer}.")
        else:
            lines.append(f"{t.question} {t.answer}")
    return "\n".join(lines)


def task_messages(t: Task) -> list[dict]:
    return [{"role": "user", "content": t.question},
            {"role": "assistant", "content": t.answer, "reasoning": t.reasoning}]


def sft_example(rng: random.Random, thinking_ratio: float = 0.5) -> dict:
    t = random_task(rng)
    messages = task_messages(t)
    if rng.random() < 0.15:  # a system line sometimes, so the template's system turn is seen
        messages.insert(0, {"role": "system", "content": "Answer briefly."})
    return {"messages": messages, "thinking": rng.random() < thinking_ratio}


def dpo_example(rng: random.Random) -> dict:
    t = random_task(rng)
    return {"prompt": [{"role": "user", "content": t.question}], "chosen": t.answer,
            "rejected": wrong_answer(t, rng)}


class BuiltinDataset:
    """An endless, seeded corpus: item i is generated from (seed, i)."""

    def __init__(self, name: str, seed: int, params: Any = None):
        self.name, self.seed, self.params = name, seed, params
        self.stage = BUILTIN[name]
        self.pool = task_pool(RL_POOL_PER_LEVEL, seed) if self.stage == "rl" else None

    def __len__(self) -> int:
        return len(self.pool) if self.pool is not None else 2**62

    def __getitem__(self, i: int) -> dict:
        rng = _rng(self.seed, i, self.name)
        if self.stage == "pretrain":
            return {"text": pretrain_document(rng)}
        if self.stage == "sft":
            ratio = getattr(self.params, "thinking_ratio", 0.5)
            return sft_example(rng, ratio)
        if self.stage == "dpo":
            return dpo_example(rng)
        return self.pool[i].to_dict()

    @property
    def uri(self) -> str:
        return f"builtin:{self.name}"


def eval_tasks(n_per_domain_level: int = 4, seed: int = 0, domains: tuple[str, ...] = DOMAINS) -> list[Task]:
    """Held-out RL prompts (disjoint seed from the training pool) for the before/after comparison."""
    return task_pool(n_per_domain_level, seed + EVAL_SEED_OFFSET, domains)


# ------------------------------------------------------------------------------- user data


@dataclass
class RowsDataset:
    uri: str
    rows: list[dict]
    stage: str

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i % len(self.rows)]


def _read_bytes(uri: str) -> bytes:
    if uri.startswith("file://"):
        path = Path(uri[len("file://"):])
        if not path.is_file():
            raise DataError(f"data.uri {uri!r}: no such file ({path}); check the path (file:// URIs are absolute, "
                            "e.g. file:///data/sft.jsonl)")
        return path.read_bytes()
    if uri.startswith("s3://"):
        from flashops.storage import ObjectNotFoundError, StoreError, open_store

        bucket, _, key = uri[len("s3://"):].partition("/")
        if not key:
            raise DataError(f"data.uri {uri!r}: name an object, e.g. s3://datasets/sft.jsonl")
        try:
            return bytes(open_store(f"s3://{bucket}").backend.get_bytes(key))
        except ObjectNotFoundError as e:
            raise DataError(f"data.uri {uri!r}: no such object in bucket {bucket!r}; upload it first") from e
        except StoreError as e:
            raise DataError(f"data.uri {uri!r}: cannot read it: {e}") from e
    raise DataError(f"data.uri {uri!r}: use builtin:NAME, file:///path or s3://bucket/key")


def _parse_rows(uri: str, data: bytes, fmt: str) -> list[dict]:
    if fmt == "auto":
        fmt = "parquet" if uri.endswith(".parquet") or data[:4] == b"PAR1" else "jsonl"
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(io.BytesIO(data)).to_pylist()
        except Exception as e:  # pyarrow raises several types for a bad file
            raise DataError(f"data.uri {uri!r}: not a readable Parquet file ({e}); set data.format to match") from e
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data.uri {uri!r} line {n}: not JSON ({e.msg}); one JSON object per line") from e
        if not isinstance(row, dict):
            raise DataError(f"data.uri {uri!r} line {n}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def open_dataset(uri: str, stage: str, seed: int = 0, fmt: str = "auto", params: Any = None):
    """The dataset at `uri` for `stage`, checked (exists, readable, right keys) before any compute."""
    if uri.startswith("builtin:"):
        name = uri[len("builtin:"):]
        if name not in BUILTIN:
            raise DataError(f"data.uri {uri!r}: no such builtin corpus; use one of "
                            + ", ".join(f"builtin:{n}" for n in BUILTIN))
        if BUILTIN[name] != stage:
            raise DataError(f"data.uri {uri!r} is the {BUILTIN[name]} corpus but this is a {stage} run: "
                            f"use {DEFAULT_DATA[stage]}")
        return BuiltinDataset(name, seed, params)
    rows = _parse_rows(uri, _read_bytes(uri), fmt)
    if not rows:
        raise DataError(f"data.uri {uri!r}: no rows; a {stage} run needs rows with keys {REQUIRED_KEYS[stage]}")
    for i, row in enumerate(rows[:1000]):
        missing = [k for k in REQUIRED_KEYS[stage] if k not in row]
        if missing:
            raise DataError(f"data.uri {uri!r} row {i}: missing key(s) {missing}; a {stage} row needs "
                            f"{list(REQUIRED_KEYS[stage])}")
    return RowsDataset(uri, rows, stage)


def row_task(row: dict) -> Task:
    """An RL row as a Task (user rows may leave out domain and level)."""
    domain = row.get("domain") or "custom"
    level = int(row.get("level") or 1)
    return Task(domain, level if level in LEVELS else 1, str(row["question"]), str(row["answer"]),
                str(row.get("reasoning", "")))


__all__ = ["BUILTIN", "DEFAULT_DATA", "open_dataset", "eval_tasks", "row_task", "make_task", "DataError"]
