"""The CPU training kernels in flashops.model.cpu_kernels (oneDNN linears, grouped expert matmuls and the
MLA attention) against torch's reference ops: same values and gradients, and the model trains the same way
with them switched off; and the choice between them, made by measurement (both outcomes, timings injected)."""
import json
import time

import pytest
import torch
import torch.nn.functional as F

from flashops.model import JoyAIFlash, get_config
from flashops.model import cpu_kernels as compat  # the kernels; grouped_mm's dispatch is in torchtitan_compat
from flashops.model import torchtitan_compat
from flashops.model.cpu_kernels import KernelChoice

OURS = KernelChoice("onednn", "mla-onednn", "test")
TORCHS = KernelChoice("aten", "sdpa", "test")


@pytest.fixture(autouse=True)
def onednn_for_every_size(monkeypatch):
    """These tests use small shapes; take the oneDNN path for them too, whatever this machine measured."""
    monkeypatch.setattr(compat, "ONEDNN_MIN_MACS", 0)
    monkeypatch.setattr(compat, "_choice", OURS)


def test_decode_sized_matmuls_stay_on_torchs_kernel(monkeypatch):
    """Below ONEDNN_MIN_MACS (batch-1 decoding) oneDNN's call overhead loses; those calls must not reach it."""
    monkeypatch.setattr(compat, "ONEDNN_MIN_MACS", 1 << 20)
    calls = []
    monkeypatch.setattr(compat, "_mm", lambda x, w: calls.append(x.shape) or F.linear(x, w))
    w = torch.randn(384, 128)
    compat.linear(torch.randn(1, 128), w)  # 49K multiply-adds
    assert calls == []
    compat.linear(torch.randn(64, 128), w)  # 3.1M
    assert calls == [(64, 128)]


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(out.dtype)
    out.backward(grad_out)
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("shape", [(37, 48), (2, 19, 48)])
def test_onednn_linear_matches_f_linear(shape):
    torch.manual_seed(0)
    x, w, b = torch.randn(shape), torch.randn(80, 48), torch.randn(80)
    out, grads = _grads(compat.linear, x, w, b)
    ref, ref_grads = _grads(F.linear, x, w, b)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)
    # a transposed (non-contiguous) input gives the same as its contiguous copy
    xt = torch.randn(48, 37).t()
    torch.testing.assert_close(compat.linear(xt, w), F.linear(xt.contiguous(), w), rtol=1e-5, atol=1e-5)


def test_onednn_path_is_only_taken_for_plain_fp32_cpu_tensors():
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    assert compat.onednn_applies(x, w)
    assert not compat.onednn_applies(x.double(), w.double())
    assert not compat.onednn_applies(x.bfloat16(), w.bfloat16())


def test_grouped_linear_matches_torch_grouped_mm_with_an_empty_expert():
    torch.manual_seed(0)
    counts = torch.tensor([5, 0, 9, 2])  # expert 1 gets no tokens
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    x, w_t = torch.randn(16, 24), torch.randn(4, 24, 40)  # (E, in, out), as GroupedExperts passes it
    out, grads = _grads(lambda a, b: torchtitan_compat.grouped_mm(a, b, offs), x, w_t)
    ref, ref_grads = _grads(lambda a, b: torch._grouped_mm(a, b, offs=offs), x, w_t)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-4)
    assert torch.all(grads[1][1] == 0)  # the idle expert's weights get a zero gradient


def _reference_mla(q_nope, q_pe, k_nope, k_pe, v, *, mask, is_causal, scale):
    heads = q_nope.shape[2]
    q = torch.cat([q_nope, q_pe], -1).transpose(1, 2)
    k = torch.cat([k_nope, k_pe.expand(-1, -1, heads, -1)], -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v.transpose(1, 2), attn_mask=mask, is_causal=is_causal, scale=scale)
    return out.transpose(1, 2)


def _packed_docs_mask(lengths, batch):
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).expand(batch, -1)
    causal = torch.ones(doc.shape[1], doc.shape[1], dtype=torch.bool).tril()
    return ((doc.unsqueeze(2) == doc.unsqueeze(1)) & causal).unsqueeze(1)


