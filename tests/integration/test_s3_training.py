"""Training against the real S3 server: user data read from s3:// (JSONL) and file:// (Parquet),
checkpoints written to s3://, and a longer second run resuming from the S3 checkpoint."""
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

    # Kill the run once its first S3 checkpoint is complete; the same spec run again resumes from it.
    spec = tmp_path / "pretrain.yaml"
    spec.write_text(RUN.format(name="s3-pretrain", stage="pretrain", data=f"s3://{data_bucket}/corpus/docs.jsonl",
                               steps=6, store=store_uri))
    proc = subprocess.Popen([FLASHOPS, "run", "-f", str(spec), "--no-export"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while store.latest("s3-pretrain") is None:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = store.latest("s3-pretrain")
    assert killed_at.step < 6
    store.verify(killed_at)
    assert killed_at.uri.startswith(f"s3://{bucket}/team/runs/s3-pretrain/step-")

    second = run("s3-pretrain", "pretrain", f"s3://{data_bucket}/corpus/docs.jsonl", 6)
    final = store.latest("s3-pretrain")
    assert final.step == 6
    assert f"(resumed at {killed_at.step})" in second.stdout  # the summary says where it resumed
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
