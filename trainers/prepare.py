"""Tokenize once: user rows (JSONL/Parquet shards under a prefix or glob) -> a prepared dataset of packed
token shards, a document index and a manifest (flashops.storage.datasets), recorded in lineage as a dataset
version derived from its source. Training then reads token ranges; nothing is tokenized in the loop.

    from flashops.trainers.prepare import prepare
    result = prepare("s3://raw/c4/", "s3://prep/c4-v1", stage="pretrain")
    result.tokens, result.manifest_sha256, result.tokens_per_s

On a cluster, N workers each take the source shards i, i+N, ... (`worker=i, workers=N`), and one last call
(`finalize_only=True`) writes the manifest; the output is byte-identical to one process's.
"""
from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field

from flashops.trainers.corpora import check_row, iter_rows, list_shards
from flashops.trainers.errors import DataError

log = logging.getLogger("flashops.trainers")
PREPARED_STAGES = ("pretrain", "sft")
DEFAULT_SHARD_TOKENS = 1 << 24  # 16M tokens: 32 MB shards (uint16), a document index of a few hundred kB
ENCODE_BATCH = 256


def tokenizer_sha256(path=None) -> str:
    """The identity of a tokenizer: sha256 of its canonical JSON (formatting of the file does not matter)."""
    from flashops.model.tokenizer import load_tokenizer

    return hashlib.sha256(load_tokenizer(path).to_str().encode()).hexdigest()


@dataclass
class PrepareResult:
    uri: str
    source: str
    stage: str
    manifest_sha256: str | None  # None for a worker that did not finalize
    sources: int
    shards: int
    tokens: int
    documents: int
    rows: int
    seconds: float
    skipped: list[int] = field(default_factory=list)  # source shards already tokenized (a restarted worker)
    lineage_id: int | None = None
    version: str | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d["tokens_per_s"] = round(self.tokens_per_s, 1)
        return d


def _encode(codec, stage: str, rows: list[dict]) -> list[tuple[list[int], list[int] | None]]:
    if stage == "pretrain":
        return [(ids, None) for ids in codec.documents([str(r["text"]) for r in rows])]
    return [codec.chat(r["messages"], bool(r.get("thinking", False))) for r in rows]


def _tokenize_source(backend, index: int, shard, stage: str, fmt: str, codec, dtype: str, shard_tokens: int,
                     tok_sha: str) -> dict:
    from flashops.storage.datasets import PartWriter

    writer = PartWriter(backend, index, dtype, shard_tokens, with_mask=stage == "sft")
    rows, batch = 0, []

    def flush():
        for ids, mask in _encode(codec, stage, batch):
            writer.add(ids, mask)
        batch.clear()

    try:
        for n, row in iter_rows(shard, fmt):
            check_row(row, stage, f"data shard {shard.uri} row {n}")
            batch.append(row)
            rows += 1
            if len(batch) >= ENCODE_BATCH:
                flush()
        flush()
    except BaseException:
        writer.abort()
        raise
    return writer.close(rows=rows, source_uri=shard.uri, source_size=shard.size, tokenizer_sha256=tok_sha)


