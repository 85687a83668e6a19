"""Object backends: the few byte-level operations the checkpoint store needs, for a local directory
(`file://`) and an S3 bucket (`s3://`, through the `minio` client). Torch-free.

Keys are relative to the store root and always use '/'. Writes are all-or-nothing per object: the file
backend writes a temporary file, fsyncs it and renames it into place; S3 makes an object visible only
when its (multipart) upload completes. Only temporary errors are retried, with exponential backoff.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import logging
import os
import random
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from flashops.storage.errors import (
    BucketMissingError,
    CorruptObjectError,
    CredentialsError,
    EndpointUnreachableError,
    ObjectNotFoundError,
    StoreConfigError,
    StoreError,
    TLSError,
    TransientStoreError,
)
from flashops.storage.settings import S3Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
_HASH_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int


def sha256_of(data) -> str:
    h = hashlib.sha256()
    mv = memoryview(data)
    for i in range(0, len(mv), _HASH_CHUNK):
        h.update(mv[i : i + _HASH_CHUNK])
    return h.hexdigest()


MIN_PART = 8 * 1024 * 1024    # below this, per-request overhead dominates (S3's floor is 5 MiB)
MAX_PART = 64 * 1024 * 1024   # above this, fewer parts than connections and more memory per part
MAX_PARTS = 10_000            # S3's limit per multipart upload


@dataclass(frozen=True)
class TransferPlan:
    """How one object moves: parts of `part_size` bytes, `concurrency` of them in flight at once.
    A streamed upload (size unknown up front) doubles its part size every 1000 parts, so even a 5 TB
    object stays under S3's 10,000-part limit while a small one keeps small parts."""

    part_size: int
    concurrency: int
    grows: bool = False

    def part_size_for(self, number: int) -> int:
        return self.part_size << ((number - 1) // 1000) if self.grows else self.part_size

    def ranges(self, size: int) -> list[tuple[int, int]]:
        return [(o, min(self.part_size, size - o)) for o in range(0, size, self.part_size)]


def transfer_plan(size: int, settings: S3Settings) -> TransferPlan:
    """Part size and concurrency from the object's size: one request up to `settings.part_size`; above it
    about two parts per connection (every connection busy, the last part not a long tail), each part
    between 8 and 64 MiB, never more than 10,000 parts; at most `settings.parallelism` in flight."""
    if size <= settings.part_size:
        return TransferPlan(max(size, 1), 1)
    part = -(-size // (2 * settings.parallelism))
    part = max(MIN_PART, min(MAX_PART, part), -(-size // MAX_PARTS))
    part = -(-part // (1024 * 1024)) * 1024 * 1024  # whole MiB
    return TransferPlan(part, min(settings.parallelism, -(-size // part)))


def streaming_plan(settings: S3Settings) -> TransferPlan:
    """For an upload whose size is not known until it ends (a DCP shard as it is serialised)."""
    return TransferPlan(settings.part_size, settings.parallelism, grows=True)


class BufferPool:
    """Part buffers reused across uploads: a fresh 16 MiB bytearray costs page faults and zeroing on every
    part; a kept one does not. Holds at most `keep` idle buffers (memory stays bounded)."""

    def __init__(self, keep: int):
        self.keep = keep
        self._idle: dict[int, list[bytearray]] = defaultdict(list)
        self._lock = threading.Lock()

    def take(self, size: int) -> bytearray:
        with self._lock:
            idle = self._idle.get(size)
            if idle:
                return idle.pop()
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        with self._lock:
            if sum(len(v) for v in self._idle.values()) < self.keep:
                self._idle[len(buf)].append(buf)


class HashingWriter(io.RawIOBase):
    """A write-only stream that hashes what passes through and commits the object on `commit()`.
    DCP writes each shard file through one of these; `abort()` leaves nothing behind."""

    def __init__(self, sink, commit: Callable[[], None], abort: Callable[[], None]):
        self._sink, self._commit, self._abort = sink, commit, abort
        self._hash = hashlib.sha256()
        self.size = 0
        self.sha256 = ""

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        self._hash.update(mv)
        self._sink.write(mv)
        self.size += len(mv)
        return len(mv)

    def tell(self) -> int:
        return self.size

    def commit(self) -> tuple[int, str]:
        self.sha256 = self._hash.hexdigest()
        self._commit()
        return self.size, self.sha256

    def abort(self) -> None:
        self._abort()


class ObjectBackend:
    """What a store needs from object storage."""

    def url(self, key: str = "") -> str: ...
    def put_bytes(self, key: str, data) -> None: ...
    def open_writer(self, key: str) -> HashingWriter: ...
    def get_bytes(self, key: str) -> bytes | bytearray: ...
    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...
    def delete(self, keys: list[str]) -> None: ...
    def exists(self, key: str) -> bool: ...
    def ensure_ready(self, for_write: bool) -> bool: ...

    def check_writable(self) -> None:
        """Write and delete a probe object (StoreError if that fails)."""
        self.ensure_ready(for_write=True)
        probe = f".flashops-write-check-{uuid.uuid4().hex[:12]}"
        try:
            self.put_bytes(probe, b"ok")
            self.delete([probe])
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the client raises, the answer is "not writable"
            raise StoreError(f"store {self.url()} is not writable ({getattr(e, 'strerror', None) or e}): pick a "
                             "writable location (file:///some/dir or s3://bucket/prefix) or fix its permissions") from None

    def incomplete(self, prefix: str) -> list[str]: ...
    def discard_incomplete(self, prefix: str) -> int:
        """Drop writes under prefix that never committed (a killed save); returns how many."""
        ...

    def iter_chunks(self, key: str) -> Iterator[bytes | bytearray]:
        yield self.get_bytes(key)

    def read_range(self, key: str, offset: int, length: int) -> bytearray:
        """`length` bytes of the object from `offset` (a ranged GET on S3): what streaming readers use."""
        raise NotImplementedError

    def get_bytes_hashed(self, key: str) -> tuple[bytes | bytearray, str]:
        """The object's bytes and their sha256 (backends hash while the bytes arrive)."""
        data = self.get_bytes(key)
        return data, sha256_of(data)

    def hash_object(self, key: str) -> tuple[int, str]:
        """(size, sha256) of a stored object, streamed: memory stays at a few parts whatever the size."""
        h, size = hashlib.sha256(), 0
        for chunk in self.iter_chunks(key):
            h.update(chunk)
            size += len(chunk)
        return size, h.hexdigest()

    def get_to_file(self, key: str, dest: Path) -> tuple[int, str]:
        """Download into a temporary file next to dest; the caller checks the hash, then renames."""
        data = self.get_bytes(key)
        _atomic_write(dest, data, durable=False)
        return len(data), sha256_of(data)

    def put_file(self, key: str, src: Path) -> tuple[int, str]:
        """Stream a local file up (never whole in memory); returns (size, sha256)."""
        w = self.open_writer(key)
        try:
            with open(src, "rb", buffering=0) as f:
                while chunk := f.read(_HASH_CHUNK):
                    w.write(chunk)
        except BaseException:
            w.abort()
            raise
        return w.commit()


def _atomic_write(path: Path, data, durable: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- file://
class FileBackend(ObjectBackend):
    """A local directory. Durable: every object is fsynced before it is renamed into place."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def url(self, key: str = "") -> str:
        return f"file://{(self.root / key) if key else self.root}"

    def _path(self, key: str) -> Path:
        return self.root / key

    def ensure_ready(self, for_write: bool) -> bool:
        if not for_write:
            return self.root.is_dir()
        if for_write:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create store directory {self.root}: {e.strerror}; "
                                 "pick a writable path (file:///some/dir) or fix its permissions") from e
        return True

    def check_writable(self) -> None:
        """Create the directory, write and delete a probe file, then remove the directories it had to create."""
        missing = [p for p in [self.root, *self.root.parents] if not p.exists()]
        try:
            super().check_writable()
        finally:
            for p in missing:  # deepest first
                try:
                    p.rmdir()
                except OSError:
                    break

    def put_bytes(self, key: str, data) -> None:
        _atomic_write(self._path(key), data)

    def open_writer(self, key: str) -> HashingWriter:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")
        f = open(tmp, "wb", buffering=0)

        def commit():
            f.flush()
            os.fsync(f.fileno())
            f.close()
            os.replace(tmp, path)

        def abort():
            f.close()
            tmp.unlink(missing_ok=True)

        return HashingWriter(f, commit, abort)

    def get_bytes(self, key: str) -> bytearray:
        return self._read(key, None)

    def get_bytes_hashed(self, key: str) -> tuple[bytearray, str]:
        h = hashlib.sha256()
        return self._read(key, h), h.hexdigest()

    def _read(self, key: str, h) -> bytearray:
        """Read the whole file into one buffer, hashing each chunk right after it is read (when given h)."""
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                buf = bytearray(size)
                view, got = memoryview(buf), 0
                while got < size:
                    n = f.readinto(view[got : got + _HASH_CHUNK])
                    if not n:
                        break
                    if h is not None:
                        h.update(view[got : got + n])
                    got += n
                return buf if got == size else buf[:got]
        except FileNotFoundError as e:
            raise ObjectNotFoundError(f"{self.url(key)} does not exist") from e

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        if not base.is_dir():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.endswith(".partial"):
                    continue  # an in-flight (or crashed) write, never an object
                p = Path(dirpath) / name
                try:
                    size = p.stat().st_size
                except FileNotFoundError:
                    continue
                yield ObjectInfo(p.relative_to(self.root).as_posix(), size)

    def delete(self, keys: list[str]) -> None:
        dirs = set()
        for key in keys:
            self._path(key).unlink(missing_ok=True)
            dirs.add(self._path(key).parent)
        # Remove directories left empty (including crashed .partial files in them).
        for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
            while d != self.root and d.is_dir() and self.root in d.parents:
                for leftover in d.glob(".*.partial"):
                    leftover.unlink(missing_ok=True)
                try:
                    d.rmdir()
                except OSError:
                    break
                d = d.parent

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def read_range(self, key: str, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                f.seek(offset)
                got, view = 0, memoryview(buf)
                while got < length:
                    n = f.readinto(view[got:])
                    if not n:
                        break
                    got += n
        except FileNotFoundError as e:
            raise ObjectNotFoundError(f"{self.url(key)} does not exist") from e
        if got != length:
            raise CorruptObjectError(f"{self.url(key)} is shorter than expected: {offset + got} bytes, needed "
                                     f"{offset + length}; the object is truncated", key=key)
        return buf

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        try:
            with open(self._path(key), "rb", buffering=0) as f:
                while chunk := f.read(_HASH_CHUNK):
                    yield chunk
        except FileNotFoundError as e:
            raise ObjectNotFoundError(f"{self.url(key)} does not exist") from e

    def get_to_file(self, key: str, dest: Path) -> tuple[int, str]:
        h, size = hashlib.sha256(), 0
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            with open(self._path(key), "rb", buffering=0) as src, open(dest, "wb") as out:
                while chunk := src.read(_HASH_CHUNK):
                    h.update(chunk)
                    out.write(chunk)
                    size += len(chunk)
        except FileNotFoundError as e:
            raise ObjectNotFoundError(f"{self.url(key)} does not exist") from e
        return size, h.hexdigest()

    def incomplete(self, prefix: str) -> list[str]:
        base = self._path(prefix.rstrip("/")) if prefix else self.root
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob(".*.partial")) if base.is_dir() else []

    def discard_incomplete(self, prefix: str) -> int:
        found = self.incomplete(prefix)
        for key in found:
            self._path(key).unlink(missing_ok=True)
        return len(found)


# ---------------------------------------------------------------- s3://
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "InvalidToken",
                     "ExpiredToken", "InvalidSecurity", "AuthorizationHeaderMalformed"}
_TRANSIENT_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeTooSkewed",
                    "OperationAborted", "ServiceUnavailableException", "ThrottlingException"}


class S3Backend(ObjectBackend):
    """A bucket (and key prefix) on any S3 endpoint, through `minio`."""

    def __init__(self, bucket: str, prefix: str, settings: S3Settings):
        import urllib3

        from flashops.storage._minio_compat import Client

        self.bucket, self.prefix, self.settings = bucket, prefix.strip("/"), settings
        # Our own pool: sized for the parallel transfers, and retries=False because retrying is ours
        # (bounded, temporary errors only) instead of urllib3's silent 5 attempts per request.
        self._http = urllib3.PoolManager(
            num_pools=4,
            maxsize=max(settings.parallelism * 2, 10),
            retries=False,
            timeout=urllib3.Timeout(connect=10, read=300),
            cert_reqs="CERT_REQUIRED" if settings.secure else "CERT_NONE",
            ca_certs=settings.ca_bundle or _default_ca_bundle() if settings.secure else None,
        )
        try:
            self.client = Client(
                settings.endpoint,
                access_key=settings.access_key,
                secret_key=settings.secret_key,
                secure=settings.secure,
                region=settings.region,
                http_client=self._http,
            )
        except ValueError as e:
            raise StoreConfigError(f"S3 endpoint {settings.endpoint!r}: {e}; expected host[:port] "
                                   "or http(s)://host[:port] in FLASHOPS_S3_ENDPOINT") from e
        self._ready_lock = threading.Lock()
        self._ready = False
        self._pool: ThreadPoolExecutor | None = None
        # enough idle part buffers for the parts in flight of the shard files DCP writes at once
        self.buffers = BufferPool(keep=4 * (settings.parallelism + 1))

    # -- naming
    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def url(self, key: str = "") -> str:
        path = "/".join(p for p in (self.bucket, self.prefix, key) if p)
        return f"s3://{path}"

    # -- retries and error classification
    def _call(self, what: str, fn: Callable[[], T]) -> T:
        s = self.settings
        for attempt in range(1, s.max_attempts + 1):
            try:
                return fn()
            except StoreError:
                raise
            except Exception as e:  # classified below; unknown errors pass through unchanged
                err = self._classify(what, e)
                if err is None:
                    raise
                if err.permanent or attempt == s.max_attempts:
                    if not err.permanent:
                        err = self._give_up(what, e, err, attempt)
                    raise err from e
                delay = s.backoff_seconds * (2 ** (attempt - 1)) * random.uniform(0.5, 1.5)
                log.warning("%s (attempt %d/%d, retrying in %.2fs)", err, attempt, s.max_attempts, delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _give_up(self, what: str, exc: Exception, err: StoreError, attempts: int) -> StoreError:
        if _is_connection_error(exc):
            return EndpointUnreachableError(
                f"S3 endpoint {self.settings.url} is unreachable ({_short(exc)}) after {attempts} attempts while "
                f"trying to {what}; check FLASHOPS_S3_ENDPOINT (host, port, http vs https) and that the server runs"
            )
        return TransientStoreError(f"{what}: still failing after {attempts} attempts: {err}")

    def _classify(self, what: str, e: Exception) -> StoreError | None:
        from minio.error import InvalidResponseError, S3Error, ServerError

        url = self.settings.url
        if isinstance(e, S3Error):
            if e.code in _CREDENTIAL_CODES:
                return CredentialsError(
                    f"S3 endpoint {url} rejected the credentials ({e.code}) while trying to {what}: check "
                    f"AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the mounted Secret) and that this key may "
                    f"access bucket {self.bucket!r}"
                )
            if e.code == "NoSuchBucket":
                return self._bucket_missing()
            if e.code in ("NoSuchKey", "NoSuchUpload"):
                return ObjectNotFoundError(f"{what}: object not found at {url} ({e.code})")
            if e.code in _TRANSIENT_CODES:
                return TransientStoreError(f"{what}: server said {e.code}: {e.message}")
            return StoreError(f"{what}: S3 error {e.code}: {e.message}")
        if isinstance(e, ServerError):
            return TransientStoreError(f"{what}: server error (HTTP {e.status_code}) from {url}")
        if isinstance(e, InvalidResponseError):
            return StoreError(f"{what}: {url} did not answer like an S3 server ({_short(e)}); "
                              "check FLASHOPS_S3_ENDPOINT points at the S3 API port")
        if _is_tls_error(e):
            hint = ("the server may speak plain http: use an http:// endpoint or FLASHOPS_S3_SECURE=false"
                    if "wrong version number" in str(e).lower() or "record layer" in str(e).lower() else
                    "if the server uses a private CA, set FLASHOPS_S3_CA_BUNDLE=/path/ca.crt")
            return TLSError(f"TLS handshake with {url} failed ({_short(e)}) while trying to {what}; {hint}")
        if _is_connection_error(e):
            return TransientStoreError(f"{what}: cannot connect to {url} ({_short(e)})")
        import urllib3

        if isinstance(e, (urllib3.exceptions.HTTPError, ConnectionError, TimeoutError)):
            return TransientStoreError(f"{what}: {_short(e)}")
        return None

    def _bucket_missing(self) -> BucketMissingError:
        return BucketMissingError(
            f"bucket {self.bucket!r} does not exist at {self.settings.url}: create it "
            f"(mc mb <alias>/{self.bucket}, or aws s3 mb s3://{self.bucket}) or set FLASHOPS_S3_CREATE_BUCKET=true "
            "to let flashops create it"
        )

    def ensure_ready(self, for_write: bool) -> bool:
        """Check the bucket once per backend (a clear error beats NoSuchKey on a missing bucket).
        Returns False only for a read of a missing bucket the store may create later (nothing stored yet)."""
        if self._ready:
            return True
        with self._ready_lock:
            if self._ready:
                return True
            exists = self._call(f"check bucket {self.bucket}", lambda: self.client.bucket_exists(self.bucket))
            if not exists:
                if not self.settings.create_bucket:
                    raise self._bucket_missing()
                if not for_write:
                    return False
                log.info("creating bucket %s at %s", self.bucket, self.settings.url)
                self._call(f"create bucket {self.bucket}", self._make_bucket)
            self._ready = True
            return True

    def _make_bucket(self) -> None:
        from minio.error import S3Error

        try:
            self.client.make_bucket(self.bucket)
        except S3Error as e:
            if e.code != "BucketAlreadyOwnedByYou":  # another process created it first: fine
                raise

    # -- operations
    def put_bytes(self, key: str, data) -> None:
        """Upload bytes already in memory: one PUT, or parts sent straight from `data` (no copy)."""
        from flashops.storage import _minio_compat as minio_compat

        data = memoryview(data).cast("B")
        plan = transfer_plan(len(data), self.settings)
        obj, signed = self._key(key), self.settings.signed_payload
        if plan.concurrency == 1 and len(data) <= plan.part_size:
            self._call(f"upload {self.url(key)}",
                       lambda: minio_compat.put_object(self.client, self.bucket, obj, data, signed))
            return
        upload_id = self._call(f"start upload of {self.url(key)}",
                               lambda: minio_compat.create_multipart_upload(self.client, self.bucket, obj))
        try:
            def part(item) -> tuple[int, str]:
                number, (offset, n) = item
                body = data[offset : offset + n]
                return number, self._call(f"upload part {number} of {self.url(key)}",
                                          lambda: minio_compat.upload_part(self.client, self.bucket, obj, body,
                                                                           upload_id, number, signed))

            with ThreadPoolExecutor(plan.concurrency) as pool:
                etags = list(pool.map(part, enumerate(plan.ranges(len(data)), start=1)))
            self._call(f"complete upload of {self.url(key)}",
                       lambda: minio_compat.complete_multipart_upload(self.client, self.bucket, obj, upload_id, etags))
        except BaseException:
            try:
                minio_compat.abort_multipart_upload(self.client, self.bucket, obj, upload_id)
            except Exception as e:
                log.warning("could not abort the multipart upload of %s: %s", self.url(key), e)
            raise

    def open_writer(self, key: str) -> HashingWriter:
        sink = _MultipartSink(self, key)
        return HashingWriter(sink, sink.commit, sink.abort)

    def _part_pool(self) -> ThreadPoolExecutor:
        with self._ready_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.settings.parallelism * 2, thread_name_prefix="s3-part")
            return self._pool

    def _stat_size(self, key: str) -> int:
        return self._call(f"stat {self.url(key)}", lambda: self.client.stat_object(self.bucket, self._key(key)).size)

    def _get_range(self, key: str, view: memoryview, offset: int, length: int, source_offset: int | None = None) -> None:
        """Read `length` bytes of the object at source_offset (default: offset) into view[offset:]."""
        src = offset if source_offset is None else source_offset

        def get():
            resp = self.client.get_object(self.bucket, self._key(key), offset=src, length=length)
            whole = False
            try:
                got = 0
                while got < length:
                    n = resp.readinto(view[offset + got : offset + length])
                    if not n:
                        raise TransientStoreError(f"short read of {self.url(key)} at {offset + got}")
                    got += n
                whole = True
            finally:
                if not whole:
                    resp.close()  # a half-read connection cannot carry the next request
                resp.release_conn()  # a fully read one goes back to the pool (no new TCP connection per part)

        self._call(f"download {self.url(key)}", get)

    def read_range(self, key: str, offset: int, length: int) -> bytearray:
        buf = bytearray(length)
        if length:
            self._get_range(key, memoryview(buf), 0, length, source_offset=offset)
        return buf

    def get_bytes(self, key: str) -> bytearray:
        return self.get_bytes_hashed(key)[0]

    def get_bytes_hashed(self, key: str) -> tuple[bytearray, str]:
        """Download with parallel ranged GETs into one buffer, hashing each part, in order, as soon as it
        has arrived while later parts are still on the wire: one pass over the bytes, no second read."""
        size = self._stat_size(key)
        buf = bytearray(size)
        view = memoryview(buf)
        h = hashlib.sha256()
        plan = transfer_plan(size, self.settings)
        if plan.concurrency == 1:
            if size:
                self._get_range(key, view, 0, size)
            h.update(view)
            return buf, h.hexdigest()
        with ThreadPoolExecutor(plan.concurrency) as pool:
            jobs = [(o, n, pool.submit(self._get_range, key, view, o, n)) for o, n in plan.ranges(size)]
            try:
                for o, n, job in jobs:
                    job.result()
                    h.update(view[o : o + n])
            except BaseException:
                for _, _, job in jobs:
                    job.cancel()
                raise
        return buf, h.hexdigest()

    def iter_chunks(self, key: str) -> Iterator[bytearray]:
        """The object's parts in order, fetched `concurrency` ahead with ranged GETs."""
        size = self._stat_size(key)
        plan = transfer_plan(size, self.settings)

        def fetch(offset: int, n: int) -> bytearray:
            buf = bytearray(n)
            self._get_range(key, memoryview(buf), 0, n, source_offset=offset)
            return buf

        ranges = iter(plan.ranges(size))
        with ThreadPoolExecutor(plan.concurrency) as pool:
            # islice, not zip(ranges, range(k)): zip would draw one range too many and drop it
            pending = [pool.submit(fetch, o, n) for o, n in itertools.islice(ranges, plan.concurrency)]
            while pending:
                chunk = pending.pop(0).result()
                nxt = next(ranges, None)
                if nxt is not None:
                    pending.append(pool.submit(fetch, *nxt))
                yield chunk

    def get_to_file(self, key: str, dest: Path) -> tuple[int, str]:
        """Parts fetched in parallel, hashed in order and written in place (one pass; memory: a few parts)."""
        size = 0
        h = hashlib.sha256()
        dest.parent.mkdir(parents=True, exist_ok=True)
        with open(dest, "wb") as f:
            for chunk in self.iter_chunks(key):
                h.update(chunk)
                f.write(chunk)
                size += len(chunk)
        return size, h.hexdigest()

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        full = self._key(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        objs = self._call(
            f"list {self.url(prefix)}",
            lambda: list(self.client.list_objects(self.bucket, prefix=full, recursive=True)),
        )
        for o in objs:
            if not o.is_dir:
                yield ObjectInfo(o.object_name[strip:], o.size or 0)

    def delete(self, keys: list[str]) -> None:
        from minio.deleteobjects import DeleteObject

        for i in range(0, len(keys), 1000):
            batch = [DeleteObject(self._key(k)) for k in keys[i : i + 1000]]
            errors = self._call(f"delete under {self.url()}",
                                lambda: list(self.client.remove_objects(self.bucket, batch)))
            if errors:
                raise StoreError(f"could not delete {len(errors)} object(s), first: {errors[0].name}: {errors[0].message}")

    def exists(self, key: str) -> bool:
        try:
            self._stat_size(key)
            return True
        except ObjectNotFoundError:
            return False

    def _uploads(self, prefix: str) -> list:
        from flashops.storage import _minio_compat as minio_compat

        out, marker = [], None
        for _ in range(100):  # pages of 1000
            page = self._call(f"list unfinished uploads under {self.url(prefix)}",
                              lambda: minio_compat.list_multipart_uploads(self.client, self.bucket, self._key(prefix),
                                                                          key_marker=marker))
            out += page.uploads
            if not page.is_truncated or not page.next_key_marker:
                break
            marker = page.next_key_marker
        return out

    def incomplete(self, prefix: str) -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(u.object_name[strip:] for u in self._uploads(prefix))

    def discard_incomplete(self, prefix: str) -> int:
        from flashops.storage import _minio_compat as minio_compat

        uploads = self._uploads(prefix)
        for u in uploads:
            self._call(f"abort unfinished upload of {u.object_name}",
                       lambda: minio_compat.abort_multipart_upload(self.client, self.bucket, u.object_name,
                                                                   u.upload_id))
        return len(uploads)


class _MultipartSink:
    """Streams one object up while it is being written: every full part goes up at once (in parallel,
    at most `concurrency` parts in flight per object, which also bounds memory); commit completes the
    multipart upload, so the object appears all at once or not at all. Small objects use one PUT.
    The bytes are copied once, into a part buffer (reused from the backend's pool), and sent from there."""

    def __init__(self, backend: S3Backend, key: str):
        self.b, self.key = backend, key
        self.plan = streaming_plan(backend.settings)
        self.buf: bytearray | None = None
        self.fill = 0
        self.upload_id: str | None = None
        self.parts: list = []  # (part_number, future -> etag)
        self.slots = threading.BoundedSemaphore(self.plan.concurrency)

    def _part_size(self) -> int:
        return self.plan.part_size_for(len(self.parts) + 1)

    def write(self, mv: memoryview) -> None:
        pos = 0
        while pos < len(mv):
            if self.buf is None:
                self.buf, self.fill = self.b.buffers.take(self._part_size()), 0
            take = min(len(self.buf) - self.fill, len(mv) - pos)
            self.buf[self.fill : self.fill + take] = mv[pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == len(self.buf):
                self._submit(self.buf, self.fill)
                self.buf = None

    def _submit(self, part: bytearray, length: int) -> None:
        from flashops.storage import _minio_compat as minio_compat

        b = self.b
        obj = b._key(self.key)
        if self.upload_id is None:
            self.upload_id = b._call(f"start upload of {b.url(self.key)}",
                                     lambda: minio_compat.create_multipart_upload(b.client, b.bucket, obj))
        number = len(self.parts) + 1
        self.slots.acquire()
        upload_id, signed = self.upload_id, b.settings.signed_payload

        def upload() -> str:
            try:
                body = memoryview(part)[:length]
                return b._call(f"upload part {number} of {b.url(self.key)}",
                               lambda: minio_compat.upload_part(b.client, b.bucket, obj, body, upload_id, number,
                                                                signed))
            finally:
                b.buffers.give(part)
                self.slots.release()

        self.parts.append((number, b._part_pool().submit(upload)))

    def commit(self) -> None:
        from flashops.storage import _minio_compat as minio_compat

        b = self.b
        if self.upload_id is None:  # smaller than one part: a single PUT
            try:
                b.put_bytes(self.key, memoryview(self.buf)[: self.fill] if self.buf is not None else b"")
            finally:
                self._release_buffer()
            return
        try:
            if self.buf is not None and self.fill:
                self._submit(self.buf, self.fill)
                self.buf = None
            etags = [(n, f.result()) for n, f in self.parts]
            b._call(f"complete upload of {b.url(self.key)}",
                    lambda: minio_compat.complete_multipart_upload(b.client, b.bucket, b._key(self.key),
                                                                   self.upload_id, etags))
        except BaseException:
            self.abort()
            raise
        finally:
            self._release_buffer()

    def _release_buffer(self) -> None:
        if self.buf is not None:
            self.b.buffers.give(self.buf)
            self.buf = None

    def abort(self) -> None:
        from flashops.storage import _minio_compat as minio_compat

        self._release_buffer()
        if self.upload_id is None:
            return
        for _, f in self.parts:
            f.cancel()
        for _, f in self.parts:
            try:
                f.result()
            except BaseException:
                pass
        try:  # best effort: an unfinished upload is invisible anyway and the server expires it
            minio_compat.abort_multipart_upload(self.b.client, self.b.bucket, self.b._key(self.key), self.upload_id)
        except Exception as e:
            log.warning("could not abort the multipart upload of %s: %s", self.b.url(self.key), e)
        self.upload_id = None


def _default_ca_bundle() -> str | None:
    try:
        import certifi

        return certifi.where()
    except ImportError:
        return None


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        reason = getattr(e, "reason", None)  # urllib3 wraps the cause in .reason (ssl uses it for a str)
        e = (reason if isinstance(reason, BaseException) else None) or e.__cause__ or e.__context__


def _is_tls_error(e: Exception) -> bool:
    import ssl

    import urllib3

    return any(isinstance(x, (ssl.SSLError, urllib3.exceptions.SSLError)) for x in _chain(e))


def _is_connection_error(e: Exception) -> bool:
    import urllib3

    kinds = (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError,
             ConnectionRefusedError, ConnectionResetError, urllib3.exceptions.NameResolutionError)
    return any(isinstance(x, kinds) for x in _chain(e))


def _short(e: BaseException) -> str:
    for x in reversed(list(_chain(e))):
        if str(x):
            return f"{type(x).__name__}: {str(x)[:200]}"
    return type(e).__name__
