"""Training data: the builtin corpora (generated, nothing to download) and user data from JSONL or
Parquet at file:// or s3:// URIs. Every dataset is deterministic: a builtin corpus is indexable (example i is
the same in every process and after every restart); user rows are streamed by position (`RawDataset.read`),
and trainers/loader.py keeps the cursor.

    from flashops.trainers.corpora import open_dataset
    ds = open_dataset("builtin:sft-chat", stage="sft", seed=0)
    ds[0]    # {'messages': [...], 'thinking': True}

User data may be one object, a prefix or a glob (`s3://bucket/corpus/`, `file:///data/*.parquet`): the
shards are listed once, sorted by key, and streamed (`list_shards`, `iter_rows`, `RawDataset.read`); never
read whole. A prefix that holds a prepared dataset (`flashops data prepare`, a manifest.json) is opened as
token shards instead.

Examples per stage (user rows must have these keys):
    pretrain  {"text": str}
    sft       {"messages": [{"role", "content", "reasoning"?}, ...], "thinking": bool?}
    dpo       {"prompt": str | messages, "chosen": response, "rejected": response, "thinking": bool?}
              a response is a str, an assistant message {"content", "reasoning"?}, or a list of messages
              (TRL's conversational form); "thinking": true renders both with their reasoning
    rl        {"question": str, "answer": str, "domain": str?, "level": int?}
"""
from __future__ import annotations

import bisect
import fnmatch
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from flashops.api import spec as S
from flashops.trainers.errors import DataError
from flashops.trainers.tasks import (DOMAINS, LEVELS, Task, heldout_tasks, make_task, random_task, task_pool,
                                     wrong_answer)

BUILTIN = {
    "pretrain-text": "pretrain",
    "sft-chat": "sft",
    "dpo-pairs": "dpo",
    "rl-tasks": "rl",
}
DEFAULT_DATA = S.DEFAULT_DATA  # decided in the spec (the operator records it in lineage too)
assert DEFAULT_DATA == {stage: f"builtin:{name}" for name, stage in BUILTIN.items()}
REQUIRED_KEYS = {"pretrain": ("text",), "sft": ("messages",), "dpo": ("prompt", "chosen", "rejected"),
                 "rl": ("question", "answer")}
RL_POOL_PER_LEVEL = 24  # builtin RL pool: 4 domains x 3 levels x 24 = 288 prompts
BUILTIN_PARAMS = {"sft": S.SFTParams, "dpo": S.DPOParams}  # the knobs of those corpora; defaults live in the spec


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


def dpo_example(rng: random.Random, thinking_ratio: float = 0.0) -> dict:
    """A (right, wrong) answer pair. In thinking mode both carry the task's worked reasoning and differ only in
    the answer after it: the DPO margin is on the answer tokens, and RPO's NLL term keeps the reasoning."""
    t = random_task(rng)
    wrong = wrong_answer(t, rng)
    prompt, answer = task_messages(t)
    if thinking_ratio > 0 and rng.random() < thinking_ratio:
        return {"prompt": [prompt], "thinking": True, "chosen": answer, "rejected": {**answer, "content": wrong}}
    return {"prompt": [prompt], "chosen": t.answer, "rejected": wrong}


def response_messages(response: Any, where: str) -> list[dict]:
    """A DPO row's chosen or rejected side as assistant messages: the answer (a str or number), one message dict
    ({"content", "reasoning"?}, the role defaulting to assistant) or a list of messages."""
    if isinstance(response, (str, int, float)) and not isinstance(response, bool):  # a numeric Parquet column too
        return [{"role": "assistant", "content": str(response)}]
    if isinstance(response, dict):
        return [{"role": "assistant", **response}]
    if isinstance(response, list) and response and all(isinstance(m, dict) for m in response):
        return response
    raise DataError(f"{where}: {type(response).__name__} {repr(response)[:60]} is not a response: use a string, "
                    '{"content": ..., "reasoning": ...} or a list of {"role": "assistant", "content": ...} messages')


