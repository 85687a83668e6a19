"""Object backends: the few byte-level operations the checkpoint store needs, for a local directory
(`file://`) and an S3 bucket (`s3://`, through the `minio` client). Torch-free.

Keys are relative to the store root and always use '/'. Writes are all-or-nothing per object: the file
backend writes a temporary file, fsyncs it and renames it into place; S3 makes an object visible only
when its (multipart) upload completes. Only temporary errors are retried, with exponential backoff.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from flashops.storage.errors import (
    BucketMissingError,
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
    def incomplete(self, prefix: str) -> list[str]: ...
    def discard_incomplete(self, prefix: str) -> int:
        """Drop writes under prefix that never committed (a killed save); returns how many."""
        ...

    def iter_chunks(self, key: str) -> Iterator[bytes | bytearray]:
        yield self.get_bytes(key)

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
        path = self._path(key)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                buf = bytearray(size)
                view, got = memoryview(buf), 0
                while got < size:
                    n = f.readinto(view[got:])
                    if not n:
                        break
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
        from minio import Minio

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
            self.client = Minio(
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
        data = memoryview(data).cast("B")
        s = self.settings

        def put():
            self.client.put_object(
                self.bucket, self._key(key), io.BytesIO(data), len(data),
                part_size=s.part_size, num_parallel_uploads=s.parallelism,
            )

        self._call(f"upload {self.url(key)}", put)

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
            try:
                got = 0
                while got < length:
                    n = resp.readinto(view[offset + got : offset + length])
                    if not n:
                        raise TransientStoreError(f"short read of {self.url(key)} at {offset + got}")
                    got += n
            finally:
                resp.close()
                resp.release_conn()

        self._call(f"download {self.url(key)}", get)

    def get_bytes(self, key: str) -> bytearray:
        size = self._stat_size(key)
        buf = bytearray(size)
        view = memoryview(buf)
        part = self.settings.part_size
        if size <= part:
            if size:
                self._get_range(key, view, 0, size)
            return buf
        ranges = [(o, min(part, size - o)) for o in range(0, size, part)]
        with ThreadPoolExecutor(min(self.settings.parallelism, len(ranges))) as pool:
            for f in [pool.submit(self._get_range, key, view, o, n) for o, n in ranges]:
                f.result()
        return buf

    def iter_chunks(self, key: str) -> Iterator[bytearray]:
        """The object's parts in order, fetched `parallelism` ahead with ranged GETs."""
        size = self._stat_size(key)
        part, window = self.settings.part_size, self.settings.parallelism

        def fetch(offset: int) -> bytearray:
            buf = bytearray(min(part, size - offset))
            self._get_range(key, memoryview(buf), 0, len(buf), source_offset=offset)
            return buf

        offsets = iter(range(0, size, part))
        with ThreadPoolExecutor(window) as pool:
            pending = [pool.submit(fetch, o) for o, _ in zip(offsets, range(window))]
            while pending:
                chunk = pending.pop(0).result()
                nxt = next(offsets, None)
                if nxt is not None:
                    pending.append(pool.submit(fetch, nxt))
                yield chunk

    def get_to_file(self, key: str, dest: Path) -> tuple[int, str]:
        """Parallel ranged GETs written in place (memory: one part per worker), then one hashing pass."""
        size = self._stat_size(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = self.settings.part_size
        with open(dest, "wb") as f:
            f.truncate(size)
            fd = f.fileno()

            def fetch(offset: int) -> None:
                n = min(part, size - offset)
                buf = bytearray(n)
                self._get_range(key, memoryview(buf), 0, n, source_offset=offset)
                os.pwrite(fd, buf, offset)

            with ThreadPoolExecutor(self.settings.parallelism) as pool:
                list(pool.map(fetch, range(0, size, part)))
        h = hashlib.sha256()
        with open(dest, "rb", buffering=0) as f:
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
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
        out, marker = [], None
        for _ in range(100):  # pages of 1000
            page = self._call(f"list unfinished uploads under {self.url(prefix)}",
                              lambda: self.client._list_multipart_uploads(self.bucket, prefix=self._key(prefix),
                                                                          key_marker=marker, max_uploads=1000))
            out += page.uploads
            if not page.is_truncated or not page.next_key_marker:
                break
            marker = page.next_key_marker
        return out

    def incomplete(self, prefix: str) -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        return sorted(u.object_name[strip:] for u in self._uploads(prefix))

    def discard_incomplete(self, prefix: str) -> int:
        uploads = self._uploads(prefix)
        for u in uploads:
            self._call(f"abort unfinished upload of {u.object_name}",
                       lambda: self.client._abort_multipart_upload(self.bucket, u.object_name, u.upload_id))
        return len(uploads)


class _MultipartSink:
    """Streams one object up while it is being written: every full part goes up at once (in parallel,
    at most `parallelism` parts in flight per object, which also bounds memory); commit completes the
    multipart upload, so the object appears all at once or not at all. Small objects use one PUT."""

    def __init__(self, backend: S3Backend, key: str):
        self.b, self.key = backend, key
        self.part_size = backend.settings.part_size
        self.buf = bytearray()
        self.upload_id: str | None = None
        self.parts: list = []  # (part_number, future -> etag)
        self.slots = threading.BoundedSemaphore(backend.settings.parallelism)

    def write(self, mv: memoryview) -> None:
        pos = 0
        while pos < len(mv):
            take = min(self.part_size - len(self.buf), len(mv) - pos)
            self.buf += mv[pos : pos + take]
            pos += take
            if len(self.buf) == self.part_size:
                part, self.buf = self.buf, bytearray()
                self._submit(part)

    def _submit(self, part: bytearray) -> None:
        b = self.b
        obj = b._key(self.key)
        if self.upload_id is None:
            self.upload_id = b._call(f"start upload of {b.url(self.key)}",
                                     lambda: b.client._create_multipart_upload(b.bucket, obj, {}))
        number = len(self.parts) + 1
        self.slots.acquire()

        def upload() -> str:
            try:
                return b._call(f"upload part {number} of {b.url(self.key)}",
                               lambda: b.client._upload_part(b.bucket, obj, bytes(part), None, self.upload_id, number))
            finally:
                self.slots.release()

        self.parts.append((number, b._part_pool().submit(upload)))

    def commit(self) -> None:
        from minio.datatypes import Part

        b = self.b
        if self.upload_id is None:
            b.put_bytes(self.key, self.buf)
            return
        try:
            if self.buf:
                self._submit(self.buf)
                self.buf = bytearray()
            etags = [Part(n, f.result()) for n, f in self.parts]
            b._call(f"complete upload of {b.url(self.key)}",
                    lambda: b.client._complete_multipart_upload(b.bucket, b._key(self.key), self.upload_id, etags))
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        self.buf = bytearray()
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
            self.b.client._abort_multipart_upload(self.b.bucket, self.b._key(self.key), self.upload_id)
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
