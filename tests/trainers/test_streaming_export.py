"""The serving export, streamed from the checkpoint: bounded memory, the same tensors as the in-memory
conversion, the layout vLLM's and SGLang's DeepSeek-V3 loaders expect (fixtures/engine_layouts.py, copied from
their source), and transformers still loads it with the same logits."""
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from fixtures import engine_layouts as L
from safetensors import safe_open

from flashops.model import JoyAIFlash, get_config
from flashops.model.export import INDEX_FILE, export_int4, unpack_int4, unpack_int32
from flashops.model.hf import to_hf_state_dict
from flashops.storage import fetch_model
from flashops.trainers.runner import export_model


@pytest.fixture(scope="module")
def debug_export(tmp_path_factory):
    """A debug model with a non-trivial router bias, checkpointed, exported with INT4 and files of at most
    1 MB (several files), fetched to a folder: (model, store, checkpoint URI, model URI, folder)."""
    from flashops.storage import open_store

    torch.manual_seed(0)
    cfg = get_config("joyai-flash-debug")
    model = JoyAIFlash(cfg).eval()
    with torch.no_grad():
        for moe in model.moe_layers:
            moe.expert_bias_E.normal_(0, 0.05)
    root = tmp_path_factory.mktemp("export")
    store = open_store(f"file://{root}/store")
    ckpt = store.save_checkpoint("dbg", 7, {"model": model.state_dict()}, {"model_config": cfg.to_dict()})
    uri = export_model(store, None, ckpt.uri, "dbg", int4=True, max_file_bytes=1_000_000)
    return model, store, ckpt.uri, uri, fetch_model(uri, root / "fetched")


def _read_folder(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / INDEX_FILE).read_text())
    out = {}
    for f in sorted(set(index["weight_map"].values())):
        with safe_open(str(folder / f), "pt") as fh:
            for k in fh.keys():
                assert index["weight_map"][k] == f, k
                out[k] = fh.get_tensor(k)
    assert set(out) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in out.values())
    return out


def test_streamed_export_equals_the_in_memory_conversion_bit_for_bit(debug_export):
    model, store, _, uri, folder = debug_export
    files = sorted(p.name for p in folder.glob("model-*.safetensors"))
    assert len(files) > 2 and all(p.stat().st_size <= 1_000_000 for p in folder.glob("model-*.safetensors")
                                  if len(safe_open(str(p), "pt").keys()) > 1)
    streamed, reference = _read_folder(folder), to_hf_state_dict(model)
    assert streamed.keys() == reference.keys()
    for k, v in reference.items():
        assert streamed[k].dtype == v.dtype and torch.equal(streamed[k], v), k
    # INT4: the same rounding as the in-memory export (export_int4), repacked as compressed-tensors
    packed = _read_folder(folder / "int4")
    tensors, report = export_int4(model, 64)
    for layer, moe_idx in ((1, 1), (3, 3)):
        for ours, proj in (("w1_EFD", "gate_proj"), ("w3_EFD", "up_proj"), ("w2_EDF", "down_proj")):
            name = f"layers.{moe_idx}.moe.routed_experts.inner_experts.{ours}"

            q_ref, s_ref = unpack_int4(tensors[name + ".qweight"]), tensors[name + ".scales"]
            for e in range(model.arch.num_experts):
                base = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                shape = packed[base + ".weight_shape"].tolist()
                assert torch.equal(unpack_int32(packed[base + ".weight_packed"], shape[1]), q_ref[e]), base
                assert torch.equal(packed[base + ".weight_scale"], s_ref[e]), base
    meta = store.model_manifest(uri)["meta"]["int4"]
    assert meta["group_size"] == 64 and abs(meta["relative_rmse"] - report["relative_rmse"]) < 1e-6