class BuiltinDataset:
    """An endless, seeded corpus: item i is generated from (seed, i)."""

    def __init__(self, name: str, seed: int, params: Any = None):
        self.name, self.seed = name, seed
        self.stage = BUILTIN[name]
        if params is None and self.stage in BUILTIN_PARAMS:
            params = BUILTIN_PARAMS[self.stage]()
        self.params = params
        self.pool = task_pool(RL_POOL_PER_LEVEL, seed) if self.stage == "rl" else None

    def __len__(self) -> int:
        return len(self.pool) if self.pool is not None else 2**62

    def __getitem__(self, i: int) -> dict:
        rng = _rng(self.seed, i, self.name)
        if self.stage == "pretrain":
            return {"text": pretrain_document(rng)}
        if self.stage == "sft":
            return sft_example(rng, self.params.thinking_ratio)
        if self.stage == "dpo":
            return dpo_example(rng, self.params.thinking_ratio)
        return self.pool[i].to_dict()

    @property
    def uri(self) -> str:
        return f"builtin:{self.name}"


def eval_tasks(n_per_domain_level: int = 4, seed: int = 0, domains: tuple[str, ...] = DOMAINS) -> list[Task]:
    """Held-out RL prompts (the split training never samples, flashops.trainers.tasks) for the before/after
    comparison."""
    return heldout_tasks(n_per_domain_level, seed, domains)


# ------------------------------------------------------------------------------- user data


# ------------------------------------------------------------------------------- shards: prefixes and globs

SHARD_SUFFIXES = (".jsonl", ".json", ".parquet")
_GLOB = "*?["


@dataclass(frozen=True)
class SourceShard:
    """One object of a user dataset: `key` inside `backend` (an ObjectBackend of flashops.storage)."""

    uri: str
    key: str
    size: int
    backend: Any

    def format(self, fmt: str = "auto") -> str:
        if fmt != "auto":
            return fmt
        if self.key.endswith(".parquet"):
            return "parquet"
        if self.key.endswith((".jsonl", ".json")) or self.size < 4:
            return "jsonl"
        return "parquet" if bytes(self.backend.read_range(self.key, 0, 4)) == b"PAR1" else "jsonl"


def _container(uri: str) -> tuple[str, str]:
    """'s3://b/corpus/x-*.jsonl' -> ('s3://b', 'corpus/x-*.jsonl'); 'file:///data/a' -> ('file:///', 'data/a')."""
    if uri.startswith("file://"):
        path = uri[len("file://"):]
        if not path.startswith("/"):
            raise DataError(f"data.uri {uri!r}: file:// URIs are absolute, e.g. file:///data/corpus/ (three slashes)")
        return "file:///", path.lstrip("/")
    if uri.startswith("s3://"):
        bucket, _, key = uri[len("s3://"):].partition("/")
        return f"s3://{bucket}", key
    raise DataError(f"data.uri {uri!r}: use builtin:NAME, file:///path or s3://bucket/key")


def is_pattern(uri: str) -> bool:
    """A prefix (ends with '/', or a local directory) or a glob, rather than one object."""
    if any(c in uri for c in _GLOB) or uri.endswith("/"):
        return True
    return uri.startswith("file://") and Path(uri[len("file://"):]).is_dir()


def _no_such_object(uri: str, root: str, key: str) -> None:
    if root.startswith("file://"):
        raise DataError(f"data.uri {uri!r}: no such file (/{key}); check the path (file:// URIs are absolute, "
                        "e.g. file:///data/sft.jsonl, or name a directory or glob of shards)")
    raise DataError(f"data.uri {uri!r}: no such object in bucket {root[len('s3://'):]!r}; upload it first (or end "
                    "the URI with / for a prefix of shards)")


def list_shards(uri: str) -> list[SourceShard]:
    """The objects `uri` names, listed once and sorted by key: one object, every *.jsonl/*.json/*.parquet under
    a prefix (recursively), or the keys matching a glob. Raises DataError when nothing matches."""
    from flashops.storage import StoreError, open_store

    root, rest = _container(uri)
    try:
        backend = open_store(root).backend
        if not backend.ensure_ready(for_write=False):
            raise DataError(f"data.uri {uri!r}: {root} does not exist; check the bucket or directory")
        if any(c in rest for c in _GLOB):
            literal = rest[: min(rest.find(c) for c in _GLOB if c in rest)]
            found = [o for o in backend.list(literal[: literal.rfind("/") + 1]) if fnmatch.fnmatchcase(o.key, rest)]
        elif rest and not rest.endswith("/") and backend.exists(rest):
            # S3 lists the key itself as a prefix; a directory lists its folder
            listing = (o for where in (rest, rest[: rest.rfind("/") + 1]) for o in backend.list(where))
            return [SourceShard(uri, rest, next(o.size for o in listing if o.key == rest), backend)]
        else:
            if rest and not is_pattern(uri) and not any(True for _ in backend.list(rest.rstrip("/") + "/")):
                _no_such_object(uri, root, rest)
            prefix = rest.rstrip("/") + "/" if rest else ""
            found = [o for o in backend.list(prefix) if o.key.endswith(SHARD_SUFFIXES)
                     and not o.key.rsplit("/", 1)[-1].startswith((".", "_")) and o.key != prefix + "manifest.json"]
    except StoreError as e:
        raise DataError(f"data.uri {uri!r}: cannot list it: {e}") from e
    if not found:
        raise DataError(f"data.uri {uri!r}: no data shards there (an empty prefix, or no key matches the glob); "
                        f"upload *.jsonl or *.parquet files under it, or fix the path")
    return [SourceShard(backend.url(o.key), o.key, o.size, backend) for o in sorted(found, key=lambda o: o.key)]


