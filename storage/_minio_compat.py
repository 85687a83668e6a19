"""Workarounds for the `minio` client (7.2.20) as the S3 backend uses it. The ONE place that touches
minio's private API; each says why and when it can go. Only storage/backends.py imports this module.

1. `create_multipart_upload` / `upload_part` / `complete_multipart_upload`: minio's public `put_object`
   pulls the bytes from a stream it reads itself. DCP pushes a shard through `write()` calls while it
   serialises, and we want every full part on the wire at once (no temporary file, no whole shard in
   memory), so we drive the multipart protocol ourselves with minio's private `_create_multipart_upload`,
   `_upload_part` and `_complete_multipart_upload`. Remove when minio-py offers a push-style (writable)
   multipart upload.
2. `list_multipart_uploads` / `abort_multipart_upload`: a save killed mid-upload leaves unfinished
   multipart uploads (invisible, but they hold space). minio-py dropped its public
   `list_incomplete_uploads` / `remove_incomplete_upload` in 7.0, so finding and aborting them goes through
   `_list_multipart_uploads` / `_abort_multipart_upload`. Remove when minio-py exposes
   ListMultipartUploads and AbortMultipartUpload publicly again.
3. `Client` (UNSIGNED-PAYLOAD on part uploads): with credentials over http, minio signs every request
   body's sha256 (and over https adds a Content-MD5): a second hash of every checkpoint byte on the client,
   and a third on the server that checks it, next to the sha256 the store already computes while the bytes
   stream past (the one the manifest records and every load checks). Part uploads send
   `x-amz-content-sha256: UNSIGNED-PAYLOAD` instead (valid SigV4; the headers stay signed), unless
   `S3Settings.signed_payload` asks for the per-request hash. Integrity still holds end to end: every
   object's sha256 is in the manifest and is checked on every load and by `flashops checkpoints verify`.
   Remove when minio-py lets a caller choose UNSIGNED-PAYLOAD per request (its `_build_headers` decides
   from the scheme alone).
"""
from __future__ import annotations

from minio import Minio

_UNSIGNED = "x-flashops-unsigned-payload"  # a marker header, removed before the request is signed


class Client(Minio):
    """minio.Minio that can skip the payload hash of one request (workaround 3)."""

    def _build_headers(self, host, headers=None, body=None, creds=None):
        if not headers or not headers.pop(_UNSIGNED, None):
            return super()._build_headers(host, headers, body, creds)
        # minio's own headers for a body-less request (no payload hash, no MD5), then the body's length.
        headers, date = super()._build_headers(host, headers, None, creds)
        if body is not None:
            headers["Content-Length"] = str(len(body))
        if creds:
            headers["x-amz-content-sha256"] = "UNSIGNED-PAYLOAD"
        return headers, date


def create_multipart_upload(client: Minio, bucket: str, key: str) -> str:
    """Start a multipart upload; returns its upload id (workaround 1)."""
    return client._create_multipart_upload(bucket, key, {})


def upload_part(client: Minio, bucket: str, key: str, data, upload_id: str, number: int,
                signed_payload: bool = False) -> str:
    """Upload one part (any bytes-like object, sent without a copy); returns its ETag (workarounds 1, 3)."""
    headers = None if signed_payload else {_UNSIGNED: "1"}
    return client._upload_part(bucket, key, data, headers, upload_id, number)


def complete_multipart_upload(client: Minio, bucket: str, key: str, upload_id: str,
                              etags: list[tuple[int, str]]) -> None:
    """Make the object appear, all at once, from its parts [(number, etag)] (workaround 1)."""
    from minio.datatypes import Part

    client._complete_multipart_upload(bucket, key, upload_id, [Part(n, e) for n, e in etags])


def abort_multipart_upload(client: Minio, bucket: str, key: str, upload_id: str) -> None:
    """Drop an unfinished upload and its parts (workaround 2)."""
    client._abort_multipart_upload(bucket, key, upload_id)


def list_multipart_uploads(client: Minio, bucket: str, prefix: str, key_marker: str | None = None,
                           max_uploads: int = 1000):
    """One page of unfinished uploads under prefix: `.uploads` (each with `.object_name`, `.upload_id`),
    `.is_truncated`, `.next_key_marker` (workaround 2)."""
    return client._list_multipart_uploads(bucket, prefix=prefix, key_marker=key_marker, max_uploads=max_uploads)


def put_object(client: Minio, bucket: str, key: str, data, signed_payload: bool = False) -> None:
    """One PUT of bytes already in memory, sent without a copy (minio's public `put_object` reads them
    again through a stream into a new buffer) (workarounds 1, 3)."""
    headers = {"Content-Type": "application/octet-stream"}
    if not signed_payload:
        headers[_UNSIGNED] = "1"
    client._put_object(bucket, key, data, headers)
