"""INT4 quantization-aware training for the routed experts only (attention, shared expert, dense layers,
router, MTP and lm_head stay floating point). Symmetric INT4, fp32 scales per group of `group_size`
input features, straight-through estimator; master weights stay high precision. Built on torchao's
qparams (`get_group_qparams_symmetric`). We do not call torchao's IntxFakeQuantizer itself: its
scale is not detached, so gradients also flow through the per-group max (not a pure STE). Fake quant
here is w + (dequant(quant(w)) - w).detach(): forward sees exactly what export.py writes, backward is
the identity.

    from flashops.model.qat import enable_qat, disable_qat
    enable_qat(model, group_size=64)   # e.g. from the SFT stage on
    disable_qat(model)
"""
from __future__ import annotations

from functools import partial

import torch
from torchao.quantization.utils import get_group_qparams_symmetric

INT4_MIN, INT4_MAX = -8, 7


def _routed_experts(model):
    from flashops.model.model import JoyAIExperts

    return [m for m in model.modules() if isinstance(m, JoyAIExperts)]


def fake_quantize_int4(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Quantize-dequantize along the last dim in groups (fp32 math); gradients pass straight through."""
    q, scale = quantize_int4(weight, group_size)
    return weight + (dequantize_int4(q, scale, group_size).to(weight.dtype) - weight).detach()


def quantize_int4(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round to nearest with torchao's symmetric qparams: (int8 values in [-8, 7], fp32 scales (..., K/g))."""
    shape = weight.shape
    w = weight.detach().reshape(-1, shape[-1]).float()
    scale, _ = get_group_qparams_symmetric(w, n_bit=4, groupsize=group_size, precision=torch.float32)
    q = torch.clamp(torch.round(w.view(w.shape[0], -1, group_size) / scale.unsqueeze(-1)), INT4_MIN, INT4_MAX)
    return q.to(torch.int8).reshape(shape), scale.reshape(*shape[:-1], -1)


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> torch.Tensor:
    grouped = q.float().reshape(*q.shape[:-1], -1, group_size) * scale.unsqueeze(-1)
    return grouped.reshape(q.shape)


def enable_qat(model, group_size: int | None = None) -> int:
    """Fake-quantize every routed expert's weights in forward. Returns how many expert modules it touched."""
    group_size = group_size or model.arch.qat_group_size
    experts = _routed_experts(model)
    for e in experts:
        for name, w in (("w1_EFD", e.w1_EFD), ("w2_EDF", e.w2_EDF), ("w3_EFD", e.w3_EFD)):
            if w.shape[-1] % group_size:
                raise ValueError(f"qat group_size={group_size} must divide {name}'s input dim {w.shape[-1]}; "
                                 f"pick a divisor such as 32 or 64")
        e.fake_quant = partial(fake_quantize_int4, group_size=group_size)
    model.qat_group_size = group_size
    return len(experts)


def disable_qat(model) -> None:
    for e in _routed_experts(model):
        e.fake_quant = None
    model.qat_group_size = None


def qat_enabled(model) -> bool:
    return any(e.fake_quant is not None for e in _routed_experts(model))
