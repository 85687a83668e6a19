"""The checkpoint store: one interface over `file://` and `s3://`.

    store = open_store("s3://ckpts/team-a")          # or file:///data/store, or None for $FLASHOPS_HOME/store
    ref = store.save_checkpoint("run-1", 100, model.state_dict(), {"spec_hash": h})   # every rank calls
    meta = store.load_checkpoint(store.latest("run-1"), model.state_dict())            # reshards via DCP

Layout under the store root:
    runs/<run>/step-<n>/__<rank>_<i>.distcp, .metadata   torch.distributed.checkpoint shards
    runs/<run>/step-<n>/manifest.json                     written LAST by rank 0 (sizes + sha256 of all)
    runs/<run>/pins/step-<n>/<by>                          retention pins (a resume, a deployment)
    models/<name>/<version>/<files> + manifest.json        exported models for serving

A checkpoint exists only when its manifest exists and lists objects that are all present with the
recorded sizes (`latest`, `list`); `verify` and `load_checkpoint` also check every sha256.
Everything here is torch-free except save/load, which import `flashops.storage.dcp` lazily.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Union
from urllib.parse import urlsplit

from flashops.storage.backends import FileBackend, ObjectBackend, S3Backend, sha256_of
from flashops.storage.errors import (
    AlreadyExistsError,
    CheckpointNotFoundError,
    CorruptObjectError,
    ObjectNotFoundError,
    StoreConfigError,
)
from flashops.storage.manifest import CHECKPOINT_FORMAT, MANIFEST_NAME, MODEL_FORMAT, Manifest, ObjectEntry
from flashops.storage.settings import flashops_home, resolve_s3_settings

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,252}$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CKPT_URI = re.compile(r"^(?P<root>.+?)/runs/(?P<run>[^/]+)/step-(?P<step>\d+)/?$")
# public: the CLI tells a model URI from a checkpoint URI with it
MODEL_URI = re.compile(r"^(?P<root>.+?)/models/(?P<name>[^/]+)/(?P<version>[^/]+)/?$")
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Keys in `meta` that the manifest records as first-class fields; anything else goes under "extra".
_META_FIELDS = ("model_config", "spec_hash", "parent", "metrics", "stage", "dataset")


@dataclass(frozen=True)
class CheckpointRef:
    run: str
    step: int
    uri: str
    manifest_sha256: str = ""
    created: str = ""

    @property
    def manifest_hash(self) -> str:  # the name lineage uses
        return self.manifest_sha256

    def __str__(self) -> str:
        return self.uri


@dataclass(frozen=True)
class CheckpointMeta:
    run: str
    step: int
    uri: str
    world_size: int
    created: str
    manifest_sha256: str
    parent: str | None = None
    spec_hash: str | None = None
    model_config: dict | None = None
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    total_bytes: int = 0


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    uri: str
    manifest_sha256: str = ""

    @property
    def manifest_hash(self) -> str:
        return self.manifest_sha256

    def __str__(self) -> str:
        return self.uri


@dataclass
class VerifyReport:
    uri: str
    objects: int
    total_bytes: int
    seconds: float


@dataclass
class GcReport:
    kept: list[CheckpointRef]
    deleted: list[str]          # checkpoint URIs removed (complete ones past retention)
    removed_partial: list[str]  # leftovers of crashed saves removed
    dry_run: bool = False


Ref = Union[CheckpointRef, str]


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise StoreConfigError(
            f"{what}={value!r} is not a valid name: use letters, digits, '.', '_' or '-' (starting with a letter "
            "or digit), e.g. 'sft-run-3'"
        )
    return value


def _check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise StoreConfigError(f"step={step!r} must be a non-negative integer (the training step)")
    return step


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


class CheckpointStore:
    def __init__(self, backend: ObjectBackend, uri: str):
        self.backend = backend
        self.uri = uri.rstrip("/")

    def __repr__(self) -> str:
        return f"CheckpointStore({self.uri!r})"

    def check_writable(self) -> None:
        """Raise StoreError now if the store cannot take a write (file://: the directory cannot be created or
        written; s3://: no bucket, no permission), so a run fails before training, not at its first save.
        Leaves nothing behind."""
        self.backend.check_writable()

    # ------------------------------------------------------------ naming
    def checkpoint_uri(self, run: str, step: int) -> str:
        return f"{self.uri}/runs/{run}/step-{step}"

    def model_uri(self, name: str, version: str) -> str:
        return f"{self.uri}/models/{name}/{version}"

    @staticmethod
    def _step_prefix(run: str, step: int) -> str:
        return f"runs/{run}/step-{step}/"

    def _resolve(self, ref: Ref | int, run: str | None = None) -> tuple[str, int]:
        """A CheckpointRef, a checkpoint URI inside this store, or (with run) a step number."""
        if isinstance(ref, CheckpointRef):
            return ref.run, ref.step
        if isinstance(ref, int) and run is not None:
            return run, _check_step(ref)
        m = _CKPT_URI.match(str(ref))
        if not m:
            raise StoreConfigError(
                f"checkpoint reference {ref!r} is not a checkpoint URI: expected <store>/runs/<run>/step-<n>, "
                f"e.g. {self.checkpoint_uri('my-run', 100)}"
            )
        if m["root"].rstrip("/") != self.uri:
            raise StoreConfigError(f"checkpoint {ref!r} is not in store {self.uri}: open_store({m['root']!r}) instead")
        return m["run"], int(m["step"])

    # ------------------------------------------------------------ manifests
    def _read_manifest(self, key: str) -> Manifest:
        data = self.backend.get_bytes(key)
        return Manifest.parse(bytes(data), self.backend.url(key))

    def _write_manifest(self, prefix: str, manifest: Manifest) -> str:
        data = manifest.to_bytes()
        self.backend.put_bytes(prefix + MANIFEST_NAME, data)
        return sha256_of(data)

    def read_manifest(self, ref: Ref) -> dict:
        """The manifest of a complete checkpoint as a dict (what `flashops checkpoints show` prints)."""
        run, step = self._resolve(ref)
        m = self._manifest_or_raise(run, step)
        doc = json.loads(m.to_bytes())
        doc["manifest_sha256"] = m.sha256
        return doc

    def _manifest_or_raise(self, run: str, step: int) -> Manifest:
        self.backend.ensure_ready(for_write=False)
        try:
            return self._read_manifest(self._step_prefix(run, step) + MANIFEST_NAME)
        except ObjectNotFoundError as e:
            raise CheckpointNotFoundError(
                f"no complete checkpoint at {self.checkpoint_uri(run, step)} (no {MANIFEST_NAME}: never saved, "
                f"deleted, or a save that crashed); see `flashops checkpoints list {self.uri}`"
            ) from e

    # ------------------------------------------------------------ listing
    def runs(self) -> list[str]:
        if not self.backend.ensure_ready(for_write=False):
            return []
        names = {o.key.split("/")[1] for o in self.backend.list("runs/") if o.key.count("/") >= 2}
        return sorted(names)

    def _scan_run(self, run: str) -> tuple[list[tuple[int, dict[str, int]]], dict[int, list[str]]]:
        """Every step directory of a run, newest first, with its objects {name: size}; and pins per step.
        One listing; manifests are read only when needed (`_manifest_of`)."""
        listing: dict[int, dict[str, int]] = defaultdict(dict)
        pins: dict[int, list[str]] = defaultdict(list)
        for o in self.backend.list(f"runs/{run}/"):
            parts = o.key.split("/")
            if len(parts) >= 5 and parts[2] == "pins" and _STEP_DIR.match(parts[3]):
                pins[int(_STEP_DIR.match(parts[3])[1])].append(parts[4])
                continue
            m = _STEP_DIR.match(parts[2]) if len(parts) >= 4 else None
            if m:
                listing[int(m[1])]["/".join(parts[3:])] = o.size
        return [(step, listing[step]) for step in sorted(listing, reverse=True)], pins

    def _manifest_of(self, run: str, step: int, objs: dict[str, int]) -> Manifest | None:
        if MANIFEST_NAME not in objs:
            return None
        try:
            return self._read_manifest(self._step_prefix(run, step) + MANIFEST_NAME)
        except (CorruptObjectError, ObjectNotFoundError) as e:
            log.warning("ignoring checkpoint %s: %s", self.checkpoint_uri(run, step), e)
            return None

    def _complete(self, run: str, step: int, manifest: Manifest | None, objs: dict[str, int], warn: bool) -> bool:
        uri = self.checkpoint_uri(run, step)
        if manifest is None:
            if warn:
                log.warning("ignoring partial checkpoint %s: no %s (a save crashed or is still running)",
                            uri, MANIFEST_NAME)
            return False
        bad = [k for k, e in manifest.objects.items() if objs.get(k) != e.size]
        if bad:
            if warn:
                log.warning("ignoring incomplete checkpoint %s: %d object(s) missing or of the wrong size, "
                            "first: %s (expected %d bytes, sha256 %s)", uri, len(bad), bad[0],
                            manifest.objects[bad[0]].size, manifest.objects[bad[0]].sha256)
            return False
        return True

    def _ref(self, run: str, step: int, manifest: Manifest) -> CheckpointRef:
        return CheckpointRef(run, step, self.checkpoint_uri(run, step), manifest.sha256,
                             str(manifest.fields.get("created", "")))

    def list(self, run: str | None = None) -> list[CheckpointRef]:
        """Complete checkpoints, oldest first (per run, runs sorted by name)."""
        runs = [_check_name("run", run)] if run is not None else self.runs()
        if run is not None and not self.backend.ensure_ready(for_write=False):
            return []
        out = []
        for r in runs:
            steps, _ = self._scan_run(r)
            for s, objs in reversed(steps):
                m = self._manifest_of(r, s, objs)
                if self._complete(r, s, m, objs, warn=True):
                    out.append(self._ref(r, s, m))
        return out

    def latest(self, run: str) -> CheckpointRef | None:
        """The newest complete checkpoint of `run` (manifest present, every object present with its recorded
        size), or None. Partial or damaged newer ones are skipped with a warning."""
        _check_name("run", run)
        if not self.backend.ensure_ready(for_write=False):
            return None
        steps, _ = self._scan_run(run)
        for step, objs in steps:
            manifest = self._manifest_of(run, step, objs)
            if self._complete(run, step, manifest, objs, warn=True):
                return self._ref(run, step, manifest)
        return None

    # ------------------------------------------------------------ verify
    def _verify_objects(self, prefix: str, manifest: Manifest, uri: str, parallelism: int = 4) -> VerifyReport:
        t0 = time.perf_counter()

        def check(item: tuple[str, ObjectEntry]) -> None:
            key, entry = item
            url = self.backend.url(prefix + key)
            try:
                size, sha = self.backend.hash_object(prefix + key)
            except ObjectNotFoundError as e:
                raise CorruptObjectError(
                    f"{url} is missing (expected {entry.size} bytes, sha256 {entry.sha256}); {uri} is damaged: "
                    "resume from an older checkpoint", key=key, expected_sha256=entry.sha256) from e
            if (size, sha) != (entry.size, entry.sha256):
                raise CorruptObjectError(
                    f"{url} is corrupt: expected {entry.size} bytes with sha256 {entry.sha256}, got {size} bytes "
                    f"with sha256 {sha}; {uri} cannot be trusted: resume from an older checkpoint "
                    "(flashops checkpoints list) or re-export", key=key, expected_sha256=entry.sha256,
                    actual_sha256=sha)

        with ThreadPoolExecutor(parallelism) as pool:
            list(pool.map(check, manifest.objects.items()))
        return VerifyReport(uri, len(manifest.objects), manifest.total_bytes, time.perf_counter() - t0)

    def verify(self, ref: Ref) -> VerifyReport:
        """Read every object of a checkpoint (or model URI) and check its size and sha256.
        Raises CorruptObjectError naming the first bad object and its expected hash."""
        if isinstance(ref, ModelRef) or MODEL_URI.match(str(ref)) and not _CKPT_URI.match(str(ref)):
            name, version = self._resolve_model(ref)
            prefix = f"models/{name}/{version}/"
            manifest = self._model_manifest_or_raise(name, version)
            return self._verify_objects(prefix, manifest, self.model_uri(name, version))
        run, step = self._resolve(ref)
        manifest = self._manifest_or_raise(run, step)
        return self._verify_objects(self._step_prefix(run, step), manifest, self.checkpoint_uri(run, step))

    # ------------------------------------------------------------ save / load (torch, lazily)
    def save_checkpoint(self, run: str, step: int, state_dict, meta: Mapping | None = None, *,
                        overwrite: bool = False, thread_count: int | None = None, process_group=None) -> CheckpointRef:
        """Save a (possibly DTensor-sharded) state dict. EVERY rank calls this; each rank writes its own
        shards in parallel, rank 0 writes the manifest last, and every rank returns the same ref.
        A failure on any rank raises the same typed StoreError on every rank. `process_group`: where the
        save's collectives run (the async Checkpointer's own group; default: the world).
        To save without stopping training, see flashops.storage.checkpointer.Checkpointer."""
        from flashops.storage import dcp

        _check_name("run", run)
        _check_step(step)
        fields = _meta_fields(meta)
        prefix = self._step_prefix(run, step)
        uri = self.checkpoint_uri(run, step)
        rank, world = dcp.rank_and_world(process_group)

        def prepare() -> None:
            if rank != 0:
                return  # rank 0 alone checks (or creates) the bucket and clears leftovers
            self.backend.ensure_ready(for_write=True)
            existing = [o.key for o in self.backend.list(prefix)]
            if prefix + MANIFEST_NAME in existing:
                if not overwrite:
                    raise AlreadyExistsError(
                        f"checkpoint {uri} already exists: pick another step, delete it, or pass overwrite=True")
                # Drop the manifest first so the checkpoint stops existing before its shards change.
                self.backend.delete([prefix + MANIFEST_NAME])
            leftovers = [k for k in existing if k != prefix + MANIFEST_NAME]
            unfinished = self.backend.discard_incomplete(prefix)
            if leftovers or unfinished:
                log.warning("removing %d leftover object(s) and %d unfinished write(s) of an earlier save of %s",
                            len(leftovers), unfinished, uri)
                self.backend.delete(leftovers)

        dcp.run_everywhere(prepare, group=process_group)
        if thread_count is None:
            thread_count = 4 if isinstance(self.backend, S3Backend) else 2
        written = dcp.save(self.backend, prefix, state_dict, thread_count=thread_count, group=process_group)
        objects = dcp.gather_to_rank0(written, group=process_group)

        def finish() -> str:
            if rank != 0:
                return ""
            manifest = Manifest(
                {"format": CHECKPOINT_FORMAT, "run": run, "step": step, "world_size": world, "created": _now(),
                 **fields},
                {k: ObjectEntry(size, sha) for k, (size, sha) in objects.items()},
            )
            return self._write_manifest(prefix, manifest)

        manifest_sha = dcp.run_everywhere(finish, broadcast=True, group=process_group)
        return CheckpointRef(run, step, uri, manifest_sha, "")

    def load_checkpoint(self, ref: Ref, state_dict, *, verify: bool = True) -> CheckpointMeta:
        """Load into `state_dict` in place (every rank calls; DCP reshards to this world size / layout).
        With verify=True (default) every object read is checked against its sha256 in the manifest."""
        from flashops.storage import dcp

        run, step = self._resolve(ref)
        manifest = self._manifest_or_raise(run, step)
        prefix = self._step_prefix(run, step)
        dcp.load(self.backend, prefix, state_dict, manifest.objects if verify else None,
                 uri=self.checkpoint_uri(run, step))
        return _meta_from_manifest(self.checkpoint_uri(run, step), manifest)

    def open_tensors(self, ref: Ref, *, verify: bool = True):
        """A reader of the checkpoint's tensors one at a time (flashops.storage.dcp.CheckpointTensors), for
        exports that never hold the whole model. verify=True first re-hashes every shard against the
        manifest, streamed (the reader's range reads cannot be hashed on their own)."""
        from flashops.storage import dcp

        run, step = self._resolve(ref)
        manifest = self._manifest_or_raise(run, step)
        prefix, uri = self._step_prefix(run, step), self.checkpoint_uri(run, step)
        if verify:
            self._verify_objects(prefix, manifest, uri)
        return dcp.CheckpointTensors(self.backend, prefix, manifest.objects, uri)

    def meta(self, ref: Ref) -> CheckpointMeta:
        run, step = self._resolve(ref)
        return _meta_from_manifest(self.checkpoint_uri(run, step), self._manifest_or_raise(run, step))

    # ------------------------------------------------------------ retention
    def pin(self, ref: Ref, by: str) -> None:
        """Protect a checkpoint from gc, e.g. by="deployment-chat-v1" or by="resume-run-2"."""
        run, step = self._resolve(ref)
        _check_name("by", by)
        self._manifest_or_raise(run, step)
        self.backend.put_bytes(f"runs/{run}/pins/step-{step}/{by}", json.dumps({"pinned": _now()}).encode())

    def unpin(self, ref: Ref, by: str) -> None:
        run, step = self._resolve(ref)
        self.backend.delete([f"runs/{run}/pins/step-{step}/{_check_name('by', by)}"])

    def gc(self, run: str, keep: int, pinned: Iterable[Ref | int] = (), *, dry_run: bool = False) -> GcReport:
        """Keep the newest `keep` complete checkpoints of `run`, every pinned one (argument or `pin()`), and
        delete the rest; also remove leftovers of crashed saves older than the newest complete checkpoint
        (newer ones may be a save in progress). A checkpoint's manifest is deleted before its shards."""
        _check_name("run", run)
        if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
            raise StoreConfigError(f"keep={keep!r} must be an integer >= 1 (the newest checkpoint is always kept)")
        if not self.backend.ensure_ready(for_write=False):
            return GcReport([], [], [], dry_run)
        pinned_steps = {self._resolve(p, run=run) for p in pinned}
        bad = [f"{r}/step-{s}" for r, s in pinned_steps if r != run]
        if bad:
            raise StoreConfigError(f"pinned={bad} are not checkpoints of run {run!r}")
        scanned, pins = self._scan_run(run)
        steps = [(s, self._manifest_of(run, s, objs), objs) for s, objs in scanned]
        pinned_set = {s for _, s in pinned_steps} | set(pins)
        complete = [(s, m) for s, m, objs in steps if self._complete(run, s, m, objs, warn=False)]
        newest = complete[0][0] if complete else None
        keep_steps = {s for s, _ in complete[:keep]} | pinned_set
        kept, deleted, removed = [], [], []
        complete_steps = {s for s, _ in complete}
        for step, manifest, objs in steps:
            prefix = self._step_prefix(run, step)
            uri = self.checkpoint_uri(run, step)
            if step in keep_steps:
                if step in complete_steps:
                    kept.append(self._ref(run, step, manifest))
                continue
            if step not in complete_steps:
                if newest is None or step > newest:
                    continue  # possibly a save in progress
                removed.append(uri)
                if not dry_run:
                    self.backend.discard_incomplete(prefix)
            else:
                deleted.append(uri)
            if not dry_run:
                keys = [prefix + k for k in objs]
                if MANIFEST_NAME in objs:
                    self.backend.delete([prefix + MANIFEST_NAME])
                    keys.remove(prefix + MANIFEST_NAME)
                self.backend.delete(keys)
        return GcReport(sorted(kept, key=lambda r: r.step), deleted, removed, dry_run)

    # ------------------------------------------------------------ models
    def _resolve_model(self, ref) -> tuple[str, str]:
        if isinstance(ref, ModelRef):
            return ref.name, ref.version
        m = MODEL_URI.match(str(ref))
        if not m:
            raise StoreConfigError(f"model reference {ref!r} is not a model URI: expected <store>/models/<name>/"
                                   f"<version>, e.g. {self.model_uri('joyai-flash', 'v1')}")
        if m["root"].rstrip("/") != self.uri:
            raise StoreConfigError(f"model {ref!r} is not in store {self.uri}: open_store({m['root']!r}) instead")
        return m["name"], m["version"]

    def _model_manifest_or_raise(self, name: str, version: str) -> Manifest:
        self.backend.ensure_ready(for_write=False)
        try:
            return self._read_manifest(f"models/{name}/{version}/{MANIFEST_NAME}")
        except ObjectNotFoundError as e:
            raise CheckpointNotFoundError(
                f"no exported model at {self.model_uri(name, version)} (no {MANIFEST_NAME}); export it first"
            ) from e

    def begin_model(self, name: str, version: str, *, overwrite: bool = False) -> "ModelWriter":
        """Start writing an exported model under models/<name>/<version>/: stream each file with
        `writer.open(rel)` (or `put`), then `writer.commit(meta)` writes the manifest LAST. Until then the model
        does not exist (a crash leaves objects without a manifest, which the next export clears)."""
        _check_name("name", name)
        _check_name("version", version)
        prefix = f"models/{name}/{version}/"
        self.backend.ensure_ready(for_write=True)
        existing = [o.key for o in self.backend.list(prefix)]
        if prefix + MANIFEST_NAME in existing:
            if not overwrite:
                raise AlreadyExistsError(f"model {self.model_uri(name, version)} already exists: "
                                         "bump the version or pass overwrite=True")
            self.backend.delete([prefix + MANIFEST_NAME])
        if existing:
            self.backend.delete([k for k in existing if k != prefix + MANIFEST_NAME])
        self.backend.discard_incomplete(prefix)
        return ModelWriter(self, name, version, prefix)

    def export_model(self, name: str, version: str, files: Mapping[str, Union[str, Path, bytes]] | Iterable[Path],
                     meta: Mapping | None = None, *, overwrite: bool = False) -> ModelRef:
        """Upload model files (e.g. model.safetensors, config.json, tokenizer.json) under
        models/<name>/<version>/ in parallel, then their manifest last."""
        if not isinstance(files, Mapping):
            files = {Path(f).name: Path(f) for f in files}
        if not files:
            raise StoreConfigError("files is empty: pass {'model.safetensors': path, ...}")
        for rel in files:
            _check_rel(rel)
        writer = self.begin_model(name, version, overwrite=overwrite)

        def upload(item) -> None:
            rel, src = item
            if isinstance(src, (bytes, bytearray, memoryview)):
                writer.put(rel, src)
            else:
                writer.put_file(rel, src)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(upload, files.items()))
        return writer.commit(meta)

    def list_models(self) -> list[ModelRef]:
        if not self.backend.ensure_ready(for_write=False):
            return []
        out = []
        for o in self.backend.list("models/"):
            parts = o.key.split("/")
            if len(parts) == 4 and parts[3] == MANIFEST_NAME:
                out.append(ModelRef(parts[1], parts[2], self.model_uri(parts[1], parts[2])))
        return sorted(out, key=lambda r: (r.name, r.version))

    def model_manifest(self, ref) -> dict:
        name, version = self._resolve_model(ref)
        m = self._model_manifest_or_raise(name, version)
        doc = json.loads(m.to_bytes())
        doc["manifest_sha256"] = m.sha256
        return doc

    def fetch_model(self, ref, dest: Union[str, Path], only: Callable[[str], bool] | None = None) -> Path:
        """Download an exported model into `dest` (a directory), checking every file's sha256; files
        already in `dest` with the right hash are not downloaded again. `only(rel)`: fetch just the files it
        accepts (e.g. one variant of the export). Returns `dest`."""
        name, version = self._resolve_model(ref)
        manifest = self._model_manifest_or_raise(name, version)
        prefix = f"models/{name}/{version}/"
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        uri = self.model_uri(name, version)

        def fetch(item: tuple[str, ObjectEntry]) -> None:
            rel, entry = item
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.is_file() and target.stat().st_size == entry.size and _file_sha256(target) == entry.sha256:
                return  # already fetched (a restarted predictor): keep it
            # Download next to the target, check, then rename: a bad or half download never sits at `target`.
            tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
            try:
                size, sha = self.backend.get_to_file(prefix + rel, tmp)
                if size != entry.size or sha != entry.sha256:
                    raise CorruptObjectError(
                        f"{self.backend.url(prefix + rel)} is corrupt: expected {entry.size} bytes with sha256 "
                        f"{entry.sha256}, got {size} bytes with sha256 {sha}; {uri} cannot be trusted: re-export it",
                        key=rel, expected_sha256=entry.sha256, actual_sha256=sha)
                os.replace(tmp, target)
            finally:
                tmp.unlink(missing_ok=True)

        wanted = [item for item in manifest.objects.items() if only is None or only(item[0])]
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(fetch, wanted))
        (dest / MANIFEST_NAME).write_bytes(manifest.to_bytes())
        return dest


