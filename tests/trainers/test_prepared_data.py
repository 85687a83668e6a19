"""Data at scale: prefixes and globs, `data prepare` (token shards + index + manifest-last, lineage), rank
splits that cover an epoch exactly once at any world size, exact resume, packing, and bad input."""
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flashops.storage.datasets import open_token_dataset
from flashops.trainers.corpora import list_shards, open_dataset
from flashops.trainers.errors import DataError
from flashops.trainers.loader import PretrainLoader, SFTLoader
from flashops.trainers.prepare import prepare, tokenizer_sha256


def write_text_shards(root, shards=3, rows=24):
    root.mkdir(parents=True, exist_ok=True)
    for s in range(shards):
        lines = [json.dumps({"text": f"shard {s} doc {i} " + "word " * (i % 7)}) for i in range(rows)]
        (root / f"part-{s:02d}.jsonl").write_text("\n".join(lines) + "\n")
    return f"file://{root}/"


def chat_rows(n):
    return [{"messages": [{"role": "user", "content": f"say {i}" + " more" * (i % 5)},
                          {"role": "assistant", "content": f"{i}" * (1 + i % 4), "reasoning": f"it is {i}"}],
             "thinking": i % 2 == 0} for i in range(n)]


@pytest.fixture
def prepared(tmp_path):
    src = write_text_shards(tmp_path / "raw")
    result = prepare(src, f"file://{tmp_path}/prep", shard_tokens=150)
    return result, open_token_dataset(result.uri)


def covered_targets(ds, L, B, world, batches, state=None):
    """Token indices that are targets in `batches` global batches, read by `world` ranks (and their rows)."""
    loaders = [PretrainLoader(ds, L, B, seed=7, rank=r, world=world, prefetch=False) for r in range(world)]
    if state:
        for ld in loaders:
            ld.load_state_dict(state)
    seen, rows = [], []
    for _ in range(batches):
        for ld in loaders:
            b = ld.next_batch()
            rows.append(b.tokens)
            for start in b.starts:
                seen += range(start + 1, start + L + 1)
    return seen, np.concatenate(rows), loaders[0].state_dict()


# ------------------------------------------------------------------------------------ listing and prepare


