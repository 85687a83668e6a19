"""Training against the real S3 server: user data read from s3:// (JSONL) and file:// (Parquet),
checkpoints written to s3:// (checkpoint.mode async, the default), a run killed while a checkpoint upload is in
flight, and the same run started again resuming bit-exact from the previous complete checkpoint."""
import io
import json
import os
import signal
import time
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flashops.storage import open_store

FLASHOPS = str(Path(sys.executable).parent / "flashops")

RUN = """
apiVersion: flashops.dev/v1alpha1
kind: TrainingRun
metadata: {{name: {name}}}
spec:
  stage: {stage}
  data: {{uri: "{data}"}}
  training: {{steps: {steps}, batchSize: 2, seqLen: 32}}
  checkpoint: {{every: 2, keep: 2, uri: "{store}"}}
"""


# Loaded by the killed child only (PYTHONPATH): step 4's shard uploads wait, so the kill lands mid-upload.
HOLD_STEP_4_UPLOADS = """
import os
import pathlib
import time
from flashops.storage import backends

_open_writer = backends.S3Backend.open_writer


def open_writer(self, key):
    writer = _open_writer(self, key)
    if "/step-4/" in key:
        commit = writer.commit

        def held():
            pathlib.Path(os.environ["HOLD_MARKER"]).touch()  # the upload of step 4 is under way
            time.sleep(300)
            return commit()

        writer.commit = held
    return writer


backends.S3Backend.open_writer = open_writer
"""


def text_rows(n: int) -> list[dict]:
    return [{"text": f"the {i}th user document counts {i} {i + 1} {i + 2} and ends."} for i in range(n)]


@pytest.mark.slow
def test_user_data_and_checkpoints_in_s3_with_resume(s3_server, tmp_path, monkeypatch):
    bucket = s3_server.make_bucket()
    data_bucket = s3_server.make_bucket()
    client = s3_server.client()
    jsonl = "\n".join(json.dumps(r) for r in text_rows(40)).encode()
    client.put_object(data_bucket, "corpus/docs.jsonl", io.BytesIO(jsonl), len(jsonl))
    parquet = tmp_path / "chats.parquet"
    chats = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": f"{i}"}]}
             for i in range(20)]
    pq.write_table(pa.Table.from_pylist(chats), parquet)

    env = {**os.environ, **s3_server.env(), "FLASHOPS_HOME": str(tmp_path / "home"), "COLUMNS": "250"}
    store_uri = f"s3://{bucket}/team"

    def run(name, stage, data, steps):
        spec = tmp_path / f"{name}-{steps}.yaml"
        spec.write_text(RUN.format(name=name, stage=stage, data=data, steps=steps, store=store_uri))
        out = subprocess.run([FLASHOPS, "run", "-f", str(spec), "--no-export"], env=env, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        return out

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)  # this process opens the store too
    store = open_store(store_uri)

    # Kill the run while step 4's checkpoint uploads in the background and training has gone on to step 5
    # (a test hook in the child holds step 4's shard uploads back); the same spec run again resumes from step 2.
    hook = tmp_path / "hold_step4"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOLD_STEP_4_UPLOADS)
    spec = tmp_path / "pretrain.yaml"
    spec.write_text(RUN.format(name="s3-pretrain", stage="pretrain", data=f"s3://{data_bucket}/corpus/docs.jsonl",
                               steps=6, store=store_uri))
    metrics = tmp_path / "home" / "logs" / "s3-pretrain" / "metrics.jsonl"
    marker = tmp_path / "step4-uploading"
    proc = subprocess.Popen([FLASHOPS, "run", "-f", str(spec), "--no-export"],
                            env={**env, "PYTHONPATH": str(hook), "HOLD_MARKER": str(marker)},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (marker.exists() and metrics.is_file() and len(metrics.read_text().splitlines()) >= 5):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "training never went past the step-4 save with its upload in flight"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    killed_at = store.latest("s3-pretrain")
    assert killed_at.step == 2  # step 4 was in flight: no manifest, so not a checkpoint
    store.verify(killed_at)
    assert killed_at.uri.startswith(f"s3://{bucket}/team/runs/s3-pretrain/step-")

    second = run("s3-pretrain", "pretrain", f"s3://{data_bucket}/corpus/docs.jsonl", 6)
    final = store.latest("s3-pretrain")
    assert final.step == 6
    assert f"(resumed at {killed_at.step})" in second.stdout  # the summary says where it resumed
    # bit-exact: the steps the killed run trained after step 2 come out the same after the resume
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    resumed_rows = {r["step"]: r for r in rows[len(killed_rows):]}
    for before in killed_rows[2:5]:
        after = resumed_rows[before["step"]]
        assert (after["loss"], after["grad_norm"]) == (before["loss"], before["grad_norm"]), before["step"]
    assert [r.step for r in store.list("s3-pretrain")] == [4, 6]  # keep: 2

    # Parquet from file://, initialised from the S3 checkpoint.
    spec = RUN.format(name="s3-sft", stage="sft", data=f"file://{parquet}", steps=2, store=store_uri)
    spec = spec.replace("  stage: sft\n", f"  stage: sft\n  initFrom: {store.latest('s3-pretrain').uri}\n")
    (tmp_path / "sft.yaml").write_text(spec)
    out = subprocess.run([FLASHOPS, "run", "-f", str(tmp_path / "sft.yaml"), "--no-export"], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert store.latest("s3-sft").step == 2


def test_missing_s3_data_object_is_a_usage_error_before_compute(s3_server, tmp_path):
    assert "FLASHOPS_S3_ENDPOINT" not in os.environ or os.environ["FLASHOPS_S3_ENDPOINT"] != s3_server.endpoint
    bucket = s3_server.make_bucket()
    env = {**os.environ, **s3_server.env(), "FLASHOPS_HOME": str(tmp_path / "home")}
    spec = tmp_path / "r.yaml"
    spec.write_text(RUN.format(name="nodata", stage="pretrain", data=f"s3://{bucket}/nope.jsonl", steps=2,
                               store=f"s3://{bucket}/ck"))
    out = subprocess.run([FLASHOPS, "run", "-f", str(spec)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert f"s3://{bucket}/nope.jsonl" in out.stderr + out.stdout and "upload it first" in out.stderr + out.stdout
