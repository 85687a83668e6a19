"""Save/load round trips, latest/list, manifests, on both backends (file:// and the real S3 server)."""
import json
import logging

import pytest
import torch

from flashops.storage import AlreadyExistsError, CheckpointNotFoundError, StoreConfigError, open_store


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"embed.weight": torch.randn(64, 32, generator=g), "layers.0.w": torch.randn(32, 32, generator=g,
                                                                                           dtype=torch.bfloat16)},
        "optim": {"step": torch.tensor(seed), "exp_avg": torch.rand(64, 32, generator=g)},
        "step": seed,
    }


def _zeros_like(sd):
    return {k: _zeros_like(v) if isinstance(v, dict) else (torch.zeros_like(v) if torch.is_tensor(v) else None)
            for k, v in sd.items()}


def test_save_load_roundtrip_is_bitwise(store_uri):
    store = open_store(store_uri)
    saved = _state(7)
    ref = store.save_checkpoint("run-a", 7, saved, {"spec_hash": "h1", "model_config": {"preset": "tiny"},
                                                   "metrics": {"loss": 1.5}, "note": "x"})
    assert ref.uri == f"{store.uri}/runs/run-a/step-7" and len(ref.manifest_hash) == 64

    target = _zeros_like(saved)
    meta = store.load_checkpoint(ref.uri, target)
    for part in ("model", "optim"):
        for k, v in saved[part].items():
            assert v.dtype == target[part][k].dtype
            assert torch.equal(v.view(torch.uint8) if v.dtype == torch.bfloat16 else v,
                               target[part][k].view(torch.uint8) if v.dtype == torch.bfloat16 else target[part][k])
    assert target["step"] == 7
    assert (meta.run, meta.step, meta.world_size, meta.spec_hash) == ("run-a", 7, 1, "h1")
    assert meta.model_config == {"preset": "tiny"} and meta.metrics == {"loss": 1.5} and meta.extra == {"note": "x"}
    assert meta.manifest_sha256 == ref.manifest_hash


def test_latest_and_list_follow_steps_not_names(store_uri):
    store = open_store(store_uri)
    assert store.latest("run-b") is None
    for step in (9, 10, 100):  # step-9 > step-10 as strings; order must be numeric
        store.save_checkpoint("run-b", step, {"w": torch.full((4,), float(step))})
    store.save_checkpoint("other", 1, {"w": torch.zeros(4)})
    assert store.latest("run-b").step == 100
    assert [r.step for r in store.list("run-b")] == [9, 10, 100]
    assert {(r.run, r.step) for r in store.list()} == {("run-b", 9), ("run-b", 10), ("run-b", 100), ("other", 1)}
    target = {"w": torch.zeros(4)}
    store.load_checkpoint(store.latest("run-b"), target)
    assert target["w"].tolist() == [100.0] * 4


def test_manifest_records_every_object_and_is_written_last(store_uri):
    store = open_store(store_uri)
    ref = store.save_checkpoint("run-c", 1, _state(1), {"parent": "s3://x/runs/p/step-3"})
    doc = store.read_manifest(ref)
    listed = {o.key for o in store.backend.list("runs/run-c/step-1/")}
    assert set(doc["objects"]) | {"manifest.json"} == {k.split("/")[-1] for k in listed}
    assert ".metadata" in doc["objects"] and any(k.endswith(".distcp") for k in doc["objects"])
    assert all(len(o["sha256"]) == 64 and o["size"] > 0 for o in doc["objects"].values())
    assert doc["parent"] == "s3://x/runs/p/step-3" and doc["world_size"] == 1 and doc["step"] == 1
    assert json.loads(store.backend.get_bytes("runs/run-c/step-1/manifest.json"))["run"] == "run-c"


def test_same_step_twice_is_refused_unless_overwrite(store_uri):
    store = open_store(store_uri)
    store.save_checkpoint("run-d", 5, {"w": torch.ones(3)})
    with pytest.raises(AlreadyExistsError, match="step-5 already exists.*overwrite=True"):
        store.save_checkpoint("run-d", 5, {"w": torch.ones(3)})
    store.save_checkpoint("run-d", 5, {"w": torch.full((3,), 2.0)}, overwrite=True)
    target = {"w": torch.zeros(3)}
    store.load_checkpoint(store.latest("run-d"), target)
    assert target["w"].tolist() == [2.0, 2.0, 2.0]


def test_partial_checkpoint_is_ignored_with_a_warning(store_uri, caplog):
    store = open_store(store_uri)
    store.save_checkpoint("run-e", 1, {"w": torch.ones(3)})
    # What a crashed save leaves behind: shards, no manifest.
    store.backend.put_bytes("runs/run-e/step-2/__0_0.distcp", b"half a shard")
    with caplog.at_level(logging.WARNING, logger="flashops.storage"):
        assert store.latest("run-e").step == 1
    assert "ignoring partial checkpoint" in caplog.text and "step-2" in caplog.text
    with pytest.raises(CheckpointNotFoundError, match="no complete checkpoint at .*step-2"):
        store.load_checkpoint(f"{store.uri}/runs/run-e/step-2", {"w": torch.zeros(3)})
    # A manifest whose objects are not all there does not count either.
    doc = store.backend.get_bytes("runs/run-e/step-1/manifest.json")
    store.backend.put_bytes("runs/run-e/step-3/manifest.json", doc)
    assert store.latest("run-e").step == 1


def test_bad_names_and_uris_say_what_to_do(tmp_path):
    store = open_store(f"file://{tmp_path}")
    with pytest.raises(StoreConfigError, match="run='a/b' is not a valid name"):
        store.save_checkpoint("a/b", 1, {})
    with pytest.raises(StoreConfigError, match="step=-1 must be a non-negative integer"):
        store.save_checkpoint("ok", -1, {})
    with pytest.raises(StoreConfigError, match="scheme must be file:// or s3://"):
        open_store("gs://bucket/x")
    with pytest.raises(StoreConfigError, match="bucket 'Bad_Bucket' is not a valid S3 bucket name"):
        open_store("s3://Bad_Bucket/x")
    with pytest.raises(StoreConfigError, match="three slashes"):
        open_store("file://relative/dir")
    with pytest.raises(StoreConfigError, match="is not in store"):
        store.load_checkpoint("file:///elsewhere/runs/r/step-1", {})


def test_default_store_is_under_flashops_home(flashops_home):
    store = open_store()
    assert store.uri == f"file://{flashops_home / 'store'}"
    store.save_checkpoint("r", 0, {"w": torch.ones(2)})
    assert (flashops_home / "store/runs/r/step-0/manifest.json").is_file()
