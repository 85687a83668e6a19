"""Errors a user can act on, against the real S3 server (and, for retries, a tiny server that answers
like a struggling S3 endpoint)."""
import http.server
import socket
import threading
import time

import pytest
import torch

from flashops.storage import (
    BucketMissingError,
    CorruptObjectError,
    CredentialsError,
    EndpointUnreachableError,
    StoreConfigError,
    TLSError,
    open_store,
)
from flashops.storage.settings import resolve_s3_settings


def test_corrupted_shard_is_named_with_its_expected_hash(store_uri):
    store = open_store(store_uri)
    ref = store.save_checkpoint("run", 1, {"w": torch.arange(1000.0)})
    objects = store.read_manifest(ref)["objects"]
    shard = sorted(k for k in objects if k.endswith(".distcp"))[0]
    key = f"runs/run/step-1/{shard}"
    data = bytearray(store.backend.get_bytes(key))
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size: only the hash can tell
    store.backend.put_bytes(key, bytes(data))

    with pytest.raises(CorruptObjectError) as e:
        store.verify(ref)
    assert shard in str(e.value) and objects[shard]["sha256"] in str(e.value)
    assert e.value.key == shard and e.value.expected_sha256 == objects[shard]["sha256"]
    with pytest.raises(CorruptObjectError, match=objects[shard]["sha256"]):
        store.load_checkpoint(ref, {"w": torch.zeros(1000)})
    target = {"w": torch.zeros(1000)}
    store.load_checkpoint(ref, target, verify=False)  # an explicit opt-out still loads


def test_wrong_credentials(s3_uri, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_store(s3_uri)
    with pytest.raises(CredentialsError, match="rejected the credentials.*AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"):
        store.latest("run")
    with pytest.raises(CredentialsError):
        store.save_checkpoint("run", 1, {"w": torch.ones(2)})


def test_missing_bucket_says_how_to_create_it_or_creates_it_when_allowed(s3_env):
    store = open_store("s3://no-such-bucket-here/x")
    with pytest.raises(BucketMissingError, match="bucket 'no-such-bucket-here' does not exist.*FLASHOPS_S3_CREATE_BUCKET"):
        store.latest("run")
    with pytest.raises(BucketMissingError):
        store.save_checkpoint("run", 1, {"w": torch.ones(2)})

    store = open_store("s3://created-by-flashops/x", create_bucket=True)
    assert store.latest("run") is None  # reading a not-yet-created bucket: nothing stored yet
    store.save_checkpoint("run", 1, {"w": torch.ones(2)})
    assert s3_env.client().bucket_exists("created-by-flashops")
    assert store.latest("run").step == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_names_the_url_after_bounded_retries():
    port = _closed_port()
    store = open_store("s3://bucket/x", endpoint=f"http://127.0.0.1:{port}", access_key="a", secret_key="b",
                       max_attempts=3, backoff_seconds=0.05)
    t0 = time.monotonic()
    with pytest.raises(EndpointUnreachableError, match=rf"http://127.0.0.1:{port} is unreachable.*after 3 attempts"):
        store.latest("run")
    assert time.monotonic() - t0 < 10


def test_tls_against_a_plain_http_server_says_to_switch_it_off(s3_env):
    store = open_store("s3://bucket/x", endpoint=f"https://{s3_env.host}", max_attempts=1)
    with pytest.raises(TLSError, match="TLS handshake with https://127.0.0.1.*FLASHOPS_S3_SECURE=false"):
        store.latest("run")


def test_settings_conflicts_are_rejected_with_the_fix(monkeypatch):
    monkeypatch.setenv("FLASHOPS_S3_SECRET_DIR", "/nonexistent")
    with pytest.raises(StoreConfigError, match="says http but FLASHOPS_S3_SECURE='true'"):
        resolve_s3_settings(endpoint="http://h:9000", secure="true")
    with pytest.raises(StoreConfigError, match="AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not"):
        resolve_s3_settings(endpoint="h:9000", access_key="a")
    with pytest.raises(StoreConfigError, match="no path"):
        resolve_s3_settings(endpoint="http://h:9000/bucket")


def test_settings_from_a_mounted_secret_and_the_config_file(tmp_path, monkeypatch):
    for k in ("FLASHOPS_S3_ENDPOINT", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k, raising=False)
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "AWS_ACCESS_KEY_ID").write_text("from-secret\n")
    (secret / "AWS_SECRET_ACCESS_KEY").write_text("s3cret\n")
    monkeypatch.setenv("FLASHOPS_S3_SECRET_DIR", str(secret))
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("s3:\n  endpoint: http://minio.local:9000\n  access_key: from-file\n"
                                      "  secret_key: x\n")
    monkeypatch.setenv("FLASHOPS_HOME", str(home))
    s = resolve_s3_settings()
    assert (s.endpoint, s.secure, s.access_key, s.secret_key) == ("minio.local:9000", False, "from-secret", "s3cret")


class _FlakyS3(http.server.BaseHTTPRequestHandler):
    """Answers HEAD-bucket with `fail_first` errors of the given status, then 200."""
    status, fail_first, calls = 503, 2, 0

    def do_HEAD(self):
        type(self).calls += 1
        self.send_response(self.status if type(self).calls <= self.fail_first else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server():
    servers = []

    def start(status: int, fail_first: int):
        handler = type("Handler", (_FlakyS3,), {"status": status, "fail_first": fail_first, "calls": 0})
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return srv, handler

    yield start
    for s in servers:
        s.shutdown()


def test_transient_errors_are_retried_permanent_ones_are_not(flaky_server):
    srv, handler = flaky_server(503, fail_first=2)
    store = open_store("s3://bucket/x", endpoint=f"http://127.0.0.1:{srv.server_port}", access_key="a",
                       secret_key="b", region="us-east-1", max_attempts=4, backoff_seconds=0.01)
    assert store.backend.ensure_ready(for_write=False)  # the bucket check passes on the 3rd attempt
    assert handler.calls == 3

    srv, handler = flaky_server(403, fail_first=100)
    store = open_store("s3://bucket/x", endpoint=f"http://127.0.0.1:{srv.server_port}", access_key="a",
                       secret_key="b", region="us-east-1", max_attempts=4, backoff_seconds=0.01)
    with pytest.raises(CredentialsError):
        store.latest("run")
    assert handler.calls == 1, "a permanent error must not be retried"
