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


def rank_and_world(group=None) -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def _distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def same_error(error_type: str, message: str) -> Exception:
    """Rebuild another rank's StoreError as the same type here, so every rank raises the same typed error
    (CredentialsError on one rank is CredentialsError on all); other errors become a plain StoreError."""
    from flashops.storage import errors

    cls = getattr(errors, error_type, None)
    if isinstance(cls, type) and issubclass(cls, StoreError):
        return cls(message)
    return StoreError(f"{error_type}: {message}")


def run_everywhere(fn: Callable[[], T], broadcast: bool = False, group=None) -> T:
    """Run fn on every rank; if it fails on any rank, raise on every rank (no rank left waiting in a
    collective), as the same typed StoreError. With broadcast, every rank returns rank 0's result.
    `group`: the process group of the collectives (the async checkpointer's own; default: the world)."""
    result, error = None, None
    try:
        result = fn()
    except Exception as e:  # re-raised below, on every rank
        error = e
    if not _distributed(group):
        if error is not None:
            raise error
        return result
    outcomes: list = [None] * dist.get_world_size(group)
    failure = None if error is None else (type(error).__name__, str(error))
    dist.all_gather_object(outcomes, (failure, result), group=group)
    if error is not None:
        raise error
    failed = [(r, f) for r, (f, _) in enumerate(outcomes) if f]
    if failed:
        rank, (error_type, message) = failed[0]
        raise same_error(error_type, f"checkpoint step failed on rank {rank}: {message}")
    return outcomes[0][1] if broadcast else result


def gather_to_rank0(local: Mapping[str, tuple[int, str]], group=None) -> dict[str, tuple[int, str]]:
    """Merge every rank's {key: (size, sha256)}; every rank gets the union (cheap: a few keys per rank)."""
    if not _distributed(group):
        return dict(local)
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, dict(local), group=group)
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


_crc_lock = threading.Lock()
_crc_users = 0


@contextmanager
def _no_zip_crc32():
    """DCP writes each tensor with torch.save, whose zip records carry a CRC32 of the bytes: a second checksum
    pass (about 0.2 CPU-s per GB here) next to the sha256 the store computes as the bytes stream out and
    checks on every load. torch.load does not need it (torch.serialization.set_crc32_options says so).
    The switch is process-wide, so it is held off while any save runs and restored after the last one."""
    global _crc_users
    from torch.serialization import get_crc32_options, set_crc32_options

    with _crc_lock:
        if _crc_users == 0:
            _no_zip_crc32.previous = get_crc32_options()
            set_crc32_options(False)
        _crc_users += 1
    try:
        yield
    finally:
        with _crc_lock:
            _crc_users -= 1
            if _crc_users == 0:
                set_crc32_options(_no_zip_crc32.previous)


@contextmanager
def _store_errors_unwrapped(group=None):
    """DCP wraps every rank's failure into one CheckpointException; surface our typed StoreError (this
    rank's own if it has one) so callers can catch CorruptObjectError, CredentialsError, ..."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as e:
        rank, _ = rank_and_world(group)
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
            if self.expected is None:
                data = self.backend.get_bytes(key)
            else:
                rel = key[len(self.prefix):]
                entry = self.expected.get(rel)
                if entry is None:
                    raise StoreError(f"{self.backend.url(key)} is not listed in the manifest of {self.uri}: "
                                     "the checkpoint was modified after it was saved; re-save it")
                data, sha = self.backend.get_bytes_hashed(key)  # hashed as it arrives: no second pass
                from flashops.storage.store import check_object

                check_object(self.backend.url(key), rel, len(data), sha, entry, self.uri)
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


def save(backend: ObjectBackend, prefix: str, state_dict, thread_count: int = 4,
         group=None) -> dict[str, tuple[int, str]]:
    """Write this rank's shards (and, on rank 0, DCP's .metadata); return {key: (size, sha256)} written
    by this rank, keys relative to `prefix`."""
    import torch.distributed.checkpoint as dcp

    writer = _StoreWriter(backend, prefix, thread_count)
    with torch.no_grad(), _quiet_single_process(), _store_errors_unwrapped(group), _no_zip_crc32():
        dcp.save(state_dict, storage_writer=writer, process_group=group, no_dist=not _initialized())
    return writer.fs.written


def load(backend: ObjectBackend, prefix: str, state_dict, expected: Mapping | None, uri: str) -> None:
    import torch.distributed.checkpoint as dcp

    with torch.no_grad(), _quiet_single_process(), _store_errors_unwrapped():
        dcp.load(state_dict, storage_reader=_StoreReader(backend, prefix, expected, uri), no_dist=not _initialized())


class CheckpointTensors:
    """One tensor of a DCP checkpoint at a time, for exports that must not hold the model.

        tensors = store.open_tensors(checkpoint_uri)        # reads and checks .metadata only
        tensors.entries("model.")                           # {"model.norm.weight": (shape, dtype), ...}
        t = tensors.read("model.norm.weight")               # a full (unsharded) CPU tensor

    `read` fetches only the byte ranges of that tensor's chunks (ranged GETs on S3, one per chunk and rank
    file), so memory is the tensor plus one chunk in flight, whatever the checkpoint's size. A range read
    cannot be hashed against the manifest (it records whole shard files): callers check the shards first with
    `CheckpointStore.verify` (streamed, bounded memory), as `open_tensors(verify=True)` does.
    """

    def __init__(self, backend: ObjectBackend, prefix: str, expected: Mapping | None, uri: str):
        self.backend, self.prefix, self.uri = backend, prefix, uri
        fs = _BackendFS(backend, expected, prefix=prefix, uri=uri)
        with fs.create_stream(prefix + ".metadata", "rb") as f:
            self.metadata: Metadata = pickle.loads(f.read())

    def entries(self, prefix: str = "") -> dict[str, tuple[torch.Size, torch.dtype]]:
        """Every tensor whose key starts with `prefix` (the state dict is flattened: "model.<param>"),
        with its full shape and dtype, in the checkpoint's order."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        return {k: (md.size, md.properties.dtype) for k, md in self.metadata.state_dict_metadata.items()
                if k.startswith(prefix) and isinstance(md, TensorStorageMetadata)}

    def read(self, key: str) -> torch.Tensor:
        from torch.distributed.checkpoint.metadata import MetadataIndex, TensorStorageMetadata

        md = self.metadata.state_dict_metadata.get(key)
        if not isinstance(md, TensorStorageMetadata):
            raise StoreError(f"{self.uri} holds no tensor {key!r}; tensors: see CheckpointTensors.entries()")
        out = torch.empty(md.size, dtype=md.properties.dtype)
        for chunk in md.chunks:
            info = self.metadata.storage_data[MetadataIndex(key, chunk.offsets)]
            if getattr(info, "transform_descriptors", None):
                raise StoreError(f"{self.uri}: {key} was saved with DCP transforms {info.transform_descriptors}, "
                                 "which the streaming reader does not decode; load it with load_checkpoint")
            raw = self.backend.read_range(self.prefix + info.relative_path, info.offset, info.length)
            part = torch.load(_MemoryReader(raw), map_location="cpu", weights_only=True)
            del raw
            region = out[tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))]
            if region.shape != part.shape:
                raise StoreError(f"{self.uri}: chunk of {key} at {list(chunk.offsets)} has shape {list(part.shape)}, "
                                 f"the metadata says {list(chunk.sizes)}; the checkpoint is damaged")
            region.copy_(part)
            del part
        return out
