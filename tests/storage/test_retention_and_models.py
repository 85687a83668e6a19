"""Retention (keep last K + pinned, crash leftovers) and model export/fetch, on both backends."""
import pytest
import torch

from flashops.storage import CorruptObjectError, StoreConfigError, fetch_model, open_store


def test_gc_keeps_last_k_and_pinned_and_removes_old_leftovers(store_uri):
    store = open_store(store_uri)
    for step in (1, 2, 3, 4, 5):
        store.save_checkpoint("r", step, {"w": torch.full((2,), float(step))})
    store.pin(f"{store.uri}/runs/r/step-1", by="deployment-chat-v1")
    store.backend.put_bytes("runs/r/step-0/__0_0.distcp", b"crashed long ago")   # older leftover
    store.backend.put_bytes("runs/r/step-6/__0_0.distcp", b"a save in progress")  # newer: keep

    report = store.gc("r", keep=2, pinned=[3], dry_run=True)
    assert [r.step for r in report.kept] == [1, 3, 4, 5] and report.dry_run
    assert [r.step for r in store.list("r")] == [1, 2, 3, 4, 5]  # dry run deleted nothing

    report = store.gc("r", keep=2, pinned=[3])
    assert [r.step for r in report.kept] == [1, 3, 4, 5]
    assert report.deleted == [f"{store.uri}/runs/r/step-2"]
    assert report.removed_partial == [f"{store.uri}/runs/r/step-0"]
    assert [r.step for r in store.list("r")] == [1, 3, 4, 5]
    assert store.backend.exists("runs/r/step-6/__0_0.distcp")
    assert not [o for o in store.backend.list("runs/r/step-2/")]

    store.unpin(store.latest("r").uri.replace("step-5", "step-1"), by="deployment-chat-v1")
    store.gc("r", keep=1)
    assert [r.step for r in store.list("r")] == [5]
    with pytest.raises(StoreConfigError, match="keep=0 must be an integer >= 1"):
        store.gc("r", keep=0)


def test_export_and_fetch_model_verifies_every_file(store_uri, tmp_path):
    store = open_store(store_uri)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"\x00" * 4096 + b"weights")
    ref = store.export_model("joyai-flash", "v1", {"model.safetensors": weights, "config.json": b'{"hidden": 64}'},
                             {"quantization": "int4", "checkpoint": f"{store.uri}/runs/r/step-5"})
    assert ref.uri == f"{store.uri}/models/joyai-flash/v1" and len(ref.manifest_hash) == 64
    assert [m.name for m in store.list_models()] == ["joyai-flash"]
    assert store.model_manifest(ref)["meta"]["quantization"] == "int4"

    dest = fetch_model(ref.uri, tmp_path / "served") if store_uri.startswith("file") else \
        store.fetch_model(ref.uri, tmp_path / "served")
    assert (dest / "model.safetensors").read_bytes() == weights.read_bytes()
    assert (dest / "config.json").read_text() == '{"hidden": 64}' and (dest / "manifest.json").is_file()
    store.verify(ref.uri)

    store.backend.put_bytes("models/joyai-flash/v1/config.json", b'{"hidden": 65}')  # tampered, same size
    with pytest.raises(CorruptObjectError, match="config.json is corrupt: expected 14 bytes with sha256"):
        store.fetch_model(ref, tmp_path / "other")
    assert not (tmp_path / "other" / "config.json").exists()