def test_layout_and_names_are_what_vllm_and_sglang_load(debug_export):
    model, _, _, _, folder = debug_export
    cfg = model.arch
    config = json.loads((folder / "config.json").read_text())
    assert all(k in config for k in L.CONFIG_KEYS), [k for k in L.CONFIG_KEYS if k not in config]
    assert config["architectures"] == [L.ARCHITECTURE] and config["model_type"] == "deepseek_v3"
    assert config["num_hidden_layers"] == cfg.n_layers and config["num_nextn_predict_layers"] == 1
    assert config["topk_method"] == "noaux_tc" and config["scoring_func"] == "sigmoid"
    names = set(json.loads((folder / INDEX_FILE).read_text())["weight_map"])
    want = set(L.TOP_LEVEL)
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        want |= {p + n for n in L.ATTENTION}
        if i < config["first_k_dense_replace"]:
            want |= {p + n for n in L.DENSE_MLP}
        else:
            want |= {p + n for n in L.MOE_ROUTER + L.SHARED_EXPERTS}
            want |= {p + L.EXPERT.format(i=e, proj=proj) for e in range(cfg.num_experts) for proj in L.EXPERT_PROJS}
    mtp = f"model.layers.{config['num_hidden_layers']}."
    want |= {mtp + n for n in L.MTP_SPEC + L.ATTENTION}
    want |= {mtp + n for n in L.DENSE_MLP}  # the known gap (see the fixture): a dense MTP block
    assert names == want, (sorted(names - want)[:5], sorted(want - names)[:5])
    # the INT4 folder: every routed expert Linear packed, nothing else; ignore lists the others
    int4 = json.loads((folder / "int4" / "config.json").read_text())
    q = int4["quantization_config"]
    assert {k: q[k] for k in L.QUANT_CONFIG} == L.QUANT_CONFIG
    weights = q["config_groups"]["group_0"]["weights"]
    assert {k: weights[k] for k in L.QUANT_WEIGHTS} == L.QUANT_WEIGHTS and weights["group_size"] == 64
    int4_names = set(json.loads((folder / "int4" / INDEX_FILE).read_text())["weight_map"])
    experts = {n for n in want if ".mlp.experts." in n}
    assert int4_names == (want - experts) | {n[: -len("weight")] + s for n in experts for s in L.PACKED_SUFFIXES}
    linear = {n[: -len(".weight")] for n in want - experts if n.endswith(".weight") and "norm" not in n
              and "embed_tokens" not in n and "layernorm" not in n}
    assert set(q["ignore"]) == linear
    packed = _read_folder(folder / "int4")
    w = packed["model.layers.1.mlp.experts.0.gate_proj.weight_packed"]
    assert w.dtype == torch.int32 and tuple(w.shape) == (cfg.moe_hidden_dim, cfg.dim // 8)
    assert packed["model.layers.1.mlp.experts.0.gate_proj.weight_shape"].tolist() == [cfg.moe_hidden_dim, cfg.dim]
    assert packed["model.layers.1.mlp.experts.0.gate_proj.weight_scale"].shape == (cfg.moe_hidden_dim, cfg.dim // 64)


def test_transformers_loads_the_export_with_equal_logits(debug_export):
    transformers = pytest.importorskip("transformers")
    model, _, _, _, folder = debug_export
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits, hf(tokens).logits, atol=1e-4)


def test_the_flashops_runtime_reads_both_variants(debug_export, exact_int4):
    from flashops.model.qat import disable_qat, enable_qat
    from flashops.serving.loading import load_model

    model, _, _, _, folder = debug_export
    full, _ = load_model(folder, "none")
    assert all(torch.equal(full.state_dict()[k], v) for k, v in model.state_dict().items())
    int4, _ = load_model(folder, "int4")
    tokens = torch.randint(0, 4096, (1, 16), generator=torch.Generator().manual_seed(2))
    enable_qat(model, 64)
    try:
        with torch.no_grad():
            want = model(tokens)
            got = int4(tokens)
    finally:
        disable_qat(model)
    assert torch.allclose(got.logits, want.logits, atol=1e-4)
    assert torch.allclose(got.mtp_logits, want.mtp_logits, atol=1e-4)


# Peak RSS of the export alone: the imports' own high-water mark (over 1 GB here, transient) is reset through
# /proc/self/clear_refs ("5" resets VmHWM, Linux), so VmHWM afterwards is the export's peak.
_RSS_CHILD = textwrap.dedent("""
    import json, sys
    import torch, safetensors.torch
    from flashops.model.model import JoyAIFlash
    from flashops.storage import open_store
    from flashops.trainers.runner import export_model
    import flashops.model.export, flashops.model.hf, flashops.storage.dcp

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

    store = open_store(sys.argv[1])
    with torch.device("meta"):
        JoyAIFlash(flashops.model.config.get_config("joyai-flash-small"))  # warm the model code's one-time costs
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = status("VmRSS")
    uri = export_model(store, None, sys.argv[2], "small", int4=True)
    print(json.dumps({"baseline": base, "peak": status("VmHWM"), "uri": uri}))
""")


@pytest.mark.slow
def test_export_of_joyai_flash_small_keeps_peak_rss_under_half_the_model(tmp_path):
    """The streamed export of joyai-flash-small (135M parameters, 541 MB in fp32, + INT4) grows the process by
    less than half the model's fp32 size above the interpreter's baseline after imports: it never holds the
    model. (Linux: the peak is VmHWM after a reset through /proc/self/clear_refs.)"""
    from flashops.storage import open_store

    cfg = get_config("joyai-flash-small")
    store = open_store(f"file://{tmp_path}/store")
    model = JoyAIFlash(cfg)
    fp32_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    largest = max(t.numel() * 4 for t in model.state_dict().values())
    ref = store.save_checkpoint("small", 1, {"model": model.state_dict()}, {"model_config": cfg.to_dict()})
    del model
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, store.uri, ref.uri], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    grown = got["peak"] - got["baseline"]
    print(f"export RSS: baseline {got['baseline'] / 2**20:.0f} MiB, peak {got['peak'] / 2**20:.0f} MiB, grown "
          f"{grown / 2**20:.0f} MiB; model fp32 {fp32_bytes / 2**20:.0f} MiB, largest tensor {largest / 2**20:.0f} MiB")
    assert grown < fp32_bytes / 2, (grown, fp32_bytes)
    assert len(store.model_manifest(got["uri"])["objects"]) > 4