class ModelWriter:
    """Files of one exported model, streamed into the store; the manifest is written last (`commit`).

        writer = store.begin_model("chat", "v1")
        with writer.open("model-00001-of-00002.safetensors") as f:   # a file-like writer, hashed as it goes
            f.write(header); f.write(tensor_bytes)
        writer.put("config.json", b"{...}")
        ref = writer.commit({"checkpoint": uri})
    """

    def __init__(self, store: CheckpointStore, name: str, version: str, prefix: str):
        self.store, self.name, self.version, self.prefix = store, name, version, prefix
        self.objects: dict[str, ObjectEntry] = {}
        self._lock = threading.Lock()

    def _record(self, rel: str, entry: ObjectEntry) -> None:
        with self._lock:
            if rel in self.objects:
                raise StoreConfigError(f"{rel!r} was already written to this model")
            self.objects[rel] = entry

    @contextmanager
    def open(self, rel: str):
        _check_rel(rel)
        stream = self.store.backend.open_writer(self.prefix + rel)
        try:
            yield stream
        except BaseException:
            stream.abort()
            raise
        self._record(rel, ObjectEntry(*stream.commit()))

    def put(self, rel: str, data) -> None:
        _check_rel(rel)
        self.store.backend.put_bytes(self.prefix + rel, data)
        self._record(rel, ObjectEntry(len(data), sha256_of(data)))

    def put_file(self, rel: str, src: Union[str, Path]) -> None:
        _check_rel(rel)
        if not Path(src).is_file():
            raise StoreConfigError(f"files[{rel!r}] = {str(src)!r} is not a file")
        self._record(rel, ObjectEntry(*self.store.backend.put_file(self.prefix + rel, Path(src))))

    def commit(self, meta: Mapping | None = None) -> ModelRef:
        if not self.objects:
            raise StoreConfigError("an exported model needs at least one file")
        manifest = Manifest({"format": MODEL_FORMAT, "name": self.name, "version": self.version, "created": _now(),
                             "meta": dict(meta or {})}, dict(self.objects))
        sha = self.store._write_manifest(self.prefix, manifest)
        return ModelRef(self.name, self.version, self.store.model_uri(self.name, self.version), sha)

    def abort(self) -> None:
        """Remove what was written (no manifest was): for a failed export."""
        self.store.backend.delete([self.prefix + rel for rel in self.objects])
        self.objects.clear()


