"""checkpoint.mode async (flashops.storage.checkpointer): the upload runs while training changes the
weights, yet the checkpoint holds the state of the step it was taken at; one save in flight; a background
failure comes back at the next poll as the error the synchronous save raises. Both backends."""
import logging
import threading
import time

import pytest
import torch

from flashops.storage import CredentialsError, open_store
from flashops.storage import backends
from flashops.storage.checkpointer import Checkpointer


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(300_000, generator=g), "b": torch.randn(7, generator=g)},
            "optim": {"state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(300_000, generator=g)}},
                      "param_groups": [{"lr": 1e-3, "params": ["w"]}]},
            "trainer": {"step": torch.tensor(seed), "rng": torch.get_rng_state()}}


def _clone(state):
    return {k: _clone(v) for k, v in state.items()} if isinstance(state, dict) else (
        state.clone() if isinstance(state, torch.Tensor) else state)


def _nbytes(state) -> int:
    if isinstance(state, dict):
        return sum(_nbytes(v) for v in state.values())
    if isinstance(state, list):
        return sum(_nbytes(v) for v in state)
    return state.numel() * state.element_size() if isinstance(state, torch.Tensor) else 0


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.fixture
def held_commits(monkeypatch):
    """Uploads of shard files wait until the test releases them: a save stays 'in flight' on demand."""
    gate = threading.Event()
    original = backends.HashingWriter.commit

    def commit(self):
        assert gate.wait(60), "the test never released the upload"
        return original(self)

    monkeypatch.setattr(backends.HashingWriter, "commit", commit)
    yield gate
    gate.set()


def test_async_save_holds_the_staged_state_while_training_goes_on(store_uri, held_commits):
    store = open_store(store_uri)
    saver = Checkpointer(store, "async")
    state = _state(1)
    at_save = _clone(state)
    saved = []
    t0 = time.perf_counter()
    assert saver.save("run", 1, state, {"spec_hash": "h"}, on_saved=saved.append) is None
    assert time.perf_counter() - t0 < 5 and saver.in_flight  # returned while the upload is held
    for t in (state["model"]["w"], state["model"]["b"], state["optim"]["state"]["w"]["exp_avg"]):
        t.mul_(-2).add_(1)  # "training" changes the live tensors in place
    assert saver.poll() is None and saved == [] and store.latest("run") is None  # nothing complete yet
    held_commits.set()
    ref = saver.wait()
    assert saved == [ref] and store.latest("run").uri == ref.uri and not saver.in_flight
    loaded = _clone(_state(0))
    store.load_checkpoint(ref, loaded)
    assert _equal(loaded, at_save), "the checkpoint must hold the state at save time, not the changed one"
    assert saver.stats.staging_bytes == _nbytes(state)  # one copy of the state, no more


def test_staging_buffer_is_reused_and_a_second_save_waits_and_says_so(store_uri, held_commits, caplog):
    store = open_store(store_uri)
    saver = Checkpointer(store, "async")
    state = _state(1)
    saver.save("run", 1, state)
    buffers = {k: t.data_ptr() for k, t in saver._staging._buffers.items()}
    threading.Timer(0.5, held_commits.set).start()
    with caplog.at_level(logging.WARNING, logger="flashops.storage"):
        saver.save("run", 2, state)  # overlaps step 1's upload: waits for it first
    assert saver.stats.waits == 1 and saver.stats.waited_s >= 0.3
    assert "step-2 waited" in caplog.text and "step-1" in caplog.text
    assert {k: t.data_ptr() for k, t in saver._staging._buffers.items()} == buffers  # same memory, no growth
    saver.wait()
    assert [r.step for r in store.list("run")] == [1, 2]


def test_background_failure_is_the_synchronous_error_at_the_next_poll(s3_server, s3_env):
    """Wrong credentials: the sync save raises CredentialsError; the async one returns at once and the next
    poll raises CredentialsError too, saying it came from the background save."""
    uri = f"s3://{s3_server.make_bucket()}/flashops"
    bad = open_store(uri, secret_key="not-the-secret")
    with pytest.raises(CredentialsError):
        Checkpointer(bad, "sync").save("run", 1, _state(1))
    saver = Checkpointer(bad, "async")
    saver.save("run", 1, _state(1))
    deadline = time.monotonic() + 60
    with pytest.raises(CredentialsError) as caught:
        while time.monotonic() < deadline:
            saver.poll()
            time.sleep(0.05)
    assert "background save of checkpoint step-1" in "".join(caught.value.__notes__)
    assert not saver.in_flight and open_store(uri).latest("run") is None
