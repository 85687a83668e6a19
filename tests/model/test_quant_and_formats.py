"""QAT (STE), INT4 export/import, HF DeepSeek-V3 adapter round trips, and `flashops model info`."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashops.model import JoyAIFlash, get_config
from flashops.model.export import export_int4, load_int4, pack_int4, read_int4, save_int4, unpack_int4
from flashops.model.hf import load_hf, save_hf, to_hf_state_dict
from flashops.model.qat import disable_qat, enable_qat, fake_quantize_int4, qat_enabled

FLASHOPS = str(Path(sys.executable).parent / "flashops")


@pytest.fixture(scope="module")
def trained_like():
    torch.manual_seed(0)
    m = JoyAIFlash(get_config("joyai-flash-debug")).eval()
    with torch.no_grad():
        for moe in m.moe_layers:
            moe.expert_bias_E.normal_(0, 0.05)  # a non-trivial bias must survive every format
    return m


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(1))


def test_ste_passes_gradients_through_fake_quantization():
    w = torch.randn(3, 8, 128, requires_grad=True)
    fq = fake_quantize_int4(w, 64)
    assert not torch.equal(fq, w) and fq.detach().unique().numel() < w.numel()  # it did quantize
    g = torch.randn_like(fq)
    fq.backward(g)
    assert torch.equal(w.grad, g)


def test_qat_touches_routed_experts_only(trained_like, tokens):
    m = trained_like
    with torch.no_grad():
        before = m(tokens).logits
    assert enable_qat(m, 64) == 3 and qat_enabled(m)
    with torch.no_grad():
        during = m(tokens).logits
    disable_qat(m)
    with torch.no_grad():
        after = m(tokens).logits
    assert not torch.allclose(before, during, atol=1e-4)
    assert torch.equal(before, after)  # master weights untouched
    # gradients reach the expert master weights through the fake quantizer
    enable_qat(m, 64)
    m.zero_grad()
    m(tokens).logits.sum().backward()
    assert m.moe_layers[0].routed_experts.inner_experts.w1_EFD.grad.abs().sum() > 0
    disable_qat(m)
    m.zero_grad()


def test_int4_pack_round_trip():
    q = torch.randint(-8, 8, (4, 6, 64), dtype=torch.int8)
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 6, 32)
    assert torch.equal(unpack_int4(packed), q)


def test_int4_export_reload_reproduces_the_fake_quantized_forward(trained_like, tokens, tmp_path):
    m = trained_like
    enable_qat(m, 64)
    try:
        with torch.no_grad():
            ref = m(tokens)
        tensors, report = export_int4(m)
    finally:
        disable_qat(m)
    assert report["quantized_tensors"] == 9 and 0 < report["relative_rmse"] < 0.2
    assert report["expert_bytes_int4"] < report["expert_bytes_float"] / 6
    assert not any(k.endswith("w1_EFD") for k in tensors)  # no float copy of the experts
    loaded = load_int4(tensors, m.arch, kernel="dequant")  # exact: the fake-quantized weights in fp32
    with torch.no_grad():
        out = loaded(tokens)
    assert torch.allclose(out.logits, ref.logits, atol=1e-4)
    assert torch.allclose(out.mtp_logits, ref.mtp_logits, atol=1e-4)
    # and through a file, with the KV cache path, on the packed bf16 kernel (tests/conftest.py)
    save_int4(tmp_path / "m.safetensors", m)
    from_file = read_int4(tmp_path / "m.safetensors")
    assert from_file.moe_layers[0].routed_experts.inner_experts.kernel == "int4pack"
    with torch.no_grad():
        cache = from_file.new_cache(2, 16)
        step = [from_file(tokens[:, :8], cache=cache).logits] + [
            from_file(tokens[:, p : p + 1], cache=cache, start_pos=p).logits for p in range(8, 16)]
    assert torch.allclose(torch.cat(step, 1), ref.logits, atol=2e-3)  # bf16 activations in the experts


def test_hf_round_trip_is_exact(trained_like, tokens, tmp_path):
    m = trained_like
    hf = to_hf_state_dict(m)
    assert "model.layers.4.eh_proj.weight" in hf  # MTP = the layer after the last (4 main layers)
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in hf
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in hf
    save_hf(m, tmp_path)
    back = load_hf(tmp_path)
    sd, sd2 = m.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"


def test_transformers_deepseek_v3_gives_the_same_logits(trained_like, tokens, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_hf(trained_like, tmp_path)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        ours, theirs = trained_like(tokens).logits, hf(tokens).logits
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_model_info_cli_json_matches_the_paper():
    out = subprocess.run([FLASHOPS, "model", "info", "joyai-flash-48b-a3b", "--json"],
                         capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert abs(data["total_params"] / 48.9e9 - 1) < 0.01
    assert abs(data["active_params"] / 2.75e9 - 1) < 0.01
    assert abs(data["active_params_with_embeddings"] / 3.28e9 - 1) < 0.01
    bad = subprocess.run([FLASHOPS, "model", "info", "joyai-flash-huge"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "preset" in bad.stderr and "joyai-flash-debug" in bad.stderr