def test_prefix_and_glob_list_shards_once_in_key_order(tmp_path):
    src = write_text_shards(tmp_path / "raw", shards=3)
    (tmp_path / "raw" / "_SUCCESS").write_text("")
    (tmp_path / "raw" / "notes.txt").write_text("not data")
    assert [s.key.rsplit("/", 1)[1] for s in list_shards(src)] == ["part-00.jsonl", "part-01.jsonl", "part-02.jsonl"]
    assert [s.key.rsplit("/", 1)[1] for s in list_shards(f"file://{tmp_path}/raw/part-0[12].jsonl")] == [
        "part-01.jsonl", "part-02.jsonl"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no data shards there.*empty prefix"):
        list_shards(f"file://{tmp_path}/empty/")
    rows = open_dataset(src, "pretrain").rows  # raw rows over the prefix, streamed shard by shard in key order
    assert len(rows) == 72 and rows[25]["text"].startswith("shard 1 doc 1 ")


def test_prepare_writes_token_shards_index_and_manifest_last_and_records_lineage(tmp_path):
    from flashops.api.lineage import open_lineage
    from flashops.storage import open_store
    from flashops.model.tokenizer import TokenizerCodec

    src = write_text_shards(tmp_path / "raw")
    lineage = open_lineage(f"sqlite:///{tmp_path}/lineage.db")
    result = prepare(src, f"file://{tmp_path}/prep", shard_tokens=150, lineage=lineage)
    ds = open_token_dataset(result.uri)
    manifest = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert manifest["format"] == "flashops.tokens/v1" and manifest["tokenizer_sha256"] == tokenizer_sha256()
    assert manifest["tokens"] == ds.tokens == result.tokens and manifest["documents"] == 72 == result.rows
    assert len(ds.shards) > 3  # shard_tokens splits each source shard
    for key, entry in manifest["objects"].items():  # every shard's size and sha256
        data = (tmp_path / "prep" / key).read_bytes()
        assert len(data) == entry["size"] and entry["sha256"] == __import__("hashlib").sha256(data).hexdigest()
    # the tokens are the documents as training would encode them, back to back, with their boundaries
    codec = TokenizerCodec()
    docs = codec.documents([json.loads(line)["text"] for s in range(3)
                            for line in (tmp_path / "raw" / f"part-{s:02d}.jsonl").read_text().splitlines()])
    assert ds.read(0, ds.tokens).tolist() == [t for d in docs for t in d]
    assert ds.doc_starts_in(0, ds.tokens).tolist() == np.cumsum([0] + [len(d) for d in docs])[:-1].tolist()
    # lineage: a dataset version (its manifest hash) derived from the source
    node = lineage.node(result.lineage_id)
    assert node["node"]["content_hash"] == result.manifest_sha256
    up = lineage.ancestors(result.lineage_id)
    assert any(n.get("uri") == src for n in up["nodes"])
    assert any(e["type"] == "derived_as" for e in up["edges"])
    # manifest-last: without it there is no dataset, and a second prepare refuses to replace one
    with pytest.raises(DataError, match="already holds a prepared dataset"):
        prepare(src, result.uri)
    open_store(result.uri).backend.delete(["manifest.json"])
    with pytest.raises(Exception, match="no prepared dataset"):
        open_token_dataset(result.uri)


def test_workers_over_disjoint_shards_write_what_one_process_writes(tmp_path):
    src = write_text_shards(tmp_path / "raw", shards=3)
    one = prepare(src, f"file://{tmp_path}/one", shard_tokens=150)
    for w in (1, 0):
        part = prepare(src, f"file://{tmp_path}/many", shard_tokens=150, worker=w, workers=2)
        assert part.manifest_sha256 is None
    with pytest.raises(DataError, match="not tokenized yet"):
        prepare(f"file://{tmp_path}/raw/part-0[01].jsonl", f"file://{tmp_path}/other", finalize_only=True)
    again = prepare(src, f"file://{tmp_path}/many", shard_tokens=150, worker=1, workers=2)
    assert again.skipped == [1]  # a restarted worker keeps the source shards it finished
    many = prepare(src, f"file://{tmp_path}/many", shard_tokens=150, finalize_only=True)
    a = json.loads((tmp_path / "one" / "manifest.json").read_text())
    b = json.loads((tmp_path / "many" / "manifest.json").read_text())
    assert a["objects"] == b["objects"] and many.tokens == one.tokens


# ------------------------------------------------------------------------------------ splits and resume


def test_one_and_two_ranks_cover_every_token_exactly_once_per_epoch(prepared):
    _, ds = prepared
    L, B = 16, 4
    batches = PretrainLoader(ds, L, B, 7, prefetch=False).batches
    one, rows1, _ = covered_targets(ds, L, B, 1, batches)
    two, rows2, _ = covered_targets(ds, L, B, 2, batches)
    n = batches * B * L
    assert sorted(one) == list(range(1, n + 1))  # every token a target exactly once (tail < one batch dropped)
    assert sorted(two) == sorted(one) and (rows1 == rows2).all()  # same global batches, split between ranks
    assert ds.tokens - 1 - n < B * L
    # each rank reads only its rows: rank 1 of 2 never sees rank 0's first row of a batch
    r0 = PretrainLoader(ds, L, B, 7, rank=0, world=2, prefetch=False).next_batch()
    r1 = PretrainLoader(ds, L, B, 7, rank=1, world=2, prefetch=False).next_batch()
    assert r0.tokens.shape == r1.tokens.shape == (2, L + 1) and r1.starts[0] == r0.starts[-1] + L
    # a new epoch is another order of the same batches
    ld = PretrainLoader(ds, L, B, 7, prefetch=False)
    first = [ld.next_batch().starts[0] for _ in range(batches)]
    second = [ld.next_batch().starts[0] for _ in range(batches)]
    assert sorted(first) == sorted(second) and first != second


@pytest.mark.parametrize("before,after", [(2, 2), (2, 1), (1, 2)])
def test_resume_mid_epoch_on_the_same_or_another_world_size_sees_each_token_once(prepared, before, after):
    _, ds = prepared
    L, B = 16, 4
    batches = PretrainLoader(ds, L, B, 7, prefetch=False).batches
    k = batches // 2
    head, _, state = covered_targets(ds, L, B, before, k)
    tail, _, _ = covered_targets(ds, L, B, after, batches - k, state=state)
    assert state == {"data_cursor": k, "data_epoch": 0}
    assert sorted(head + tail) == list(range(1, batches * B * L + 1))


def test_prefetch_gives_the_same_batches(prepared):
    _, ds = prepared
    a = PretrainLoader(ds, 16, 4, 7, prefetch=True)
    b = PretrainLoader(ds, 16, 4, 7, prefetch=False)
    for _ in range(5):
        x, y = a.next_batch(), b.next_batch()
        assert (x.tokens == y.tokens).all() and (x.positions == y.positions).all() and (x.mask == y.mask).all()
    a.close()


def test_sft_best_fit_packing_places_each_conversation_once_and_reports_efficiency(tmp_path):
    from flashops.model.tokenizer import TokenizerCodec

    rows = chat_rows(40)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "chats.parquet")
    result = prepare(f"file://{tmp_path}/chats.parquet", f"file://{tmp_path}/prep", stage="sft")
    ds = open_token_dataset(result.uri)
    codec = TokenizerCodec()
    for d in (0, 17):  # the prepared tokens and mask are what the SFT stage renders
        ids, mask = codec.chat(rows[d]["messages"], rows[d]["thinking"])
        s, n = ds.document(d)
        assert ds.read(s, n).tolist() == ids and ds.read_mask(s, n).tolist() == mask
    L, B = 64, 3

    def epoch(world, packing):
        loaders = [SFTLoader(ds, L, B, r, world, packing) for r in range(world)]
        starts, effs = [], []
        while loaders[0].epoch == 0:
            for ld in loaders:
                b = ld.next_batch()
                starts += b.starts
            effs.append(b.efficiency)
        return sorted(starts), float(np.mean(effs))

    best1, eff_best = epoch(1, "best-fit")
    best2, _ = epoch(2, "best-fit")
    none, eff_none = epoch(1, "none")
    every = sorted(ds.document(d)[0] for d in range(ds.documents))
    assert best1 == best2 == none == every  # each conversation exactly once per epoch, any world size
    assert eff_best > eff_none and 0 < eff_best <= 1