def _check_rel(rel: str) -> None:
    if not isinstance(rel, str) or not rel or rel == MANIFEST_NAME or rel.startswith("/") \
            or ".." in rel.split("/") or "" in rel.split("/"):
        raise StoreConfigError(f"file name {rel!r} is not allowed in a model: use a relative name such as "
                               "'config.json' or 'int4/config.json'")


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(8 * 1024 * 1024):
            h.update(chunk)
    return h.hexdigest()


def check_object(url: str, key: str, size: int, sha256: str, entry: ObjectEntry, owner_uri: str) -> None:
    """Raise CorruptObjectError unless (size, sha256) is what the manifest recorded for the object."""
    if size != entry.size or sha256 != entry.sha256:
        raise CorruptObjectError(
            f"{url} is corrupt: expected {entry.size} bytes with sha256 {entry.sha256}, got {size} bytes with "
            f"sha256 {sha256}; {owner_uri} cannot be trusted: resume from an older checkpoint "
            "(flashops checkpoints list) or re-export", key=key, expected_sha256=entry.sha256, actual_sha256=sha256)


def _meta_fields(meta: Mapping | None) -> dict:
    meta = dict(meta or {})
    for k in meta:
        if not isinstance(k, str):
            raise StoreConfigError(f"meta key {k!r} must be a string")
    out = {k: meta.pop(k) for k in _META_FIELDS if k in meta}
    if out.get("parent") is not None:
        out["parent"] = str(out["parent"])
    out["extra"] = meta
    try:
        json.dumps(out)
    except TypeError as e:
        raise StoreConfigError(f"meta must be JSON-serialisable (numbers, strings, lists, dicts): {e}") from e
    return out


