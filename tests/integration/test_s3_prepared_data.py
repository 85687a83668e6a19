"""Done-when of issue 21: rows under an S3 prefix are prepared with the CLI (token shards in the real S3
server, recorded in lineage), a 2-rank pretraining run streams them, is killed after a checkpoint, resumes,
and its losses equal an uninterrupted 1-rank run's on the same data (same batches, exactly once)."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashops.api.spec import parse_object

BIN = Path(sys.executable).parent


def upload_text_shards(client, bucket: str, shards: int = 3, rows: int = 30) -> None:
    for s in range(shards):
        body = "\n".join(json.dumps({"text": f"shard {s} doc {i}: " + "count " * (i % 9) + str(i)})
                         for i in range(rows)).encode()
        client.put_object(bucket, f"raw/part-{s:03d}.jsonl", io.BytesIO(body), len(body))


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (torchrun starts each rank in a session of its own: killpg misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def kill_tree(pid: int) -> None:
    for p in process_tree(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def spec(name: str, data: str, store: str, procs: int) -> dict:
    return {"apiVersion": "flashops.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name},
            "spec": {"stage": "pretrain", "data": {"uri": data}, "parallelism": {"procsPerNode": procs},
                     "training": {"steps": 3, "batchSize": 2, "seqLen": 32},
                     "checkpoint": {"every": 1, "keep": 5, "uri": store}}}


@pytest.mark.slow
def test_two_ranks_stream_prepared_s3_shards_and_resume_exactly_after_a_kill(s3_server, tmp_path, monkeypatch):
    import yaml

    from flashops.api.lineage import open_lineage
    from flashops.storage import open_store

    bucket = s3_server.make_bucket()
    upload_text_shards(s3_server.client(), bucket)
    env = {**os.environ, **s3_server.env(), "FLASHOPS_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1",
           "COLUMNS": "250"}
    env.pop("FLASHOPS_LINEAGE_URL", None)
    data = f"s3://{bucket}/prep/v1"
    out = subprocess.run([str(BIN / "flashops"), "data", "prepare", "--input", f"s3://{bucket}/raw/", "--output",
                          data, "--shard-tokens", "300", "--json"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    prepared = json.loads(out.stdout)
    assert prepared["sources"] == 3 and prepared["shards"] > 3 and prepared["rows"] == 90

    store_uri = f"s3://{bucket}/team"
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(spec("s3-data-2ranks", data, store_uri, 2)))
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    store = open_store(store_uri)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "flashops.trainers", "--spec", str(path),
           "--no-export"]
    proc = subprocess.Popen(cmd + ["--log-dir", str(tmp_path / "killed")], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300
        while store.latest("s3-data-2ranks") is None:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        kill_tree(proc.pid)  # torchrun and both ranks at once, like a lost node
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)
    killed_at = store.latest("s3-data-2ranks").step
    assert killed_at < 3
    again = subprocess.run(cmd + ["--log-dir", str(tmp_path / "resumed")], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert f"step {killed_at})" in again.stdout + again.stderr  # "resumed ... (step k)" in the trainer's log
    resumed = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in resumed] == list(range(killed_at + 1, 4))

    # the same run, uninterrupted, in one process: the same global batches give the same losses
    monkeypatch.setenv("FLASHOPS_HOME", str(tmp_path / "home1"))
    from flashops.trainers.runner import run_training

    whole = run_training(parse_object(spec("s3-data-1rank", data, store_uri, 1)), None, False)
    for r in resumed:
        assert r["loss"] == pytest.approx(whole.history[r["step"] - 1]["loss"], abs=1e-5)

    # lineage: the run consumed the prepared version, which derives from the raw prefix
    lin = open_lineage(f"sqlite:///{tmp_path}/home/lineage.db")
    up = lin.ancestors(lin.find(store.latest("s3-data-2ranks").uri))
    datasets = {n["uri"]: n for n in up["nodes"] if n["type"] == "dataset"}
    assert datasets[data]["content_hash"] == prepared["manifest_sha256"]
    assert f"s3://{bucket}/raw/" in datasets