class _RangeFile(io.RawIOBase):
    """A remote object as a seekable file (ranged reads), so pyarrow reads a Parquet footer and row groups
    without downloading the object."""

    def __init__(self, backend, key: str, size: int):
        self.backend, self.key, self.size, self.pos = backend, key, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = offset if whence == 0 else self.pos + offset if whence == 1 else self.size + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, b) -> int:
        n = max(0, min(len(b), self.size - self.pos))
        if n:
            b[:n] = self.backend.read_range(self.key, self.pos, n)
            self.pos += n
        return n


def _open_file(shard: SourceShard, buffer_size: int = 4 << 20):
    """A seekable binary file over the shard: the local file, or ranged reads of `buffer_size` on S3."""
    from flashops.storage.backends import FileBackend

    if isinstance(shard.backend, FileBackend):
        return open(shard.backend.root / shard.key, "rb")
    return io.BufferedReader(_RangeFile(shard.backend, shard.key, shard.size), buffer_size=buffer_size)


def _bad_parquet(shard: SourceShard, e: Exception) -> DataError:
    return DataError(f"data shard {shard.uri}: not a readable Parquet file ({e}); re-export it, remove it from the "
                     "prefix, or set data.format to match")


def _parquet_rows(shard: SourceShard, first: int, stop: int | None, batch_rows: int,
                  buffer_size: int = 4 << 20) -> Iterator[tuple[int, dict]]:
    """(row number, row) for rows [first, stop) of a Parquet shard: only the row groups that hold them are
    read, one batch of `batch_rows` rows in memory at a time."""
    import pyarrow.parquet as pq

    with _open_file(shard, buffer_size) as f:
        try:
            pf = pq.ParquetFile(f)
            md = pf.metadata
            group, at = 0, 0
            while group < md.num_row_groups and at + md.row_group(group).num_rows <= first:
                at += md.row_group(group).num_rows
                group += 1
            if group >= md.num_row_groups:
                return
            for batch in pf.iter_batches(batch_size=batch_rows, row_groups=range(group, md.num_row_groups)):
                lo = max(0, first - at)
                hi = batch.num_rows if stop is None else min(batch.num_rows, stop - at)
                if hi > lo:
                    for k, row in enumerate(batch.slice(lo, hi - lo).to_pylist()):  # one batch, never the shard
                        yield at + lo + k, row
                at += batch.num_rows
                if stop is not None and at >= stop:
                    return
        except DataError:
            raise
        except Exception as e:  # pyarrow raises several types for a bad file
            raise _bad_parquet(shard, e) from e


def _jsonl_lines(shard: SourceShard, first: int, stop: int | None,
                 buffer_size: int = 4 << 20) -> Iterator[tuple[int, int, dict]]:
    """(byte offset, end offset, row) of the JSONL lines that START in bytes [first, stop) of the shard (a line
    that starts inside and ends past `stop` is read whole; one that starts before `first` is not: the rule that
    lets byte ranges split a shard with every line in exactly one range). Memory: one buffer and one line."""
    with _open_file(shard, buffer_size) as f:
        pos = first
        if first > 0:  # skip to the first line start at or after `first` (byte first-1 is the previous line's end)
            f.seek(first - 1)
            pos = first - 1 + len(f.readline())
        while stop is None or pos < stop:
            line = f.readline()
            if not line:
                return
            row = _json_row(f"data shard {shard.uri} byte {pos}", line)
            if row is not None:
                yield pos, pos + len(line), row
            pos += len(line)