@pytest.mark.parametrize("kernel", ["mla-onednn", "batched"])
@pytest.mark.parametrize("case", ["causal", "packed documents", "queries after a prefix"])
def test_mla_attention_matches_sdpa_values_and_gradients(case, kernel, monkeypatch):
    monkeypatch.setattr(compat, "_choice", KernelChoice("onednn", kernel, "test"))
    torch.manual_seed(0)
    bsz, heads, q_len, kv_len = 2, 3, 24, 24
    mask, is_causal = None, True
    if case == "packed documents":
        mask, is_causal = _packed_docs_mask([9, 15], bsz), False
    elif case == "queries after a prefix":  # 8 new queries attending to 16 cached positions and themselves
        q_len, kv_len, is_causal = 8, 24, False
        mask = torch.arange(kv_len).unsqueeze(0) <= torch.arange(16, 24).unsqueeze(1)
    inputs = [torch.randn(bsz, q_len, heads, 16), torch.randn(bsz, q_len, heads, 8),
              torch.randn(bsz, kv_len, heads, 16), torch.randn(bsz, kv_len, 1, 8), torch.randn(bsz, kv_len, heads, 12)]
    kwargs = dict(mask=mask, is_causal=is_causal, scale=0.3)
    out, grads = _grads(lambda *t: compat.mla_attention(*t, **kwargs), *inputs)
    ref, ref_grads = _grads(lambda *t: _reference_mla(*t, **kwargs), *[t.double() for t in inputs])
    torch.testing.assert_close(out, ref.float(), rtol=1e-5, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["mla-onednn", "batched"])