# ------------------------------------------------------------------------------------ bad input


def test_bad_input_names_the_shard_the_row_and_the_fix(tmp_path):
    raw = tmp_path / "raw"
    write_text_shards(raw, shards=2)
    (raw / "part-01.jsonl").write_text('{"text": "ok"}\n{"body": "no text key"}\n')
    with pytest.raises(DataError, match=r"part-01.jsonl row 1: missing key\(s\) \['text'\]"):
        prepare(f"file://{raw}/", f"file://{tmp_path}/out")
    with pytest.raises(DataError, match=r"part-01.jsonl row 1: missing key"):
        open_dataset(f"file://{raw}/", "pretrain")  # training on the raw prefix: before any compute
    (raw / "part-01.jsonl").unlink()
    (raw / "part-02.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"part-02.parquet: not a readable Parquet file.*re-export it, remove it"):
        prepare(f"file://{raw}/", f"file://{tmp_path}/out2")
    with pytest.raises(DataError, match=r"no data shards there"):
        prepare(f"file://{raw}/nothing-*.jsonl", f"file://{tmp_path}/out3")


def test_tokenizer_mismatch_stage_mismatch_and_truncated_shard_are_refused_before_compute(prepared, tmp_path):
    from flashops.model.tokenizer import TOKENIZER_FILE

    result, ds = prepared
    with pytest.raises(DataError, match="prepared for pretrain but this is a sft run"):
        open_dataset(result.uri, "sft")
    with pytest.raises(DataError, match="dpo runs read rows"):
        open_dataset(result.uri, "dpo")
    # another tokenizer (one more token): its hash differs, and training refuses the data
    doc = json.loads(TOKENIZER_FILE.read_text())
    doc["added_tokens"].append({**doc["added_tokens"][-1], "id": max(t["id"] for t in doc["added_tokens"]) + 1,
                                "content": "<|extra|>"})
    other = tmp_path / "other-tokenizer.json"
    other.write_text(json.dumps(doc))
    alien = prepare(f"file://{tmp_path}/raw/", f"file://{tmp_path}/alien", tokenizer=str(other))
    with pytest.raises(DataError, match="tokenized with another tokenizer.*re-run flashops data prepare"):
        open_dataset(alien.uri, "pretrain")
    # a truncated shard: found from the manifest's sizes when the run opens the data, not mid-run
    shard = sorted((tmp_path / "prep" / "shards").glob("*.tokens"))[2]
    data = shard.read_bytes()
    shard.write_bytes(data[:-6])
    with pytest.raises(DataError, match=rf"{shard.name} has {len(data) - 6} bytes, the manifest records {len(data)}"):
        open_dataset(result.uri, "pretrain")
    # same size, other bytes: `verify` re-hashes
    shard.write_bytes(data[:-2] + b"\xff\xff")
    with pytest.raises(Exception, match=rf"{shard.name} is corrupt: expected .* sha256"):
        open_token_dataset(result.uri).verify()


# ------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_pretraining_on_prepared_shards_resumes_exactly_after_a_crash(home, tiny_run, tmp_path):
    from flashops.trainers.runner import run_training

    src = write_text_shards(tmp_path / "raw", rows=40)
    data = prepare(src, f"file://{tmp_path}/prep", shard_tokens=300).uri
    spec = {"data": {"uri": data}, "training": {"steps": 3}, "checkpoint": {"every": 1, "keep": 5}}
    whole = run_training(tiny_run("whole", "pretrain", **spec), lineage=False)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(tiny_run("killed", "pretrain", **spec), lineage=False, crash_after=2)
    resumed = run_training(tiny_run("killed", "pretrain", **spec), lineage=False)
    assert resumed.resumed_from == 2
    assert [r["loss"] for r in resumed.history] == pytest.approx([r["loss"] for r in whole.history[2:]], abs=1e-6)


# ------------------------------------------------------------------------------------ the CLI


def test_cli_prepare_from_a_spec_show_verify_and_usage_errors(home, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from flashops.cli.app import app

    cli = CliRunner()
    src = write_text_shards(tmp_path / "raw", shards=2)
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump({"apiVersion": "flashops.dev/v1alpha1", "kind": "TrainingRun",
                                    "metadata": {"name": "r"}, "spec": {"stage": "pretrain", "data": {"uri": src}}}))
    out = f"file://{tmp_path}/prep"
    r = cli.invoke(app, ["data", "prepare", "-f", str(spec), "--output", out, "--json"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["source"] == src and doc["stage"] == "pretrain" and doc["lineage_id"]
    r = cli.invoke(app, ["data", "show", out])
    assert r.exit_code == 0 and json.loads(r.output)["tokens"] == doc["tokens"]
    assert cli.invoke(app, ["data", "verify", out]).exit_code == 0
    shard = sorted((tmp_path / "prep" / "shards").glob("*.tokens"))[0]
    shard.write_bytes(shard.read_bytes()[:-2] + b"\x00\x01")
    r = cli.invoke(app, ["data", "verify", out])
    assert r.exit_code == 1 and shard.name in r.output and "is corrupt" in r.output
    r = cli.invoke(app, ["data", "prepare", "--input", f"file://{tmp_path}/nothing/", "--output", f"file://{tmp_path}/x"])
    assert r.exit_code == 2 and "no data shards there" in r.output
    r = cli.invoke(app, ["data", "prepare", "--output", out])
    assert r.exit_code == 2 and "give exactly one of -f SPEC" in r.output
    assert "flashops data prepare --input" in cli.invoke(app, ["data", "prepare", "--help"]).output


def test_cluster_prepare_is_an_indexed_job_whose_pods_write_what_one_process_writes(home, tmp_path, monkeypatch):
    import kubernetes_validate
    import yaml
    from typer.testing import CliRunner

    from flashops.cli.app import app

    cli = CliRunner()
    src = write_text_shards(tmp_path / "raw", shards=3)
    out = f"file://{tmp_path}/by-job"
    monkeypatch.setenv("FLASHOPS_S3_ENDPOINT", "http://minio.minio:9000")
    r = cli.invoke(app, ["data", "prepare", "--input", src, "--output", out, "--workers", "3", "--shard-tokens",
                         "150", "--render-job", "prepare-raw", "--namespace", "team-a"])
    assert r.exit_code == 0, r.output
    job = yaml.safe_load(r.output)
    kubernetes_validate.validate(job, kubernetes_validate.utils.latest_version(), strict=True)
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 3
    assert job["metadata"]["namespace"] == "team-a"
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:3] == ["flashops", "data", "prepare"]
    # each pod: the same command, its JOB_COMPLETION_INDEX (pod 0 waits for the others and finalizes)
    for index in ("2", "1", "0"):
        r = cli.invoke(app, cmd[1:], env={"JOB_COMPLETION_INDEX": index})
        assert r.exit_code == 0, r.output
    assert "prepared" in r.output and "lineage:" in r.output
    one = prepare(src, f"file://{tmp_path}/one", shard_tokens=150)
    a = json.loads((tmp_path / "one" / "manifest.json").read_text())
    b = json.loads((tmp_path / "by-job" / "manifest.json").read_text())
    assert a["objects"] == b["objects"] and open_token_dataset(out).tokens == one.tokens
    r = cli.invoke(app, ["data", "prepare", "--input", src, "--output", out, "--render-job", "Bad_Name"])
    assert r.exit_code == 2 and "job name 'Bad_Name'" in r.output


def test_the_rendered_prepare_job_goes_to_the_cluster_with_kubectl_apply(home, tmp_path, k8s_bare, monkeypatch):
    """There is no custom resource for a prepare: the CLI renders the Job and kubectl applies it (docs/data.md)."""
    import sys

    from fixtures.k8s import Kind

    k8s_bare.api.serve_kind(Kind("batch", "v1", "jobs", "Job", status_subresource=True))
    monkeypatch.setenv("FLASHOPS_S3_ENDPOINT", "http://minio.minio:9000")
    flashops = str(Path(sys.executable).with_name("flashops"))
    job_file = tmp_path / "prepare-c4.yaml"
    with job_file.open("w") as f:  # the documented command, run as a user runs it
        subprocess.run([flashops, "data", "prepare", "--input", "s3://raw/c4/", "--output", "s3://prepared/c4-v1",
                        "--workers", "4", "--render-job", "prepare-c4", "--namespace", "team-a"], stdout=f, check=True)
    import kubernetes_validate
    import yaml

    # the upstream batch/v1 Job schema (strict: no unknown fields); the emulator serves no OpenAPI for kubectl's own
    kubernetes_validate.validate(yaml.safe_load(job_file.read_text()), kubernetes_validate.utils.latest_version(),
                                 strict=True)
    k8s_bare.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-a"}}, "namespaces", None)
    applied = k8s_bare.kubectl("apply", "--validate=false", "-f", str(job_file))
    assert "job.batch/prepare-c4 created" in applied.stdout
    job = k8s_bare.get("batch/v1", "jobs", "prepare-c4", namespace="team-a")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 4
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    assert cmd[:3] == ["flashops", "data", "prepare"] and "--finalize-when-done" in cmd
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["FLASHOPS_S3_ENDPOINT"] == "minio.minio:9000"  # the settings trainer pods get


@pytest.mark.slow
def test_sft_trains_on_prepared_conversations_and_reports_packing_efficiency(home, tiny_run, tmp_path):
    from flashops.trainers.runner import run_training

    pq.write_table(pa.Table.from_pylist(chat_rows(30)), tmp_path / "chats.parquet")
    data = prepare(f"file://{tmp_path}/chats.parquet", f"file://{tmp_path}/prep", stage="sft").uri
    result = run_training(tiny_run("sft-prepared", "sft", data={"uri": data}, training={"steps": 2, "seqLen": 64}),
                          lineage=False)
    assert [r["step"] for r in result.history] == [1, 2]
    assert all(0 < r["packing_efficiency"] <= 1 and r["loss"] > 0 for r in result.history)