def iter_rows(shard: SourceShard, fmt: str = "auto", batch_rows: int = 1024) -> Iterator[tuple[int, dict]]:
    """(row number, row) of a whole shard, streamed: memory is one Parquet batch or one JSONL line, not the shard."""
    if shard.format(fmt) == "parquet":
        yield from _parquet_rows(shard, 0, None, batch_rows)
        return
    with _open_file(shard, 1 << 20) as f:
        n = 0
        for line in f:
            n += 1
            row = _json_row(f"data shard {shard.uri} line {n}", line)
            if row is not None:
                yield n - 1, row


def _json_row(where: str, line: bytes) -> dict | None:
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{where}: not JSON ({e}); one JSON object per line (fix or remove the line, or the "
                        "shard)") from e
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    return row


def check_row(row: dict, stage: str, where: str) -> None:
    missing = [k for k in REQUIRED_KEYS[stage] if k not in row]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}; a {stage} row needs {list(REQUIRED_KEYS[stage])} "
                        f"(it has {sorted(row)[:8]}): rename the column(s) or fix the row")
    if stage == "dpo":
        for side in ("chosen", "rejected"):
            response_messages(row[side], f"{where}: {side}")


STREAM_BUFFER = 256 << 10  # bytes of read-ahead per row stream on S3 (a local file uses the OS page cache)
STREAM_BATCH_ROWS = 256    # Parquet rows decoded at a time per row stream


class RawDataset:
    """User rows over one or many shards, never held whole. Each shard has a size in *units*: bytes for JSONL
    (a line belongs to the unit its first byte is in), rows for Parquet (from the footer: no scan). An epoch
    lays the shards end to end in a seeded order of its own (`order`), so every position of the epoch's unit
    space [0, units) names one row, and `read(epoch, lo, hi)` streams the rows that start in [lo, hi), reading
    only those bytes / row groups. trainers/loader.py splits [0, units) into one range per batch row
    (`RawStreams`), so each rank reads only its share and the cursor is a position, not a row count."""

    def __init__(self, uri: str, shards: list[SourceShard], stage: str, fmt: str, seed: int):
        self.uri, self.shards, self.stage, self.fmt, self.seed = uri, shards, stage, fmt, seed
        self.formats = [s.format(fmt) for s in shards]
        self.units = [self._parquet_count(s) if f == "parquet" else s.size for s, f in zip(shards, self.formats)]
        self.total = sum(self.units)
        self._epoch: tuple[int, list[int], list[int]] | None = None

    @staticmethod
    def _parquet_count(shard: SourceShard) -> int:
        import pyarrow.parquet as pq

        with _open_file(shard, 64 << 10) as f:
            try:
                return pq.ParquetFile(f).metadata.num_rows
            except Exception as e:
                raise _bad_parquet(shard, e) from e

    def order(self, epoch: int) -> list[int]:
        """The shards' order in `epoch`: a seeded shuffle, another one each epoch, the same in every process."""
        return random.Random(f"flashops-shards:{self.seed}:{epoch}").sample(range(len(self.shards)), len(self.shards))

    def _layout(self, epoch: int) -> tuple[list[int], list[int]]:
        if self._epoch is None or self._epoch[0] != epoch:
            order = self.order(epoch)
            starts = [0]
            for i in order:
                starts.append(starts[-1] + self.units[i])
            self._epoch = (epoch, order, starts)
        return self._epoch[1], self._epoch[2]

    def where(self, epoch: int, pos: int) -> tuple[SourceShard, int]:
        """The shard and the offset in it (byte or row) of position `pos` of `epoch`."""
        order, starts = self._layout(epoch)
        k = min(bisect.bisect_right(starts, pos) - 1, len(order) - 1)
        return self.shards[order[k]], pos - starts[k]

    def read(self, epoch: int, lo: int, hi: int) -> Iterator[tuple[int, int, dict]]:
        """(position, end position, row) of the rows of `epoch` that start in [lo, hi), in order."""
        order, starts = self._layout(epoch)
        k = max(0, bisect.bisect_right(starts, lo) - 1)
        while k < len(order) and starts[k] < hi:
            i, base = order[k], starts[k]
            a, b = max(lo, base) - base, min(hi, starts[k + 1]) - base
            if b > a:
                shard = self.shards[i]
                if self.formats[i] == "parquet":
                    for n, row in _parquet_rows(shard, a, b, STREAM_BATCH_ROWS, STREAM_BUFFER):
                        yield base + n, base + n + 1, row
                else:
                    for at, end, row in _jsonl_lines(shard, a, b, STREAM_BUFFER):
                        yield base + at, base + end, row
            k += 1

    def describe(self, epoch: int, pos: int) -> str:
        shard, off = self.where(epoch, pos)
        return f"data shard {shard.uri} {'row' if shard.format(self.fmt) == 'parquet' else 'byte'} {off}"

    @property
    def rows(self) -> list[dict]:
        """Every row, shard by shard in key order (the RL prompt pool is held whole: it is small, and RL needs
        the text)."""
        return [row for s in self.shards for _, row in iter_rows(s, self.fmt)]


