"""Bad input found by users (issue 17, items 20-23): a diverged run reported as a success, six tracebacks,
`validate` passing what `run` refuses, and a failed `flashops serve` closing another process's deployment.
Each is a clear error with exit code 2 before any compute."""
from __future__ import annotations

import socket
import sqlite3
import time

import pytest
import yaml
from typer.testing import CliRunner

from flashops.cli.app import app


def run_spec(name="r", **spec) -> dict:
    body = {"stage": "pretrain", "model": {"preset": "joyai-flash-debug"},
            "training": {"steps": 2, "batchSize": 2, "seqLen": 32}, "checkpoint": {"every": 1, "keep": 5}}
    body.update(spec)
    return {"apiVersion": "flashops.dev/v1alpha1", "kind": "TrainingRun", "metadata": {"name": name}, "spec": body}


def write(tmp_path, *docs, name="spec.yaml"):
    f = tmp_path / name
    f.write_text(yaml.safe_dump_all(docs))
    return f


def flashops(*args):
    started = time.monotonic()
    result = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "250"})
    return result, time.monotonic() - started


# ---------------------------------------------------------------------- item 20

def test_lr_and_steps_are_bounded_in_the_spec(tmp_path, home):
    f = write(tmp_path, run_spec(optimizer={"lr": 1e300}, training={"steps": 10**12}))
    result, _ = flashops("validate", "-f", f)
    assert result.exit_code == 2
    assert "spec.optimizer.lr: 1e+300 is invalid: should be less than or equal to 1" in result.output
    assert "spec.training.steps: 1000000000000 is invalid: should be less than or equal to 10000000" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("slow_save", [False, True], ids=["save-done", "save-in-flight"])
def test_a_diverged_run_stops_fails_and_saves_nothing_after_it(tmp_path, home, monkeypatch, slow_save):
    if slow_save:  # step 1's background save is still writing when step 2 diverges (as it was on a fast CI machine)
        from flashops.storage.store import CheckpointStore
        write_manifest = CheckpointStore._write_manifest

        def late_manifest(self, prefix, manifest):
            time.sleep(2.0)
            return write_manifest(self, prefix, manifest)
        monkeypatch.setattr(CheckpointStore, "_write_manifest", late_manifest)
    # lr 1 with an absurd weight decay: the weights blow up to inf after step 1, the gradients are NaN at step 2
    f = write(tmp_path, run_spec("diverges", optimizer={"name": "adamw", "lr": 1.0, "weightDecay": 1e30,
                                                        "schedule": "constant"}, training={"steps": 4, "batchSize": 2,
                                                                                           "seqLen": 32}))
    result, _ = flashops("run", "-f", f)
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "run 'diverges' diverged at step 2: the gradient norm is nan" in out
    assert "no checkpoint after step 1" in out and "lower spec.optimizer.lr" in out
    assert sorted(p.name for p in (home / "store" / "runs" / "diverges").iterdir()) == ["step-1"]
    db = sqlite3.connect(home / "lineage.db")
    (status, metrics), = db.execute("select status, metrics from runs where name = 'diverges'")
    assert status == "failed" and '"diverged_at_step": 2' in metrics
    assert db.execute("select uri from checkpoints").fetchall() == [(f"file://{home}/store/runs/diverges/step-1",)]


# ---------------------------------------------------------------------- item 21: six tracebacks

def test_a_binary_spec_file_is_a_clear_error(tmp_path, home):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"\x89PNG\r\n\x1a\n\xd0\x00\xff" * 20)
    for command in ("validate", "run", "serve"):
        result, _ = flashops(command, "-f", f)
        assert result.exit_code == 2 and "not a YAML text file" in result.output, (command, result.output)
        assert "Traceback" not in result.output


@pytest.mark.parametrize("target,needle", [
    ("mysql://u@db/lineage", "use sqlite:///PATH, postgresql+psycopg://"),
    ("sqlite:////proc/no/such/dir/lineage.db", "use a writable path"),
])
def test_a_bad_lineage_target_is_a_clear_error_before_compute(tmp_path, home, target, needle):
    result, seconds = flashops("run", "-f", write(tmp_path, run_spec()), "--lineage", target)
    assert result.exit_code == 2 and needle in result.output and f"--lineage {target}" in result.output, result.output
    assert not (home / "store").exists() and not (home / "logs").exists()  # nothing started