def test_the_model_learns_the_same_with_the_cpu_kernels_off(monkeypatch, attention):
    """One training step of joyai-flash-debug with the oneDNN kernels and with torch's own ops (what
    FLASHOPS_CPU_MATMUL=aten selects): same loss, same gradients."""
    torch.manual_seed(0)
    model = JoyAIFlash(get_config("joyai-flash-debug")).train()
    tokens = torch.randint(0, model.arch.vocab_size, (2, 33), generator=torch.Generator().manual_seed(3))

    def step():
        model.zero_grad(set_to_none=True)
        out = model(tokens[:, :-1])
        loss = F.cross_entropy(out.logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss = loss + 0.1 * F.cross_entropy(out.mtp_logits[:, 1:].flatten(0, 1), tokens[:, 2:].flatten())
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    monkeypatch.setattr(compat, "_choice", KernelChoice("onednn", attention, "test"))
    assert compat.mla_attention_applies(torch.zeros(2, 32, 4, 8, requires_grad=True), 32)
    loss_fast, grads_fast = step()
    monkeypatch.setattr(compat, "_choice", TORCHS)
    loss_ref, grads_ref = step()
    torch.testing.assert_close(loss_fast, loss_ref, rtol=1e-5, atol=1e-5)
    assert grads_fast.keys() == grads_ref.keys() and len(grads_fast) > 20
    for name in grads_ref:
        torch.testing.assert_close(grads_fast[name], grads_ref[name], rtol=1e-3, atol=1e-5, msg=name)


def test_linears_keep_their_names_and_state_dict():
    model = JoyAIFlash(get_config("joyai-flash-debug"))
    wkv_b = model.layers["0"].attention.wkv_b
    assert type(wkv_b).__name__ == "Linear" and isinstance(wkv_b, torch.nn.Linear) and type(wkv_b)._onednn_linear
    fresh = JoyAIFlash(get_config("joyai-flash-debug"))
    fresh.load_state_dict(model.state_dict())  # same keys, same shapes


def test_cpu_matmul_setting_names_a_bad_value_and_the_fix(monkeypatch):
    # issue 13 item 6 changes the default from "onednn" to "auto" (measure): a bad value now means auto
    monkeypatch.setenv("FLASHOPS_CPU_MATMUL", "mkl")
    with pytest.warns(UserWarning, match=r"FLASHOPS_CPU_MATMUL='mkl' is not one of 'onednn', 'aten'.*=aten"):
        assert compat.matmul_setting() == "auto"
    monkeypatch.setenv("FLASHOPS_CPU_MATMUL", "aten")
    assert compat.matmul_setting() == "aten"


def _timings(onednn, aten, mla, mla_onednn, sdpa, batched=1.0):
    calls = []

    def matmul():
        calls.append("matmul")
        return {"matmul.onednn": onednn, "matmul.aten": aten}

    def attention(include_onednn=True):
        calls.append("attention" if include_onednn else "attention without oneDNN")
        times = {"attention.mla": mla, "attention.mla-onednn": mla_onednn, "attention.batched": batched,
                 "attention.sdpa": sdpa}
        if not include_onednn:
            del times["attention.mla-onednn"]
        return times

    return matmul, attention, calls


@pytest.mark.parametrize("times, want", [
    ((0.5, 1.0, 0.3, 0.2, 0.4), ("onednn", "mla-onednn")),  # AMD EPYC: MKL on its AVX2 path, oneDNN 2x
    ((1.0, 0.85, 0.5, 0.6, 0.4), ("aten", "sdpa")),  # Intel Xeon, small heads: MKL 1.18x oneDNN, fused SDPA ahead
    ((1.0, 0.9, 0.5, 0.6, 0.4, 0.3), ("aten", "batched")),  # Intel Xeon, full-size heads: batched 1.2-1.6x SDPA
    ((1.0, 0.9, 0.5, 0.1, 0.4), ("aten", "sdpa")),  # the oneDNN loop is not timed where oneDNN's matmul lost
    ((0.5, 1.0, 0.1, 0.5, 0.4), ("onednn", "mla")),  # each choice on its own measurement
])
def test_kernels_are_chosen_by_measurement_and_cached_per_cpu_model(tmp_path, times, want):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    cache = tmp_path / "cpu_kernels.json"
    matmul, attention, calls = _timings(*times)
    first = compat.decide(matmul, attention, setting="auto", cpu="Some CPU 9000", path=cache)
    assert (first.matmul, first.attention, first.source) == (*want, "measured")
    assert calls == ["matmul", "attention" if want[0] == "onednn" else "attention without oneDNN"]
    # the same CPU model reads the cache (no timing); another CPU model measures for itself
    again = compat.decide(matmul, attention, setting="auto", cpu="Some CPU 9000", path=cache)
    assert (again.matmul, again.attention, again.source) == (*want, "cached") and len(calls) == 2
    other = compat.decide(*_timings(1.0, 0.5, 0.1, 0.2, 0.3)[:2], setting="auto", cpu="Other CPU", path=cache)
    assert (other.matmul, other.attention, other.source) == ("aten", "mla", "measured")
    assert len(json.loads(cache.read_text())) == 2
    assert "Some CPU 9000" in first.describe() and want[0] in first.describe()


def test_the_override_skips_the_measurement_and_a_broken_cache_is_remeasured(tmp_path):
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    matmul, attention, calls = _timings(0.5, 1.0, 0.2, 0.3, 0.4)
    cache = tmp_path / "cpu_kernels.json"
    forced = compat.decide(matmul, attention, setting="aten", cpu="X", path=cache)
    assert (forced.matmul, forced.attention, forced.source) == ("aten", "sdpa", "FLASHOPS_CPU_MATMUL=aten")
    forced = compat.decide(matmul, attention, setting="onednn", cpu="X", path=cache)
    assert (forced.matmul, forced.attention) == ("onednn", "mla-onednn") and calls == [] and not cache.exists()
    # the attention kernel has its own override, on top of either matmul route
    both = compat.decide(matmul, attention, setting="onednn", cpu="X", path=cache, attention="mla")
    assert (both.matmul, both.attention) == ("onednn", "mla") and "FLASHOPS_CPU_ATTENTION=mla" in both.source
    cache.write_text("{not json")
    assert compat.decide(matmul, attention, setting="auto", cpu="X", path=cache).source == "measured"
    assert json.loads(cache.read_text())  # rewritten


def test_the_chosen_kernels_are_the_ones_that_run(monkeypatch):
    calls = []
    monkeypatch.setattr(compat, "_mm", lambda x, w: calls.append(x.shape) or F.linear(x, w))
    monkeypatch.setattr(compat, "_choice", TORCHS)
    q = torch.zeros(2, 32, 4, 8, requires_grad=True)
    compat.linear(torch.randn(64, 128), torch.randn(384, 128))
    assert calls == [] and not compat.mla_attention_applies(q, 32)
    monkeypatch.setattr(compat, "_choice", OURS)
    compat.linear(torch.randn(64, 128), torch.randn(384, 128))
    assert calls == [(64, 128)] and compat.mla_attention_applies(q, 32)


@pytest.mark.slow
def test_the_real_measurement_is_short_and_complete(tmp_path):
    """What runs at first use on a machine without a cached choice: well under a second here."""
    if not torch.backends.mkldnn.is_available():
        pytest.skip("no oneDNN in this torch build")
    t0 = time.perf_counter()
    choice = compat.decide(setting="auto", cpu="this machine", path=tmp_path / "k.json")
    elapsed = time.perf_counter() - t0
    attention = {"attention.mla", "attention.batched", "attention.sdpa"}
    if choice.matmul == "onednn":  # the oneDNN per-head loop is timed only where oneDNN's matmul won
        attention.add("attention.mla-onednn")
    assert set(choice.timings) == {"matmul.onednn", "matmul.aten"} | attention
    assert all(t > 0 for t in choice.timings.values()) and choice.source == "measured"
    assert elapsed < 10  # ~0.5 s on an idle 2-core machine; a machine shared with ~8 jobs stretches it
