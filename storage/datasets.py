"""Prepared (tokenized) datasets in the store: packed token shards, their document index, and a manifest
written LAST, the same rule as checkpoints: no manifest, no dataset. Torch-free (numpy).

Layout under the dataset's URI (file:///data/prep/c4-v1 or s3://data/prep/c4-v1):
    shards/<source>-<part>.tokens   token ids back to back, little-endian uint16 (vocab <= 65536) or uint32
    shards/<source>-<part>.docs     int64 end offset of each document within the shard (so boundaries are known)
    shards/<source>-<part>.mask     uint8 loss mask per token (SFT: 1 on what the assistant writes); pretrain: none
    parts/<source>.json             written by whichever worker tokenized source shard <source>
    manifest.json                   LAST: sizes and sha256 of every shard, tokenizer sha256, token counts

Output shards are named after the source shard they came from, so N workers over disjoint source shards
write exactly what one process writes; `finalize` then writes the manifest.

    w = PartWriter(backend, source=3, dtype="uint16", shard_tokens=1 << 24)
    w.add(ids); w.add(ids2, mask2); w.close(rows=2, source_uri="s3://raw/c4/003.parquet")
    finalize(backend, n_sources, {"stage": "pretrain", "tokenizer_sha256": ..., ...})
    ds = open_token_dataset("s3://data/prep/c4-v1")
    ds.read(start, n)           # tokens [start, start + n) of the concatenated stream, as np.int64
    ds.doc_starts_in(start, n)  # offsets (relative to start) where a document begins
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from flashops.storage.backends import ObjectBackend, sha256_of
from flashops.storage.errors import AlreadyExistsError, CorruptObjectError, ObjectNotFoundError, StoreConfigError
from flashops.storage.manifest import DATASET_FORMAT, MANIFEST_NAME, Manifest, ObjectEntry

SHARDS, PARTS = "shards/", "parts/"
DOCS_CACHE = 4  # document indexes kept in memory (one per shard): memory is bounded by shard size, not data size


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


class DatasetError(StoreConfigError):
    """A prepared dataset that cannot be used as asked (names the dataset, the object and the fix)."""


# ------------------------------------------------------------------------------------------- writing


class PartWriter:
    """Token shards of one source shard, streamed to the backend (memory: one document index, not the shard)."""

    def __init__(self, backend: ObjectBackend, source: int, dtype: str, shard_tokens: int, with_mask: bool):
        self.backend, self.source, self.dtype = backend, source, np.dtype(dtype).newbyteorder("<")
        self.shard_tokens, self.with_mask = shard_tokens, with_mask
        self.parts: list[dict] = []
        self._open = None

    def _start(self) -> None:
        name = f"{self.source:05d}-{len(self.parts):04d}"
        tokens = self.backend.open_writer(f"{SHARDS}{name}.tokens")
        mask = self.backend.open_writer(f"{SHARDS}{name}.mask") if self.with_mask else None
        self._open = {"name": name, "tokens": tokens, "mask": mask, "ends": [], "n": 0}

    def add(self, ids, mask=None) -> None:
        """One document (it never spans two shards, so a shard starts at a document boundary)."""
        if not len(ids):
            return
        if self._open is None:
            self._start()
        o = self._open
        o["tokens"].write(np.asarray(ids, dtype=self.dtype).tobytes())
        if o["mask"] is not None:
            o["mask"].write(np.asarray(mask, dtype=np.uint8).tobytes())
        o["n"] += len(ids)
        o["ends"].append(o["n"])
        if o["n"] >= self.shard_tokens:
            self._finish()

    def _finish(self) -> None:
        o, self._open = self._open, None
        objects = {f"{SHARDS}{o['name']}.tokens": o["tokens"].commit()}
        if o["mask"] is not None:
            objects[f"{SHARDS}{o['name']}.mask"] = o["mask"].commit()
        docs = np.asarray(o["ends"], dtype="<i8").tobytes()
        self.backend.put_bytes(f"{SHARDS}{o['name']}.docs", docs)
        objects[f"{SHARDS}{o['name']}.docs"] = (len(docs), sha256_of(docs))
        self.parts.append({"name": o["name"], "tokens": o["n"], "documents": len(o["ends"]),
                           "objects": {k: list(v) for k, v in objects.items()}})

    def abort(self) -> None:
        if self._open is not None:
            for w in (self._open["tokens"], self._open["mask"]):
                if w is not None:
                    w.abort()
            self._open = None

    def close(self, **record) -> dict:
        """Finish the last shard and write parts/<source>.json (this source shard is done)."""
        if self._open is not None:
            self._finish()
        doc = {"source": self.source, "parts": self.parts, **record}
        self.backend.put_bytes(f"{PARTS}{self.source:05d}.json", json.dumps(doc, sort_keys=True).encode())
        return doc


def shard_sizes(backend: ObjectBackend) -> dict[str, int]:
    return {o.key: o.size for o in backend.list(SHARDS)}


def read_part(backend: ObjectBackend, source: int, sizes: dict[str, int]) -> dict | None:
    """The finished record of a source shard, or None (not tokenized yet, or a worker died half-way).
    sizes: shard_sizes(backend), listed once by the caller."""
    try:
        doc = json.loads(bytes(backend.get_bytes(f"{PARTS}{source:05d}.json")))
    except ObjectNotFoundError:
        return None
    ok = all(sizes.get(k) == v[0] for p in doc["parts"] for k, v in p["objects"].items())
    return doc if ok else None


def begin(backend: ObjectBackend, overwrite: bool) -> None:
    """Before tokenizing: refuse to replace a complete dataset unless asked; drop its manifest FIRST (so it
    stops existing before its shards change) and everything else."""
    backend.ensure_ready(for_write=True)
    if backend.exists(MANIFEST_NAME):
        if not overwrite:
            raise AlreadyExistsError(f"{backend.url()} already holds a prepared dataset: write to a new --output "
                                     "(a new version), or pass --overwrite to replace it")
        backend.delete([MANIFEST_NAME])
    leftovers = [o.key for o in backend.list("")]
    if leftovers:
        backend.delete(leftovers)
    backend.discard_incomplete("")


def finalize(backend: ObjectBackend, n_sources: int, fields: dict) -> tuple[str, dict]:
    """Write manifest.json from every source's parts record, once all are there. Returns (sha256, manifest)."""
    records, missing = [], []
    sizes = shard_sizes(backend)
    for i in range(n_sources):
        rec = read_part(backend, i, sizes)
        (records.append(rec) if rec is not None else missing.append(i))
    if missing:
        raise DatasetError(f"{backend.url()}: source shard(s) {missing[:10]} are not tokenized yet (no complete "
                           f"{PARTS}<n>.json); run the missing workers (flashops data prepare --worker I --workers N) "
                           "before finalizing")
    shards, objects, rows = [], {}, 0
    for rec in records:
        rows += int(rec.get("rows", 0))
        for p in rec["parts"]:
            shards.append({"name": p["name"], "tokens": p["tokens"], "documents": p["documents"]})
            objects.update({k: ObjectEntry(int(v[0]), str(v[1])) for k, v in p["objects"].items()})
    doc = {"format": DATASET_FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "shards": shards, "tokens": sum(s["tokens"] for s in shards),
           "documents": sum(s["documents"] for s in shards), "rows": rows, "sources": n_sources, **fields}
    manifest = Manifest(doc, objects)
    data = manifest.to_bytes()
    backend.put_bytes(MANIFEST_NAME, data)
    return sha256_of(data), json.loads(data)