def _open_raw(uri: str, stage: str, fmt: str, seed: int) -> RawDataset:
    ds = RawDataset(uri, list_shards(uri), stage, fmt, seed)
    any_row = False
    for s, shard in enumerate(ds.shards):  # the first rows of every shard, before any compute
        for n, row in iter_rows(shard, fmt):
            any_row = True
            check_row(row, stage, f"data shard {shard.uri} row {n}")
            if n >= 100:
                break
    if not any_row:
        raise DataError(f"data.uri {uri!r}: its {len(ds.shards)} shard(s) hold no rows; a {stage} run needs rows "
                        f"with keys {list(REQUIRED_KEYS[stage])}")
    return ds


def open_prepared(uri: str, stage: str):
    """The prepared dataset under `uri` (flashops data prepare), or None when `uri` holds none."""
    from flashops.storage import StoreError, open_store
    from flashops.storage.datasets import TokenDataset, read_dataset_manifest

    if any(c in uri for c in _GLOB) or uri.endswith(SHARD_SUFFIXES):
        return None
    try:
        backend = open_store(uri.rstrip("/")).backend
        m = read_dataset_manifest(backend) if backend.ensure_ready(for_write=False) else None
        if m is None:
            return None
        ds = TokenDataset(backend, uri.rstrip("/"), m)
        ds.check_objects()
    except StoreError as e:
        raise DataError(f"data.uri {uri!r}: {e}") from e
    if stage not in ("pretrain", "sft"):
        raise DataError(f"data.uri {uri!r} is a prepared (tokenized) dataset; {stage} runs read rows: point "
                        f"data.uri at the JSONL/Parquet rows (keys {list(REQUIRED_KEYS[stage])})")
    from flashops.trainers.prepare import tokenizer_sha256

    ours = tokenizer_sha256()
    if ds.tokenizer_sha256 != ours:
        raise DataError(f"data.uri {uri!r} was tokenized with another tokenizer (sha256 {ds.tokenizer_sha256[:16]}..., "
                        f"the model's is {ours[:16]}...): its token ids would mean other words; re-run flashops data "
                        f"prepare --input SOURCE --output NEW_URI with the model's tokenizer (the default)")
    if ds.stage != stage:
        raise DataError(f"data.uri {uri!r} was prepared for {ds.stage} but this is a {stage} run: prepare the "
                        f"{stage} data with flashops data prepare --stage {stage}")
    return ds


def lineage_identity(dataset, uri: str) -> dict:
    """What a run records as its dataset in lineage: a prepared dataset by its version, anything else by URI."""
    from flashops.storage.datasets import TokenDataset

    if isinstance(dataset, TokenDataset):
        from flashops.trainers.prepare import lineage_identity as prepared_identity

        return prepared_identity(dataset.uri, dataset.manifest_sha256, dataset.manifest.fields.get("version"))
    return {"uri": uri}


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
    prepared = open_prepared(uri, stage)
    if prepared is not None:
        return prepared
    return _open_raw(uri, stage, fmt, seed)


def row_task(row: dict) -> Task:
    """An RL row as a Task (user rows may leave out domain and level)."""
    domain = row.get("domain") or "custom"
    level = int(row.get("level") or 1)
    return Task(domain, level if level in LEVELS else 1, str(row["question"]), str(row["answer"]),
                str(row.get("reasoning", "")))


__all__ = ["BUILTIN", "DEFAULT_DATA", "open_dataset", "list_shards", "iter_rows", "check_row", "eval_tasks", "row_task", "make_task", "DataError"]
