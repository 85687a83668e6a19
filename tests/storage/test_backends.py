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