# ------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ShardInfo:
    name: str
    tokens: int
    documents: int


class TokenDataset:
    """A prepared dataset, read by ranges: nothing is loaded whole except small per-shard document indexes."""

    def __init__(self, backend: ObjectBackend, uri: str, manifest: Manifest):
        f = manifest.fields
        self.backend, self.uri, self.manifest = backend, uri, manifest
        self.stage: str = f["stage"]
        self.tokenizer_sha256: str = f["tokenizer_sha256"]
        self.dtype = np.dtype(f["dtype"]).newbyteorder("<")
        self.shards = [ShardInfo(s["name"], int(s["tokens"]), int(s["documents"])) for s in f["shards"]]
        self.tokens = int(f["tokens"])
        self.documents = int(f["documents"])
        self.has_mask = bool(f.get("mask"))
        self.token_starts = np.cumsum([0] + [s.tokens for s in self.shards]).astype(np.int64)
        self.doc_first = np.cumsum([0] + [s.documents for s in self.shards]).astype(np.int64)
        self._docs: OrderedDict[int, np.ndarray] = OrderedDict()

    @property
    def manifest_sha256(self) -> str:
        return self.manifest.sha256

    def __len__(self) -> int:  # documents, so `len(plan.dataset)` keeps meaning "examples"
        return self.documents

    def _key(self, i: int, ext: str) -> str:
        return f"{SHARDS}{self.shards[i].name}.{ext}"

    def doc_ends(self, i: int) -> np.ndarray:
        """End offsets (within shard i) of its documents; read whole, checked against the manifest's sha256."""
        if i in self._docs:
            self._docs.move_to_end(i)
            return self._docs[i]
        key = self._key(i, "docs")
        data = self.backend.get_bytes(key)
        entry = self.manifest.objects[key]
        if len(data) != entry.size or sha256_of(data) != entry.sha256:
            raise CorruptObjectError(f"{self.backend.url(key)} does not match the manifest (expected {entry.size} "
                                     f"bytes, sha256 {entry.sha256}); re-run flashops data prepare", key=key)
        ends = np.frombuffer(bytes(data), dtype="<i8")
        self._docs[i] = ends
        while len(self._docs) > DOCS_CACHE:
            self._docs.popitem(last=False)
        return ends

    def _spans(self, start: int, n: int):
        """(shard, offset in shard, count, offset in output) pieces of the global range [start, start + n)."""
        if start < 0 or start + n > self.tokens:
            raise IndexError(f"tokens [{start}, {start + n}) outside the dataset's {self.tokens}")
        i = int(np.searchsorted(self.token_starts, start, side="right")) - 1
        out = 0
        while out < n:
            off = start + out - int(self.token_starts[i])
            take = min(n - out, self.shards[i].tokens - off)
            if take > 0:
                yield i, off, take, out
                out += take
            i += 1

    def _read(self, start: int, n: int, ext: str, dtype) -> np.ndarray:
        out = np.empty(n, dtype=dtype)
        for i, off, take, at in self._spans(start, n):
            raw = self.backend.read_range(self._key(i, ext), off * dtype.itemsize, take * dtype.itemsize)
            out[at:at + take] = np.frombuffer(raw, dtype=dtype)
        return out

    def read(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start + n) of the stream (all shards back to back), as int64."""
        return self._read(start, n, "tokens", self.dtype).astype(np.int64)

    def read_mask(self, start: int, n: int) -> np.ndarray:
        if not self.has_mask:
            return np.ones(n, dtype=np.uint8)
        return self._read(start, n, "mask", np.dtype(np.uint8))

    def doc_starts_in(self, start: int, n: int) -> np.ndarray:
        """Offsets in [0, n) where a document starts inside the global range [start, start + n)."""
        found = []
        for i, off, take, at in self._spans(start, n):
            ends = self.doc_ends(i)
            starts = np.concatenate([[0], ends[:-1]])
            sel = starts[(starts >= off) & (starts < off + take)]
            found.append(sel - off + at)
        return np.concatenate(found).astype(np.int64) if found else np.zeros(0, np.int64)

    def document(self, d: int) -> tuple[int, int]:
        """(global start, length) of document d."""
        i = int(np.searchsorted(self.doc_first, d, side="right")) - 1
        ends = self.doc_ends(i)
        j = d - int(self.doc_first[i])
        lo = int(ends[j - 1]) if j else 0
        return int(self.token_starts[i]) + lo, int(ends[j]) - lo

    def doc_lengths(self, d0: int, d1: int) -> np.ndarray:
        """Lengths of documents [d0, d1) (may span shards)."""
        out = []
        d = d0
        while d < d1:
            i = int(np.searchsorted(self.doc_first, d, side="right")) - 1
            ends = self.doc_ends(i)
            j0, j1 = d - int(self.doc_first[i]), min(d1 - int(self.doc_first[i]), len(ends))
            bounds = np.concatenate([[0], ends])
            out.append(np.diff(bounds[j0:j1 + 1]))
            d += j1 - j0
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def check_objects(self) -> None:
        """Every object the manifest lists is present with its recorded size (one listing; catches a truncated
        or missing shard before any compute). `verify()` also re-hashes every byte."""
        sizes = {o.key: o.size for o in self.backend.list(SHARDS)}
        for key, entry in sorted(self.manifest.objects.items()):
            got = sizes.get(key)
            if got != entry.size:
                what = "is missing" if got is None else f"has {got} bytes"
                raise CorruptObjectError(
                    f"prepared dataset {self.uri}: {self.backend.url(key)} {what}, the manifest records {entry.size} "
                    f"bytes with sha256 {entry.sha256} (a truncated or partial upload); restore the shard or re-run "
                    "flashops data prepare", key=key, expected_sha256=entry.sha256)

    def verify(self) -> int:
        """Re-hash every object against the manifest; returns the bytes checked."""
        total = 0
        for key, entry in sorted(self.manifest.objects.items()):
            size, sha = self.backend.hash_object(key)
            if (size, sha) != (entry.size, entry.sha256):
                raise CorruptObjectError(
                    f"prepared dataset {self.uri}: {self.backend.url(key)} is corrupt: expected {entry.size} bytes "
                    f"with sha256 {entry.sha256}, got {size} bytes with sha256 {sha}; restore it or re-run "
                    "flashops data prepare", key=key, expected_sha256=entry.sha256, actual_sha256=sha)
            total += size
        return total


def read_dataset_manifest(backend: ObjectBackend) -> Manifest | None:
    """The prepared-dataset manifest at the backend's root, or None when there is none (not a prepared dataset)."""
    try:
        data = backend.get_bytes(MANIFEST_NAME)
    except ObjectNotFoundError:
        return None
    m = Manifest.parse(bytes(data), backend.url(MANIFEST_NAME))
    if m.fields.get("format") != DATASET_FORMAT:
        raise DatasetError(f"{backend.url(MANIFEST_NAME)} is a {m.fields.get('format')} manifest, not a prepared "
                           f"dataset ({DATASET_FORMAT}); point data.uri at the output of flashops data prepare")
    return m


def open_token_dataset(uri: str, check: bool = True) -> TokenDataset:
    """The prepared dataset at `uri`; check=True also checks every shard's size against the manifest."""
    from flashops.storage.store import open_store

    backend = open_store(uri).backend
    m = read_dataset_manifest(backend) if backend.ensure_ready(for_write=False) else None
    if m is None:
        raise DatasetError(f"{uri!r} holds no prepared dataset (no {MANIFEST_NAME}: never prepared, or a prepare "
                           "that did not finish); run flashops data prepare --output " + uri)
    ds = TokenDataset(backend, uri.rstrip("/"), m)
    if check:
        ds.check_objects()
    return ds