def prepare(input_uri: str, output_uri: str, stage: str = "pretrain", *, fmt: str = "auto", tokenizer=None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, worker: int | None = None, workers: int = 1,
            finalize_only: bool = False, overwrite: bool = False, lineage=None,
            version: str | None = None, finalize_when_done: bool = False, wait_s: float = 24 * 3600) -> PrepareResult:
    """Tokenize `input_uri` (one object, a prefix or a glob) into a prepared dataset at `output_uri`.
    worker/workers: this process takes source shards worker, worker + workers, ...; without `worker` one
    process does all and finalizes. finalize_when_done: worker 0, once its shards are done, waits (up to
    wait_s) for the other workers' and writes the manifest (one Indexed Job, no separate finalize step).
    Raises DataError (bad input, before writing where possible)."""
    from flashops.storage import StoreError, open_store
    from flashops.storage import datasets as prepared
    from flashops.model.tokenizer import TokenizerCodec, load_tokenizer

    if stage not in PREPARED_STAGES:
        raise DataError(f"--stage {stage!r}: prepared datasets feed {' and '.join(PREPARED_STAGES)} (dpo and rl "
                        "read their rows directly)")
    if workers < 1 or (worker is not None and not 0 <= worker < workers):
        raise DataError(f"--worker {worker} --workers {workers}: use 0 <= worker < workers")
    if shard_tokens < 1:
        raise DataError(f"--shard-tokens {shard_tokens}: use a positive number of tokens per shard, e.g. 16777216")
    if output_uri.rstrip("/") == input_uri.rstrip("/"):
        raise DataError(f"--output {output_uri!r} is the input: write the prepared dataset to its own prefix")
    t0 = time.perf_counter()
    shards = list_shards(input_uri)
    try:
        codec = TokenizerCodec(load_tokenizer(tokenizer), skip_special_tokens=False)
    except Exception as e:
        raise DataError(f"--tokenizer {tokenizer!r}: cannot load it ({e}); give a tokenizers JSON file") from e
    vocab = codec.tokenizer.get_vocab_size()
    tok_sha = tokenizer_sha256(tokenizer)
    fields = {"stage": stage, "source": input_uri, "tokenizer_sha256": tok_sha, "vocab_size": vocab,
              "dtype": prepared.token_dtype(vocab),
              "mask": stage == "sft", "shard_tokens": shard_tokens, "version": version or ""}
    backend = open_store(output_uri.rstrip("/")).backend
    mine = range(len(shards)) if worker is None else range(worker, len(shards), workers)
    skipped, done = [], []
    try:
        if worker is None and not finalize_only:
            prepared.begin(backend, overwrite)
        elif backend.ensure_ready(for_write=True) and backend.exists("manifest.json"):
            raise prepared.AlreadyExistsError(
                f"{backend.url()} already holds a finished prepared dataset: give the job a new --output")
        if not finalize_only:
            sizes = prepared.shard_sizes(backend) if worker is not None else {}
            for i in mine:
                rec = prepared.read_part(backend, i, sizes) if worker is not None else None
                if rec is not None and rec.get("tokenizer_sha256") == tok_sha and rec.get("source_uri") == shards[i].uri:
                    skipped.append(i)  # a restarted worker keeps what it finished
                    done.append(rec)
                    continue
                done.append(_tokenize_source(backend, i, shards[i], stage, fmt, codec, fields["dtype"],
                                             shard_tokens, tok_sha))
                log.info("tokenized %s (%d/%d)", shards[i].uri, len(done), len(mine))
        sha, doc = None, None
        if finalize_when_done and worker == 0:
            _wait_for_parts(backend, len(shards), wait_s)
        if worker is None or finalize_only or (finalize_when_done and worker == 0):
            sha, doc = prepared.finalize(backend, len(shards), fields)
    except StoreError as e:
        if isinstance(e, prepared.AlreadyExistsError):
            raise DataError(str(e)) from e
        raise DataError(f"--output {output_uri!r}: {e}") from e
    seconds = time.perf_counter() - t0
    if doc is not None:
        counts = (len(doc["shards"]), doc["tokens"], doc["documents"], doc["rows"])
    else:
        counts = (sum(len(r["parts"]) for r in done), sum(p["tokens"] for r in done for p in r["parts"]),
                  sum(p["documents"] for r in done for p in r["parts"]), sum(r["rows"] for r in done))
    result = PrepareResult(output_uri.rstrip("/"), input_uri, stage, sha, len(shards), *counts, seconds, skipped)
    if sha is not None and lineage:
        result.lineage_id = record_lineage(lineage, result, version)
    result.version = version or (sha[:12] if sha else None)
    return result


def _wait_for_parts(backend, n_sources: int, wait_s: float) -> None:
    from flashops.storage import datasets as prepared

    deadline = time.monotonic() + wait_s
    while True:
        sizes = prepared.shard_sizes(backend)
        missing = [i for i in range(n_sources) if prepared.read_part(backend, i, sizes) is None]
        if not missing or time.monotonic() > deadline:
            return  # finalize names what is still missing
        log.info("waiting for %d source shard(s) of the other workers, e.g. %s", len(missing), missing[:5])
        time.sleep(min(30.0, max(1.0, wait_s / 100)))


def lineage_identity(uri: str, manifest_sha256: str, version: str | None) -> dict:
    """How lineage names a prepared dataset: its URI, its manifest's sha256 and a version (given, else the
    hash's first 12 digits). `flashops data prepare` records it; a run that trains on it consumes it."""
    return {"uri": uri.rstrip("/"), "content_hash": manifest_sha256, "version": version or manifest_sha256[:12]}


def record_lineage(lineage, result: PrepareResult, version: str | None = None) -> int:
    """The prepared dataset as a version derived from the source dataset."""
    source = lineage.upsert_dataset(result.source)
    return lineage.upsert_dataset(**lineage_identity(result.uri, result.manifest_sha256, version), derived_from=source)
