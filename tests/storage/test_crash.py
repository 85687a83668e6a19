"""A save killed with SIGKILL halfway leaves nothing that looks complete; latest() (what a resume uses)
returns the previous checkpoint, and the next save of the same step succeeds. Both backends."""
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flashops.storage import CheckpointNotFoundError, open_store

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.mark.slow
def test_kill_mid_save_leaves_previous_checkpoint_as_latest(store_uri, request, caplog):
    env = dict(os.environ)
    if store_uri.startswith("s3://"):
        env.update(request.getfixturevalue("s3_env").env())
    store = open_store(store_uri)
    proc = subprocess.Popen([sys.executable, str(WORKER), "slow-save", store_uri], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Kill as soon as the first shard of step 2 is durable: the other shards are still being written.
        deadline = time.monotonic() + 120
        seen = []
        while time.monotonic() < deadline and proc.poll() is None:
            seen = [o.key for o in store.backend.list("runs/crash/step-2/")]
            if seen:
                break
            time.sleep(0.02)
        assert seen, f"the worker never started step 2:\n{proc.stdout.read() if proc.poll() is not None else ''}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL

    left = [o.key for o in store.backend.list("runs/crash/step-2/")]
    # the kill really landed mid-save: some shards committed, others still being written
    assert store.backend.incomplete("runs/crash/step-2/"), "the save finished before the kill; test proves nothing"
    assert "runs/crash/step-2/manifest.json" not in left, "killed before the manifest: it must not exist"
    with caplog.at_level(logging.WARNING, logger="flashops.storage"):
        ref = store.latest("crash")
    assert ref.step == 1 and "ignoring partial checkpoint" in caplog.text
    assert [r.step for r in store.list("crash")] == [1]
    with pytest.raises(CheckpointNotFoundError):
        store.verify(f"{store.uri}/runs/crash/step-2")

    # Resume: load step 1, save step 2 again; the crashed leftovers (objects and unfinished multipart
    # uploads / .partial files) are replaced, not mixed in.
    target = {"w": torch.zeros(1024)}
    store.load_checkpoint(ref, target)
    assert torch.equal(target["w"], torch.ones(1024))
    store.save_checkpoint("crash", 2, {"w": torch.full((1024,), 2.0)})
    assert store.latest("crash").step == 2
    keys = {o.key.split("/")[-1] for o in store.backend.list("runs/crash/step-2/")}
    assert keys == set(store.read_manifest(store.latest("crash"))["objects"]) | {"manifest.json"}
    store.verify(store.latest("crash"))
    assert store.backend.incomplete("runs/crash/") == []


@pytest.mark.slow
def test_kill_while_async_upload_in_flight_and_training_goes_on(store_uri, request):
    """checkpoint.mode async: SIGKILL while step 2 uploads in the background and training has moved on;
    step 1 stays the latest complete checkpoint and loads bit-exact."""
    import sys as _sys

    _sys.path.insert(0, str(WORKER.parent))
    from dist_worker import train_state

    env = dict(os.environ)
    if store_uri.startswith("s3://"):
        env.update(request.getfixturevalue("s3_env").env())
    store = open_store(store_uri)
    proc = subprocess.Popen([sys.executable, str(WORKER), "async-train", store_uri], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until training has gone on 3 steps past the staged save
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("trained step 5"):
                break
        prefix = "runs/async-crash/step-2/"
        while time.monotonic() < deadline and not (store.backend.incomplete(prefix) or
                                                   list(store.backend.list(prefix))):
            time.sleep(0.02)  # the upload has begun: a shard committed or still being written
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "staged step 2\n" in lines and lines[-1].startswith("trained step 5"), "".join(lines)
    left = {o.key for o in store.backend.list("runs/async-crash/step-2/")}
    assert "runs/async-crash/step-2/manifest.json" not in left
    assert left or store.backend.incomplete("runs/async-crash/step-2/"), "the upload never started"
    ref = store.latest("async-crash")
    assert ref.step == 1 and [r.step for r in store.list("async-crash")] == [1]
    resumed = train_state(0)
    store.load_checkpoint(ref, resumed)
    expected = train_state(1)
    assert all(torch.equal(resumed["model"][k], expected["model"][k]) for k in expected["model"])
    assert int(resumed["trainer"]["step"]) == 1
