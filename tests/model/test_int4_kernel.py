"""The INT4 experts' packed CPU matmul (flashops.model.cpu_kernels.int4_*) against the dequantized reference,
Int4Experts with either kernel against a per-expert float reference (experts with 0, 1 and several tokens),
and the measured kernel choice (both outcomes, timings injected)."""
import json

import pytest
import torch
import torch.nn.functional as F

from flashops.model import cpu_kernels
from flashops.model.export import Int4Experts
from flashops.model.qat import dequantize_int4, quantize_int4

needs_int4pack = pytest.mark.skipif(not cpu_kernels.int4pack_available(), reason="torch has no packed CPU INT4 kernel")


def _quantized(out_f, in_f, group, seed=0):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed)) * 0.05
    return quantize_int4(w, group)


def _bf16_bound(ref: torch.Tensor) -> float:
    """bf16 activations, bf16 scales and a bf16 output, fp32 accumulation: a few bf16 ulps of the largest output."""
    return 4 * 2 ** -8 * float(ref.abs().max()) + 1e-6


@needs_int4pack
@pytest.mark.parametrize("out_f,in_f,group", [(16, 64, 32), (48, 128, 64), (64, 256, 128), (32, 512, 256),
                                              (256, 128, 64)])
@pytest.mark.parametrize("rows", [0, 1, 5])
def test_packed_matmul_matches_the_dequantized_weight(out_f, in_f, group, rows):
    q, scales = _quantized(out_f, in_f, group, seed=out_f + in_f)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows))
    packed, scales_zeros = cpu_kernels.int4_pack(q, scales, group)
    assert packed.dtype == torch.uint8 and packed.shape == (out_f, in_f // 2)
    out = cpu_kernels.int4_mm(x, packed, scales_zeros, group)
    assert out.shape == (rows, out_f)
    # what the kernel computes: bf16 x times q * bf16 scale, accumulated in fp32, rounded to bf16
    w_bf16_scales = dequantize_int4(q, scales.bfloat16().float(), group)
    assert torch.equal(scales_zeros[..., 1], torch.zeros_like(scales_zeros[..., 1]))  # symmetric: zero 0
    ref = x.bfloat16().float() @ w_bf16_scales.t()
    exact = x @ dequantize_int4(q, scales, group).t()
    if rows:
        torch.testing.assert_close(out.float(), ref, rtol=0, atol=2 ** -8 * float(ref.abs().max()) + 1e-6)
        torch.testing.assert_close(out.float(), exact, rtol=0, atol=_bf16_bound(exact))


def test_shapes_the_packed_kernel_rejects_are_named():
    q, scales = _quantized(24, 64, 16)
    assert not cpu_kernels.int4pack_fits(24, 64, 32) and not cpu_kernels.int4pack_fits(32, 64, 16)
    with pytest.raises(ValueError, match=r"\(24, 64\) with group size 16 .*FLASHOPS_CPU_INT4=dequant"):
        cpu_kernels.int4_pack(q, scales, 16)


def _experts(kernel, num_experts=6, dim=128, hidden=64, group=32):
    experts = Int4Experts(num_experts, dim, hidden, group, kernel=kernel)
    weights = []
    for e in range(num_experts):
        ws = [_quantized(hidden, dim, group, 3 * e), _quantized(dim, hidden, group, 3 * e + 1),
              _quantized(hidden, dim, group, 3 * e + 2)]
        experts.set_expert(e, *ws)
        weights.append([dequantize_int4(q, s, group) for q, s in ws])
    return experts, weights


@pytest.mark.parametrize("kernel", [pytest.param("int4pack", marks=needs_int4pack), "dequant"])
@pytest.mark.parametrize("counts", [[0, 1, 3, 0, 5, 1], [1, 0, 0, 0, 0, 0], [0] * 6])
def test_int4_experts_match_the_float_experts(kernel, counts):
    experts, weights = _experts(kernel)
    x = torch.randn(sum(counts), 128, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = experts(x, torch.tensor(counts))
    ref, start = [], 0
    for (w1, w2, w3), n in zip(weights, counts):
        rows = x[start:start + n]
        ref.append((F.silu(rows @ w1.t()) * (rows @ w3.t())) @ w2.t())
        start += n
    ref = torch.cat(ref)
    assert out.shape == ref.shape and out.dtype == x.dtype
    if kernel == "int4pack":  # serving.backend.place casts every float buffer (here to fp32): same result
        for name, buf in experts.named_buffers():
            if buf.is_floating_point():
                buf.data = buf.data.float()
        with torch.inference_mode():
            assert torch.equal(experts(x, torch.tensor(counts)), out)
    if kernel == "dequant":
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    elif ref.numel():
        torch.testing.assert_close(out, ref, rtol=0, atol=_bf16_bound(ref))
        assert not torch.equal(out, ref)  # it did run in bf16


def test_int4_experts_keep_only_packed_weights_and_check_shapes():
    experts, _ = _experts("dequant", num_experts=2)
    assert {b.dtype for b in experts.buffers()} == {torch.uint8, torch.float32}
    assert experts.state_dict() == {}  # filled by set_expert from any file format, not by load_state_dict
    q, s = _quantized(64, 128, 32)
    with pytest.raises(ValueError, match=r"expert 1 w2_EDF: q \(64, 128\).*expected \(128, 64\)"):
        experts.set_expert(1, (q, s), (q, s), (q, s))
    with pytest.raises(ValueError, match="kernel='fast'"):
        Int4Experts(2, 128, 64, 32, kernel="fast")


def test_the_kernel_falls_back_where_the_packed_one_does_not_apply(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_int4_choice", cpu_kernels.Int4Choice("int4pack", "test"))
    assert Int4Experts.kernel_for("cpu", 128, 64, 32) == "int4pack"
    assert Int4Experts.kernel_for("cpu", 128, 64, 16) == "dequant"  # group size the kernel lacks
    assert Int4Experts.kernel_for("cpu", 128, 40, 8) == "dequant"  # hidden not a multiple of 16
    assert Int4Experts.kernel_for("meta", 128, 64, 32) == "dequant"  # not a CPU
    monkeypatch.setattr(cpu_kernels, "_int4_choice", cpu_kernels.Int4Choice("dequant", "test"))
    assert Int4Experts.kernel_for("cpu", 128, 64, 32) == "dequant"


@needs_int4pack
@pytest.mark.parametrize("times,want", [((1e-5, 4e-5), "int4pack"), ((9e-5, 4e-5), "dequant")])
def test_int4_kernel_is_chosen_by_measurement_and_cached_per_cpu_model(tmp_path, times, want):
    cache, calls = tmp_path / "cpu_kernels.json", []

    def measure():
        calls.append(1)
        return {"int4.int4pack": times[0], "int4.dequant": times[1]}

    first = cpu_kernels.decide_int4(measure, setting="auto", cpu="Some CPU 9000", path=cache)
    assert (first.kernel, first.source) == (want, "measured") and "Some CPU 9000" in first.describe()
    again = cpu_kernels.decide_int4(measure, setting="auto", cpu="Some CPU 9000", path=cache)
    assert (again.kernel, again.source, len(calls)) == (want, "cached", 1)
    other = cpu_kernels.decide_int4(measure, setting="auto", cpu="Other CPU", path=cache)
    assert other.source == "measured" and len(calls) == 2
    assert any(k.startswith("int4 | Some CPU 9000") for k in json.loads(cache.read_text()))


@needs_int4pack
def test_int4_override_skips_the_measurement_and_a_bad_value_warns(tmp_path, monkeypatch):
    def measure():
        raise AssertionError("measured despite the override")

    forced = cpu_kernels.decide_int4(measure, setting="dequant", cpu="X", path=tmp_path / "c.json")
    assert (forced.kernel, forced.source) == ("dequant", "FLASHOPS_CPU_INT4=dequant")
    monkeypatch.setenv("FLASHOPS_CPU_INT4", "fastest")
    with pytest.warns(UserWarning, match="FLASHOPS_CPU_INT4='fastest'.*FLASHOPS_CPU_INT4=dequant"):
        assert cpu_kernels.int4_setting() == "auto"


@needs_int4pack
def test_the_real_int4_measurement_is_short_and_complete():
    timings = cpu_kernels.measure_int4_kernels(rounds=2, budget_s=0.05)
    assert set(timings) == {"int4.int4pack", "int4.dequant"} and all(t > 0 for t in timings.values())