def _meta_from_manifest(uri: str, m: Manifest) -> CheckpointMeta:
    f = m.fields
    return CheckpointMeta(
        run=f["run"], step=int(f["step"]), uri=uri, world_size=int(f.get("world_size", 1)),
        created=str(f.get("created", "")), manifest_sha256=m.sha256, parent=f.get("parent"),
        spec_hash=f.get("spec_hash"), model_config=f.get("model_config"), metrics=f.get("metrics") or {},
        extra={k: v for k, v in (f.get("extra") or {}).items()} | {k: f[k] for k in ("stage", "dataset") if k in f},
        total_bytes=m.total_bytes,
    )


# ---------------------------------------------------------------- opening
def default_store_uri() -> str:
    return f"file://{flashops_home() / 'store'}"


def open_store(uri: str | None = None, **s3_overrides) -> CheckpointStore:
    """`file:///dir`, `s3://bucket/prefix` or None (the embedded default, file://$FLASHOPS_HOME/store).
    s3_overrides are S3Settings fields (endpoint, access_key, secret_key, secure, create_bucket, ...)."""
    uri = default_store_uri() if uri is None else str(uri)
    if uri.startswith("/"):
        uri = "file://" + uri
    parts = urlsplit(uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise StoreConfigError(f"store URI {uri!r}: a file URI needs an absolute path, e.g. file:///data/store "
                                   "(three slashes)")
        if s3_overrides:
            raise StoreConfigError(f"S3 settings {sorted(s3_overrides)} given for a file:// store {uri!r}")
        path = Path(parts.path)
        return CheckpointStore(FileBackend(path), f"file://{path}")
    if parts.scheme == "s3":
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if not _BUCKET.match(bucket or ""):
            raise StoreConfigError(f"store URI {uri!r}: bucket {bucket!r} is not a valid S3 bucket name (3-63 "
                                   "lowercase letters, digits, '.' or '-'), e.g. s3://checkpoints/team-a")
        if parts.query or parts.fragment:
            raise StoreConfigError(f"store URI {uri!r}: no query or fragment allowed; set the endpoint with "
                                   "FLASHOPS_S3_ENDPOINT")
        settings = resolve_s3_settings(**s3_overrides)
        return CheckpointStore(S3Backend(bucket, prefix, settings), f"s3://{bucket}" + (f"/{prefix}" if prefix else ""))
    raise StoreConfigError(f"store URI {uri!r}: scheme must be file:// or s3://, e.g. s3://checkpoints/team-a or "
                           "file:///data/store")


def split_checkpoint_uri(uri: str) -> tuple[str, str, int]:
    """'s3://b/p/runs/r/step-7' -> ('s3://b/p', 'r', 7)."""
    m = _CKPT_URI.match(str(uri))
    if not m:
        raise StoreConfigError(f"{uri!r} is not a checkpoint URI: expected <store>/runs/<run>/step-<n>")
    return m["root"], m["run"], int(m["step"])


def exported_model_uri(checkpoint_uri: str) -> str:
    """<store>/runs/<run>/step-<n> -> <store>/models/<run>/step-<n>; a model URI unchanged. The rule (and the
    name a pipeline's export takes) is flashops.api.pipeline.export_location; this raises StoreConfigError."""
    from flashops.api.pipeline import export_location

    try:
        return export_location(checkpoint_uri)
    except ValueError as e:
        raise StoreConfigError(str(e)) from None


def load_checkpoint(uri: str, state_dict, **kw) -> CheckpointMeta:
    """Load a checkpoint given only its URI (opens the store it lives in)."""
    root, _, _ = split_checkpoint_uri(uri)
    return open_store(root).load_checkpoint(uri, state_dict, **kw)


def fetch_model(uri: str, dest: Union[str, Path], only: Callable[[str], bool] | None = None) -> Path:
    """Download and verify an exported model given only its URI (<store>/models/<name>/<version>); `only(rel)`
    picks the files to fetch (default: all)."""
    m = MODEL_URI.match(str(uri))
    if not m:
        raise StoreConfigError(f"{uri!r} is not a model URI: expected <store>/models/<name>/<version>")
    return open_store(m["root"]).fetch_model(uri, dest, only)
