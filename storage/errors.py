"""Typed store errors. Each message says what happened, where, and what to do about it.

`permanent` follows kopf's split: a permanent error will fail the same way on retry (bad credentials,
missing bucket, corrupt object), a temporary one may succeed later (timeouts, 5xx, connection reset).
The backends retry only temporary errors, a bounded number of times with backoff.
"""
from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by flashops.storage."""

    permanent = True


class StoreConfigError(StoreError, ValueError):
    """A bad URI or setting (names the field, the value and the fix)."""


class CredentialsError(StoreError):
    """The S3 endpoint rejected the access key / secret key (or denied access)."""


class BucketMissingError(StoreError):
    """The bucket does not exist and the store is not allowed to create it."""


class EndpointUnreachableError(StoreError):
    """Nothing answered at the endpoint URL after the retries."""


class TLSError(StoreError):
    """TLS handshake failed: https vs http mismatch, or an untrusted certificate."""


class ObjectNotFoundError(StoreError):
    """An object the caller asked for is not in the store."""


class CheckpointNotFoundError(ObjectNotFoundError):
    """No complete checkpoint (or model) at the given reference."""


class AlreadyExistsError(StoreError):
    """A complete checkpoint (run/step) or model (name/version) is already stored there."""


CheckpointExistsError = AlreadyExistsError


class CorruptObjectError(StoreError):
    """An object's bytes do not match the size/sha256 its manifest records."""

    def __init__(self, message: str, key: str = "", expected_sha256: str = "", actual_sha256: str = ""):
        super().__init__(message)
        self.key = key
        self.expected_sha256 = expected_sha256
        self.actual_sha256 = actual_sha256


class TransientStoreError(StoreError):
    """A temporary failure (timeout, 5xx, slow down, connection reset); retried with backoff."""

    permanent = False
