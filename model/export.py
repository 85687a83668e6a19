"""INT4 export of the routed experts (W4, round to nearest, fp32 group scales) and a loader that runs them
packed. Everything else stays floating point.

    from flashops.model.export import export_int4, load_int4, save_int4, read_int4
    tensors, report = export_int4(model)          # report: per-tensor and overall quantization error
    save_int4("model-int4.safetensors", model)    # tensors + config in one file
    model = read_int4("model-int4.safetensors")   # a JoyAIFlash whose experts keep packed INT4 weights

Packed layout per expert weight `<prefix>.w1_EFD` (E, out, in): `<prefix>.w1_EFD.qweight` uint8 (E, out, in/2),
two values per byte (low nibble first, stored as q + 8), and `<prefix>.w1_EFD.scales` fp32 (E, out, in/group).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from flashops.model.config import JoyAIConfig
from flashops.model.qat import dequantize_int4, quantize_int4

EXPERT_WEIGHTS = ("w1_EFD", "w2_EDF", "w3_EFD")
FORMAT = "flashops-int4-v1"


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    low = (packed & 0x0F).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack([low, high], dim=-1).flatten(-2)


def _is_expert_weight(name: str) -> bool:
    return ".routed_experts.inner_experts." in name and name.rsplit(".", 1)[-1] in EXPERT_WEIGHTS


def export_int4(model, group_size: int | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """State dict with routed expert weights as packed INT4 + fp32 scales; report of the rounding error."""
    group_size = group_size or getattr(model, "qat_group_size", None) or model.arch.qat_group_size
    tensors: dict[str, torch.Tensor] = {}
    per_tensor = {}
    err_sq = ref_sq = 0.0
    float_bytes = packed_bytes = 0
    for name, value in model.state_dict().items():
        value = value.detach()
        if not _is_expert_weight(name):
            tensors[name] = value.contiguous()
            continue
        q, scales = quantize_int4(value, group_size)
        deq = dequantize_int4(q, scales, group_size)
        diff = (deq - value.float()).pow(2).sum().item()
        ref = value.float().pow(2).sum().item()
        err_sq, ref_sq = err_sq + diff, ref_sq + ref
        per_tensor[name] = {"relative_rmse": (diff / max(ref, 1e-30)) ** 0.5,
                            "max_abs_error": (deq - value.float()).abs().max().item()}
        tensors[f"{name}.qweight"] = pack_int4(q).contiguous()
        tensors[f"{name}.scales"] = scales.contiguous()
        float_bytes += value.numel() * value.element_size()
        packed_bytes += tensors[f"{name}.qweight"].numel() + scales.numel() * 4
    report = {
        "format": FORMAT,
        "group_size": group_size,
        "quantized_tensors": len(per_tensor),
        "relative_rmse": (err_sq / max(ref_sq, 1e-30)) ** 0.5,
        "max_abs_error": max((v["max_abs_error"] for v in per_tensor.values()), default=0.0),
        "expert_bytes_float": float_bytes,
        "expert_bytes_int4": packed_bytes,
        "per_tensor": per_tensor,
    }
    return tensors, report


class Int4Experts(nn.Module):
    """Routed experts with packed INT4 weights. Only the experts that received tokens are dequantized,
    group by group, right before their matmul; the float weights are never kept."""

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, group_size: int):
        super().__init__()
        self.num_experts, self.group_size = num_experts, group_size
        shapes = {"w1_EFD": (hidden_dim, dim), "w2_EDF": (dim, hidden_dim), "w3_EFD": (hidden_dim, dim)}
        for name, (rows, cols) in shapes.items():
            self.register_buffer(f"{name}_qweight", torch.zeros(num_experts, rows, cols // 2, dtype=torch.uint8))
            self.register_buffer(f"{name}_scales", torch.zeros(num_experts, rows, cols // group_size))

    def _weight(self, name: str, expert: int, dtype) -> torch.Tensor:
        q = unpack_int4(getattr(self, f"{name}_qweight")[expert])
        return dequantize_int4(q, getattr(self, f"{name}_scales")[expert], self.group_size).to(dtype)

    def forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        out = x_RD.new_empty(x_RD.shape[0], x_RD.shape[1])
        start = 0
        for expert, count in enumerate(num_tokens_per_expert_E.tolist()):
            if count == 0:
                continue
            x = x_RD[start:start + count]
            h = torch.nn.functional.silu(x @ self._weight("w1_EFD", expert, x.dtype).T)
            h = h * (x @ self._weight("w3_EFD", expert, x.dtype).T)
            out[start:start + count] = h @ self._weight("w2_EDF", expert, x.dtype).T
            start += count
        return out[:start]


def load_int4(tensors: dict[str, torch.Tensor], config: JoyAIConfig, group_size: int | None = None,
              device: str | torch.device = "cpu"):
    """A JoyAIFlash that runs the exported tensors, experts kept packed (see Int4Experts)."""
    from flashops.model.model import JoyAIFlash

    quantized = {n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")}
    if not quantized:
        raise ValueError("no '*.qweight' tensors: this is not an export_int4() state dict")
    first = next(iter(quantized))
    if group_size is None:
        cols = tensors[first + ".qweight"].shape[-1] * 2
        group_size = cols // tensors[first + ".scales"].shape[-1]
    with torch.device("meta"):
        model = JoyAIFlash(config)
    for moe in model.moe_layers:
        inner = moe.routed_experts.inner_experts
        moe.routed_experts.inner_experts = Int4Experts(
            inner.num_experts, config.dim, config.moe_hidden_dim, group_size)
    model.to_empty(device=device)
    for module in model.modules():  # RoPE tables and MoE counters are not in the state dict
        init_buffers = getattr(module, "_init_self_buffers", None)
        if callable(init_buffers):
            init_buffers(buffer_device=torch.device(device))
    state = {}
    for name, value in tensors.items():
        for suffix in (".qweight", ".scales"):
            if name.endswith(suffix) and name[: -len(suffix)] in quantized:
                name = name[: -len(suffix)] + "_" + suffix[1:]
        state[name] = value
    model.load_state_dict(state, strict=True)
    model.qat_group_size = group_size
    return model.eval()


def save_int4(path: str | Path, model, group_size: int | None = None) -> dict:
    """export_int4 + safetensors file holding the config and the report in its metadata."""
    from safetensors.torch import save_file

    tensors, report = export_int4(model, group_size)
    summary = {k: v for k, v in report.items() if k != "per_tensor"}
    save_file(tensors, str(path), metadata={"format": FORMAT, "config": json.dumps(model.arch.to_dict()),
                                            "report": json.dumps(summary)})
    return report


def read_int4(path: str | Path, device: str | torch.device = "cpu"):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}; write it with save_int4()")
    config = JoyAIConfig.from_dict(json.loads(meta["config"]))
    return load_int4(load_file(str(path)), config, device=device)
