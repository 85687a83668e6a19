"""torch.distributed.checkpoint (DCP) on top of an object backend. The only module of flashops.storage
that imports torch; `store.py` imports it lazily inside save/load, so the operator never loads torch.

DCP does the planning and resharding (DTensor / sharded tensors saved at one world size load at any
other); we only supply where the bytes go. Each shard file is written through a HashingWriter, so its
size and sha256 are known without a second read, and read back through a check against the manifest.
"""
from __future__ import annotations

import io
import pickle
import threading
from contextlib import contextmanager
from typing import Callable, Mapping, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata

from flashops.storage.backends import ObjectBackend
from flashops.storage.errors import StoreError

T = TypeVar("T")


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def run_everywhere(fn: Callable[[], T], broadcast: bool = False) -> T:
    """Run fn on every rank; if it fails on any rank, raise on every rank (no rank left waiting in a
    collective). With broadcast, every rank returns rank 0's result."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # re-raised below, on every rank
        error = e
    if not _distributed():
        if error is not None:
            raise error
        return result
    outcomes: list = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, (None if error is None else f"{type(error).__name__}: {error}", result))
    if error is not None:
        raise error
    failed = [(r, msg) for r, (msg, _) in enumerate(outcomes) if msg]
    if failed:
        rank, msg = failed[0]
        raise StoreError(f"checkpoint step failed on rank {rank}: {msg}")
    return outcomes[0][1] if broadcast else result


def gather_to_rank0(local: Mapping[str, tuple[int, str]]) -> dict[str, tuple[int, str]]:
    """Merge every rank's {key: (size, sha256)}; every rank gets the union (cheap: a few keys per rank)."""
    if not _distributed():
        return dict(local)
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, dict(local))
    merged: dict[str, tuple[int, str]] = {}
    for p in parts:
        merged.update(p)
    return merged


class _MemoryReader(io.RawIOBase):
    """A seekable read-only view of a downloaded shard (io.BytesIO would copy the whole buffer)."""

    def __init__(self, data):
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), len(self._view) - self._pos)
        if n <= 0:
            return 0
        memoryview(b).cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


@contextmanager
def _quiet_single_process():
    """DCP warns on every single-process save/load; that is our normal local case, not a mistake."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


@contextmanager
def _store_errors_unwrapped():
    """DCP wraps every rank's failure into one CheckpointException; surface our typed StoreError (this
    rank's own if it has one) so callers can catch CorruptObjectError, CredentialsError, ..."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        rank, _ = rank_and_world()
        store_errors = {r: exc for r, (exc, _tb) in e.failures.items() if isinstance(exc, StoreError)}
        if rank in store_errors:
            raise store_errors[rank] from e
        if store_errors:
            r, exc = min(store_errors.items())
            raise type(exc)(f"on rank {r}: {exc}") from e
        raise


class _BackendFS(FileSystemBase):
    """DCP's file-system hooks mapped onto an ObjectBackend (paths are store keys)."""

    def __init__(self, backend: ObjectBackend, expected: Mapping | None = None, prefix: str = "", uri: str = ""):
        self.backend = backend
        self.expected, self.prefix, self.uri = expected, prefix, uri
        self.written: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()

    @contextmanager
    def create_stream(self, path, mode: str):
        key = str(path)
        if mode == "wb":
            stream = self.backend.open_writer(key)
            try:
                yield stream
            except BaseException:
                stream.abort()
                raise
            size, sha = stream.commit()
            with self._lock:
                self.written[key[len(self.prefix):]] = (size, sha)
        elif mode == "rb":
            data = self.backend.get_bytes(key)
            if self.expected is not None:
                rel = key[len(self.prefix):]
                entry = self.expected.get(rel)
                if entry is None:
                    raise StoreError(f"{self.backend.url(key)} is not listed in the manifest of {self.uri}: "
                                     "the checkpoint was modified after it was saved; re-save it")
                from flashops.storage.store import _check_bytes

                _check_bytes(self.backend.url(key), rel, data, entry, self.uri)
            yield _MemoryReader(data)
        else:
            raise ValueError(f"unsupported mode {mode!r}")

    def concat_path(self, path, suffix: str) -> str:
        return f"{str(path).rstrip('/')}/{suffix}"

    def init_path(self, path) -> str:
        return str(path)

    def rename(self, path, new_path) -> None:
        raise NotImplementedError("object stores have no rename; _StoreWriter.finish writes .metadata directly")

    def mkdir(self, path) -> None:
        pass  # keys need no directories

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True

    def exists(self, path) -> bool:
        return self.backend.exists(str(path))

    def rm_file(self, path) -> None:
        self.backend.delete([str(path)])


class _StoreWriter(FileSystemWriter):
    def __init__(self, backend: ObjectBackend, prefix: str, thread_count: int):
        # sync_files=False: the backend makes each object durable on commit (fsync+rename, or S3 PUT);
        # DCP's fallback for streams without a file descriptor would be a machine-wide os.sync().
        super().__init__(prefix, single_file_per_rank=True, sync_files=False, thread_count=thread_count,
                         overwrite=True)
        self.fs = _BackendFS(backend, prefix=prefix)
        self.path = prefix.rstrip("/")

    def _metadata_exists(self) -> bool:
        return False  # the store cleared this step's prefix before the save started

    def finish(self, metadata: Metadata, results) -> None:
        # As DCP's, minus the write-to-.tmp-then-rename dance: atomicity comes from our manifest.
        from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION

        metadata.version = CURRENT_DCP_VERSION
        storage_md = {}
        for wr_list in results:
            storage_md.update({wr.index: wr.storage_data for wr in wr_list})
        metadata.storage_data = storage_md
        metadata.storage_meta = self.storage_meta()
        with self.fs.create_stream(self.fs.concat_path(self.path, ".metadata"), "wb") as f:
            pickle.dump(metadata, f)


class _StoreReader(FileSystemReader):
    def __init__(self, backend: ObjectBackend, prefix: str, expected: Mapping | None, uri: str):
        super().__init__(prefix)
        self.fs = _BackendFS(backend, expected, prefix=prefix, uri=uri)
        self.path = prefix.rstrip("/")


def save(backend: ObjectBackend, prefix: str, state_dict, thread_count: int = 4) -> dict[str, tuple[int, str]]:
    """Write this rank's shards (and, on rank 0, DCP's .metadata); return {key: (size, sha256)} written
    by this rank, keys relative to `prefix`."""
    import torch.distributed.checkpoint as dcp

    writer = _StoreWriter(backend, prefix, thread_count)
    with torch.no_grad(), _quiet_single_process(), _store_errors_unwrapped():
        dcp.save(state_dict, storage_writer=writer, no_dist=not _initialized())
    return writer.fs.written


def load(backend: ObjectBackend, prefix: str, state_dict, expected: Mapping | None, uri: str) -> None:
    import torch.distributed.checkpoint as dcp

    with torch.no_grad(), _quiet_single_process(), _store_errors_unwrapped():
        dcp.load(state_dict, storage_reader=_StoreReader(backend, prefix, expected, uri), no_dist=not _initialized())
