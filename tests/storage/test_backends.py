"""Object-level behaviour the store relies on: streamed multipart writes appear whole or not at all."""
import hashlib
import os

import pytest

from flashops.storage import open_store


@pytest.mark.parametrize("size", [3 * 1024 * 1024, 10 * 1024 * 1024, 12 * 1024 * 1024 + 7])
def test_streamed_write_is_whole_and_hashed(store_uri, size):
    kw = {"part_size": 5 * 1024 * 1024, "parallelism": 2} if store_uri.startswith("s3") else {}
    backend = open_store(store_uri, **kw).backend
    backend.ensure_ready(for_write=True)
    data = os.urandom(size)
    w = backend.open_writer("obj/a.bin")
    for i in range(0, size, 1_000_003):  # odd write sizes, straddling part boundaries
        w.write(data[i : i + 1_000_003])
    assert not backend.exists("obj/a.bin"), "visible before commit"
    assert w.commit() == (size, hashlib.sha256(data).hexdigest())
    assert bytes(backend.get_bytes("obj/a.bin")) == data


def test_aborted_write_leaves_nothing(store_uri):
    kw = {"part_size": 5 * 1024 * 1024} if store_uri.startswith("s3") else {}
    backend = open_store(store_uri, **kw).backend
    backend.ensure_ready(for_write=True)
    w = backend.open_writer("obj/b.bin")
    w.write(os.urandom(11 * 1024 * 1024))  # two parts already uploaded on S3
    w.abort()
    assert not backend.exists("obj/b.bin")
    assert [o.key for o in backend.list("obj/")] == []


def test_transfer_plan_follows_the_object_size():
    from flashops.storage.backends import MAX_PARTS, MIN_PART, streaming_plan, transfer_plan
    from flashops.storage.settings import S3Settings

    s = S3Settings(parallelism=4, part_size=16 * 2**20)
    assert transfer_plan(1000, s).concurrency == 1  # one request
    mid = transfer_plan(200 * 2**20, s)  # ~2 parts per connection, all 4 busy
    assert (mid.part_size, mid.concurrency) == (25 * 2**20, 4)
    assert transfer_plan(20 * 2**20, s).part_size == MIN_PART  # no tiny parts
    rank_shard = transfer_plan(12 * 10**9, s)  # the 48B preset's per-rank checkpoint on 64 ranks
    assert rank_shard.part_size == 64 * 2**20 and rank_shard.concurrency == 4
    huge = transfer_plan(5 * 2**40, s)
    assert len(huge.ranges(5 * 2**40)) <= MAX_PARTS
    assert sum(n for _, n in huge.ranges(5 * 2**40)) == 5 * 2**40
    grow = streaming_plan(s)  # size unknown: parts double every 1000, so 10,000 parts hold > 5 TB
    assert grow.part_size_for(1) == grow.part_size_for(1000) == 16 * 2**20
    assert grow.part_size_for(1001) == 32 * 2**20
    assert sum(grow.part_size_for(n) for n in range(1, MAX_PARTS + 1)) > 5 * 2**40


@pytest.mark.parametrize("signed", [False, True])
def test_s3_parts_unsigned_unless_asked_and_loads_hash_once(s3_uri, monkeypatch, signed):
    """Part uploads skip minio's per-request sha256 (UNSIGNED-PAYLOAD) unless signed_payload is set; the
    server accepts both; a download returns the same sha256 it hashed on the way in."""
    import minio.api

    hashed = []
    original = minio.api.sha256_hash
    monkeypatch.setattr(minio.api, "sha256_hash", lambda d: hashed.append(len(d or b"")) or original(d))
    backend = open_store(s3_uri, part_size=5 * 2**20, parallelism=2, signed_payload=signed).backend
    backend.ensure_ready(for_write=True)
    data = os.urandom(23 * 2**20)
    w = backend.open_writer("obj/streamed.bin")
    for i in range(0, len(data), 3 * 2**20 + 1):
        w.write(data[i : i + 3 * 2**20 + 1])
    w.commit()
    backend.put_bytes("obj/in-memory.bin", data)  # multipart straight from the buffer
    backend.put_bytes("obj/small.bin", data[:1000])
    big_hashes = [n for n in hashed if n >= 2**20]
    assert (sum(big_hashes) >= 2 * len(data)) if signed else big_hashes == []
    for key in ("obj/streamed.bin", "obj/in-memory.bin"):
        got, sha = backend.get_bytes_hashed(key)
        assert bytes(got) == data and sha == hashlib.sha256(data).hexdigest()
    assert bytes(backend.get_bytes("obj/small.bin")) == data[:1000]
    assert backend.hash_object("obj/streamed.bin") == (len(data), hashlib.sha256(data).hexdigest())