def test_an_unwritable_store_is_found_before_training(tmp_path, home):
    result, _ = flashops("run", "-f", write(tmp_path, run_spec()), "--store", "file:///proc/no/such/store")
    assert result.exit_code == 2 and "checkpoint store: cannot create store directory /proc/no/such/store" in \
        result.output, result.output
    assert not (home / "logs").exists()
    assert sqlite3.connect(home / "lineage.db").execute("select count(*) from runs").fetchone() == (0,)
    # a writable store is probed without leaving anything behind
    from flashops.storage import open_store

    open_store(f"file://{tmp_path}/fresh/store").check_writable()
    assert not (tmp_path / "fresh").exists()


DEPLOYMENT = {"apiVersion": "flashops.dev/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": "chat"},
              "spec": {"source": "quickstart"}}


def test_serve_of_an_unfinished_pipeline_and_a_bad_port_are_clear_errors(tmp_path, home):
    f = write(tmp_path, DEPLOYMENT)
    with socket.socket() as s:  # a free port: 8080 may be taken on a shared machine
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    result, _ = flashops("serve", "-f", f, "--port", free)
    assert result.exit_code == 2 and "nothing found for 'quickstart'" in result.output, result.output
    assert "run that stage first" in result.output and "Traceback" not in result.output
    result, seconds = flashops("serve", "-f", f, "--port", 99999)
    assert result.exit_code == 2 and "--port 99999: a TCP port is 1..65535" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_port_in_use_is_a_clear_error_and_closes_no_one_elses_deployment(tmp_path, home):
    from flashops.api.lineage import open_lineage

    # another `flashops serve` of the same deployment is running and recorded its deployment
    lin = open_lineage()
    from flashops.cli.serve_commands import process_identity

    theirs = lin.add_deployment("file:///s/models/chat/v1", "chat", None, process_identity(), 100)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        f = write(tmp_path, {**DEPLOYMENT, "spec": {"source": "file:///s/models/chat/v1"}})
        result, seconds = flashops("serve", "-f", f, "--port", port)
    finally:
        busy.close()
    assert result.exit_code == 2, result.output
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use (another process is using it" in result.output
    assert lin.node(theirs)["node"]["ended_at"] is None  # still open: the failed serve closed nothing
    assert [d["id"] for d in lin.list_nodes(type="deployment")["items"]] == [theirs]  # and recorded nothing


def test_two_serving_processes_get_their_own_deployment_records(home):
    from flashops.api.lineage import open_lineage
    from flashops.cli.serve_commands import process_identity

    lin = open_lineage()
    a = lin.add_deployment("file:///s/models/chat/v1", "chat", None, process_identity(), 100)
    b = lin.add_deployment("file:///s/models/chat/v1", "chat", None, process_identity(), 100)
    assert a != b
    lin.close_deployment(b)
    assert lin.node(a)["node"]["ended_at"] is None


# ---------------------------------------------------------------------- item 22: validate checks what run refuses

def test_validate_finds_what_run_would_refuse_without_compute(tmp_path, home):
    bad = [run_spec("corpus", data={"uri": "builtin:no-such-corpus"}),
           run_spec("path", data={"uri": f"file://{tmp_path}/missing.jsonl"})]
    long = write(tmp_path, run_spec("long", training={"steps": 2, "batchSize": 2, "seqLen": 10**8}), name="long.yaml")
    result, seconds = flashops("validate", "-f", write(tmp_path, *bad), long)
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "TrainingRun/corpus: spec.data.uri 'builtin:no-such-corpus': no such builtin corpus" in out
    assert f"TrainingRun/path: spec.data.uri 'file://{tmp_path}/missing.jsonl': no such file" in out
    assert "TrainingRun/long: spec.training.seqLen" in out and "longer than the model's max_seq_len" in out
    # --offline skips data and store access, still checks builtin names and the model
    result, _ = flashops("validate", "--offline", "-f", write(tmp_path, *bad), long)
    out = " ".join(result.output.split())
    assert result.exit_code == 2 and "no such builtin corpus" in out and "max_seq_len" in out
    assert "missing.jsonl" not in out
    result, _ = flashops("validate", "--offline", "-f", write(tmp_path, bad[1], name="one.yaml"))
    assert result.exit_code == 0, result.output


def test_validate_finds_a_missing_s3_object(tmp_path, home, s3_env):
    bucket = s3_env.make_bucket()  # a real, empty bucket
    f = write(tmp_path, run_spec(data={"uri": f"s3://{bucket}/sft/none.jsonl"}))
    result, _ = flashops("validate", "-f", f)
    assert result.exit_code == 2 and "no such object in bucket" in result.output, result.output
    result, _ = flashops("validate", "--offline", "-f", f)
    assert result.exit_code == 0, result.output