def test_streamed_export_to_and_from_s3_equals_the_file_export(debug_export, s3_uri, tmp_path):
    """Against the real S3 server: the checkpoint read by ranged GETs, every file streamed up (multipart), the
    manifest last; the same tensors as the file:// export."""
    from flashops.storage import open_store

    model, _, _, _, folder = debug_export
    store = open_store(s3_uri)
    ckpt = store.save_checkpoint("dbg", 7, {"model": model.state_dict()}, {"model_config": model.arch.to_dict()})
    uri = export_model(store, None, ckpt.uri, "dbg", int4=True, max_file_bytes=1_000_000)
    assert uri.startswith("s3://") and store.verify(uri).objects > 10
    fetched = fetch_model(uri, tmp_path / "s3")
    for sub in ("", "int4"):
        assert _read_folder(fetched / sub).keys() == _read_folder(folder / sub).keys()
        a, b = _read_folder(fetched / sub), _read_folder(folder / sub)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_failed_export_leaves_no_model(debug_export, monkeypatch):
    """A failure half-way (here: reading a tensor) aborts every open file and writes no manifest: nothing under
    models/ looks complete, and the next export of the same name succeeds."""
    from flashops.storage import StoreError
    from flashops.storage.dcp import CheckpointTensors

    _, store, ckpt_uri, _, _ = debug_export
    real, calls = CheckpointTensors.read, []

    def failing(self, key):
        calls.append(key)
        if len(calls) == 20:
            raise StoreError("simulated: the store went away")
        return real(self, key)

    monkeypatch.setattr(CheckpointTensors, "read", failing)
    with pytest.raises(StoreError, match="simulated"):
        export_model(store, None, ckpt_uri, "broken", int4=True, max_file_bytes=1_000_000)
    assert "broken" not in {m.name for m in store.list_models()}
    assert not [o for o in store.backend.list("models/broken/")]
    monkeypatch.setattr(CheckpointTensors, "read", real)
    assert export_model(store, None, ckpt_uri, "broken", int4=True) == store.model_uri("broken", "step-7")
