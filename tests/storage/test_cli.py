"""`flashops checkpoints list|show|verify|gc` through the real CLI app, and the torch-free guarantee."""
import json
import subprocess
import sys

import torch
from typer.testing import CliRunner

from flashops.cli.app import app
from flashops.storage import open_store

runner = CliRunner()


def _invoke(*args):
    return runner.invoke(app, ["checkpoints", *args])


def test_list_show_verify_gc(store_uri):
    store = open_store(store_uri)
    for step in (1, 2, 3):
        store.save_checkpoint("sft", step, {"w": torch.full((8,), float(step))}, {"spec_hash": "abc"})

    r = _invoke("list", store_uri)
    assert r.exit_code == 0, r.output
    assert [line.split()[2] for line in r.output.splitlines()] == ["1", "2", "3"]
    r = _invoke("list", f"{store.uri}/runs/sft", "--json")
    assert [json.loads(line)["step"] for line in r.output.splitlines()] == [1, 2, 3]

    r = _invoke("show", f"{store.uri}/runs/sft/step-2")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output.rsplit("#", 1)[0])
    assert doc["step"] == 2 and doc["spec_hash"] == "abc" and ".metadata" in doc["objects"]

    r = _invoke("verify", f"{store.uri}/runs/sft")  # a run means its latest checkpoint
    assert r.exit_code == 0 and f"OK {store.uri}/runs/sft/step-3" in r.output, r.output

    r = _invoke("gc", f"{store.uri}/runs/sft", "--keep", "1", "--pin", "1")
    assert r.exit_code == 0, r.output
    assert f"deleted {store.uri}/runs/sft/step-2" in r.output and "kept 2: step-1, step-3" in r.output
    assert [x.step for x in store.list("sft")] == [1, 3]


def test_verify_exits_1_naming_the_corrupt_object_and_2_on_bad_usage(tmp_path):
    store = open_store(f"file://{tmp_path}")
    ref = store.save_checkpoint("r", 1, {"w": torch.ones(100)})
    shard = next(k for k in store.read_manifest(ref)["objects"] if k.endswith(".distcp"))
    path = tmp_path / "runs/r/step-1" / shard
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    r = _invoke("verify", ref.uri)
    assert r.exit_code == 1 and shard in r.output and "is corrupt: expected" in r.output, r.output

    assert _invoke("gc", f"file://{tmp_path}", "--keep", "1").exit_code == 2
    r = _invoke("list", "gs://nope")
    assert r.exit_code == 2 and "scheme must be file:// or s3://" in r.output


def test_store_core_and_cli_do_not_import_torch():
    code = ("import sys, flashops.storage, flashops.cli.checkpoint_commands; "
            "from flashops.storage import open_store; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_latest_on_s3_does_not_import_torch(s3_uri, s3_env):
    """The operator finds the latest checkpoint with this, and must never load torch."""
    open_store(s3_uri).save_checkpoint("op", 4, {"w": torch.ones(2)})
    code = (f"import sys; from flashops.storage import open_store; s = open_store({s3_uri!r}); "
            "print(s.latest('op').step); assert 'torch' not in sys.modules")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**__import__('os').environ})
    assert r.returncode == 0 and r.stdout.strip() == "4", r.stderr
