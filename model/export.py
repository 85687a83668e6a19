"""The serving export and its INT4 routed experts.

The export (`write_export`, streamed tensor by tensor; flashops.trainers.runner.export_model drives it from a
checkpoint) is a Hugging Face DeepSeek-V3 folder that transformers, vLLM and SGLang load, and the flashops
runtime reads back (`load_export`):

    config.json                        transformers' DeepseekV3Config (architectures DeepseekV3ForCausalLM,
                                       num_nextn_predict_layers) + "flashops": the exact JoyAIConfig
    model-00001-of-0000N.safetensors   weights in HF names (flashops.model.hf), files of at most max_file_bytes
    model.safetensors.index.json       {"metadata": {"total_size": ...}, "weight_map": {name: file}}
    tokenizer.json, tokenizer_config.json
    int4/                              (QAT, or asked for) the same, routed experts as compressed-tensors
                                       "pack-quantized" symmetric INT4: per expert `...experts.{i}.gate_proj.`
                                       weight_packed (int32, 8 values a word, stored as q + 8, low bits first),
                                       weight_scale (fp32, one per group of the input dim), weight_shape;
                                       int4/config.json has the quantization_config (group size, ignore list)

The MTP layer is the layer after the last (index num_hidden_layers) with enorm, hnorm, eh_proj,
shared_head.norm, and its own copies of the embedding (embed_tokens) and head (shared_head.head).

In memory, INT4 routed experts (Int4Experts) keep packed uint8 (two values a byte, low nibble first, q + 8)
and fp32 scales (E, out, in/group); they are dequantized per expert right before the matmul.
The in-memory helpers below remain for tests and benchmarks:

    from flashops.model.export import export_int4, load_int4, save_int4, read_int4
    tensors, report = export_int4(model)          # report: per-tensor and overall quantization error
    save_int4("model-int4.safetensors", model)    # tensors + config in one file
    model = read_int4("model-int4.safetensors")   # a JoyAIFlash whose experts run packed INT4 (Int4Experts)

Packed layout per expert weight `<prefix>.w1_EFD` (E, out, in): `<prefix>.w1_EFD.qweight` uint8 (E, out, in/2),
two values per byte (low nibble first, stored as q + 8), and `<prefix>.w1_EFD.scales` fp32 (E, out, in/group).
"""
from __future__ import annotations

import json
import struct
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from flashops.api.pipeline import INT4_DIR  # where the INT4 folder goes is part of the export rule
from flashops.model import cpu_kernels
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
    """Routed experts with symmetric INT4 weights, kept packed for the matmul (the float weights are never
    kept). Fed one expert at a time by `set_expert` with the integer values in [-8, 7] and the fp32 scales per
    group, whatever file they come from. Two kernels (cpu_kernels.int4_kernel(), measured per CPU):

    - "int4pack": torch's packed CPU INT4 matmul; w1 and w3 fused into one (2 hidden, dim) weight, so an
      expert is two kernel calls. Computes in bf16 (see cpu_kernels); the SiLU gate runs in fp32.
    - "dequant": the experts that received tokens are dequantized group by group right before their matmul,
      in the activations' dtype (exact against the fake-quantized model); any device, any group size.
    """

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, group_size: int, kernel: str | None = None,
                 device: str | torch.device | None = None):
        super().__init__()
        device = torch.device(device) if device is not None else torch.empty(0).device
        self.num_experts, self.dim, self.hidden_dim, self.group_size = num_experts, dim, hidden_dim, group_size
        self.kernel = kernel or self.kernel_for(device, dim, hidden_dim, group_size)
        if self.kernel not in cpu_kernels.INT4_KERNELS:
            raise ValueError(f"kernel={self.kernel!r}: use one of {', '.join(cpu_kernels.INT4_KERNELS)}")
        buffers = {}
        if self.kernel == "int4pack":
            buffers["w13_packed"] = ((num_experts, 2 * hidden_dim, dim // 2), torch.uint8)
            buffers["w13_scales_zeros"] = ((num_experts, dim // group_size, 2 * hidden_dim, 2), torch.bfloat16)
            buffers["w2_packed"] = ((num_experts, dim, hidden_dim // 2), torch.uint8)
            buffers["w2_scales_zeros"] = ((num_experts, hidden_dim // group_size, dim, 2), torch.bfloat16)
        else:
            for name, (rows, cols) in self._shapes().items():
                buffers[f"{name}_qweight"] = ((num_experts, rows, cols // 2), torch.uint8)  # export layout
                buffers[f"{name}_scales"] = ((num_experts, rows, cols // group_size), torch.float32)
        for name, (shape, dtype) in buffers.items():  # filled by set_expert, not by load_state_dict
            self.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @staticmethod
    def kernel_for(device: torch.device | str, dim: int, hidden_dim: int, group_size: int) -> str:
        """The measured CPU choice where the packed kernel takes these shapes, else "dequant"."""
        fits = (cpu_kernels.int4pack_fits(2 * hidden_dim, dim, group_size)
                and cpu_kernels.int4pack_fits(dim, hidden_dim, group_size))
        if torch.device(device).type != "cpu" or not fits:
            return "dequant"
        return cpu_kernels.int4_kernel().kernel

    def _shapes(self) -> dict[str, tuple[int, int]]:
        return {"w1_EFD": (self.hidden_dim, self.dim), "w2_EDF": (self.dim, self.hidden_dim),
                "w3_EFD": (self.hidden_dim, self.dim)}

    @torch.no_grad()
    def set_expert(self, expert: int, w1: tuple[torch.Tensor, torch.Tensor], w2: tuple[torch.Tensor, torch.Tensor],
                   w3: tuple[torch.Tensor, torch.Tensor]) -> None:
        """One expert's three weights, each (q, scales): q integers in [-8, 7] of shape (out, in), scales
        (out, in/group_size); weight = q * scale per group of group_size inputs."""
        given = {"w1_EFD": w1, "w2_EDF": w2, "w3_EFD": w3}
        for name, (rows, cols) in self._shapes().items():
            q, scales = given[name]
            if tuple(q.shape) != (rows, cols) or tuple(scales.shape) != (rows, cols // self.group_size):
                raise ValueError(f"expert {expert} {name}: q {tuple(q.shape)} and scales {tuple(scales.shape)}; "
                                 f"expected ({rows}, {cols}) and ({rows}, {cols // self.group_size})")
        if self.kernel == "int4pack":
            (q1, s1), (q2, s2), (q3, s3) = w1, w2, w3
            packed, sz = cpu_kernels.int4_pack(torch.cat([q1, q3]).cpu(), torch.cat([s1, s3]).cpu().float(),
                                               self.group_size)
            self.w13_packed[expert].copy_(packed)
            self.w13_scales_zeros[expert].copy_(sz)
            packed, sz = cpu_kernels.int4_pack(q2.cpu(), s2.cpu().float(), self.group_size)
            self.w2_packed[expert].copy_(packed)
            self.w2_scales_zeros[expert].copy_(sz)
        else:
            for name, (q, scales) in given.items():
                getattr(self, f"{name}_qweight")[expert].copy_(pack_int4(q))
                getattr(self, f"{name}_scales")[expert].copy_(scales)

    def _weight(self, name: str, expert: int, dtype) -> torch.Tensor:
        q = unpack_int4(getattr(self, f"{name}_qweight")[expert])
        return dequantize_int4(q, getattr(self, f"{name}_scales")[expert], self.group_size).to(dtype)

    def _expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int4pack":
            g = self.group_size
            gate, up = cpu_kernels.int4_mm(x, self.w13_packed[expert], self.w13_scales_zeros[expert], g).float().chunk(2, -1)
            return cpu_kernels.int4_mm(F.silu(gate) * up, self.w2_packed[expert], self.w2_scales_zeros[expert], g)
        h = F.silu(x @ self._weight("w1_EFD", expert, x.dtype).T) * (x @ self._weight("w3_EFD", expert, x.dtype).T)
        return h @ self._weight("w2_EDF", expert, x.dtype).T

    def forward(self, x_RD: torch.Tensor, num_tokens_per_expert_E: torch.Tensor) -> torch.Tensor:
        counts = num_tokens_per_expert_E.tolist()
        out = x_RD.new_empty(sum(counts), x_RD.shape[1])
        x = x_RD.to(torch.bfloat16) if self.kernel == "int4pack" else x_RD  # one cast for all experts
        start = 0
        for expert, count in enumerate(counts):
            if count:
                out[start:start + count] = self._expert(expert, x[start:start + count])
                start += count
        return out


def load_int4(tensors: dict[str, torch.Tensor], config: JoyAIConfig, group_size: int | None = None,
              device: str | torch.device = "cpu", kernel: str | None = None):
    """A JoyAIFlash that runs the exported tensors, experts kept packed (see Int4Experts; `kernel` overrides
    the measured choice)."""
    from flashops.model.model import JoyAIFlash

    quantized = {n[: -len(".qweight")] for n in tensors if n.endswith(".qweight")}
    if not quantized:
        raise ValueError("no '*.qweight' tensors: this is not an export_int4() state dict")
    first = next(iter(quantized))
    if group_size is None:
        cols = tensors[first + ".qweight"].shape[-1] * 2
        group_size = cols // tensors[first + ".scales"].shape[-1]
    kernel = kernel or Int4Experts.kernel_for(device, config.dim, config.moe_hidden_dim, group_size)
    with torch.device("meta"):
        model = JoyAIFlash(config)
        for moe in model.moe_layers:
            inner = moe.routed_experts.inner_experts
            moe.routed_experts.inner_experts = Int4Experts(
                inner.num_experts, config.dim, config.moe_hidden_dim, group_size, kernel=kernel)
    model.to_empty(device=device)
    for module in model.modules():  # RoPE tables and MoE counters are not in the state dict
        init_buffers = getattr(module, "_init_self_buffers", None)
        if callable(init_buffers):
            init_buffers(buffer_device=torch.device(device))
    model.load_state_dict({n: v for n, v in tensors.items() if not n.endswith((".qweight", ".scales"))}, strict=True)
    modules = dict(model.named_modules())
    prefixes = {name.rsplit(".", 1)[0] for name in quantized}  # "...routed_experts.inner_experts"
    missing = sorted(f"{p}.{w}.{s}" for p in prefixes for w in EXPERT_WEIGHTS for s in ("qweight", "scales")
                     if f"{p}.{w}.{s}" not in tensors)
    if missing or prefixes != {n for n, m in modules.items() if isinstance(m, Int4Experts)}:
        raise ValueError(f"the INT4 expert tensors do not fit the config: missing {missing[:3]}; re-export the model")
    for prefix in sorted(prefixes):
        experts = modules[prefix]
        for e in range(experts.num_experts):  # one expert's weights unpacked at a time
            experts.set_expert(e, *((unpack_int4(tensors[f"{prefix}.{w}.qweight"][e]),
                                     tensors[f"{prefix}.{w}.scales"][e]) for w in EXPERT_WEIGHTS))
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


def read_int4(path: str | Path, device: str | torch.device = "cpu", kernel: str | None = None):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}; write it with save_int4()")
    config = JoyAIConfig.from_dict(json.loads(meta["config"]))
    return load_int4(load_file(str(path)), config, device=device, kernel=kernel)



# ============================================================================ the serving export (HF layout)

MAX_FILE_BYTES = 5 * 10**9  # the Hugging Face convention; a test passes less to force several files
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64",
              torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8"}
_PROJ = {"w1_EFD": "gate_proj", "w3_EFD": "up_proj", "w2_EDF": "down_proj"}


def pack_int32(q: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' pack_to_int32 for 4 bits: int8 values in [-8, 7] along the last dim, stored as
    q + 8, eight to an int32, value j in bits 4j..4j+3. The last dim must be a multiple of 8."""
    if q.shape[-1] % 8:
        raise ValueError(f"INT4 packing needs an input dim divisible by 8, got {q.shape[-1]}")
    u = (q.to(torch.int64) + 8).reshape(*q.shape[:-1], -1, 8)
    words = (u << (torch.arange(8, dtype=torch.int64) * 4)).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def unpack_int32(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of pack_int32: int8 values (..., cols)."""
    words = packed.to(torch.int64) & 0xFFFFFFFF
    u = (words.unsqueeze(-1) >> (torch.arange(8, dtype=torch.int64) * 4)) & 0xF
    return (u.reshape(*packed.shape[:-1], -1)[..., :cols] - 8).to(torch.int8)


def quantization_config(group_size: int, ignore: list[str]) -> dict:
    """config.json's quantization_config for compressed-tensors W4A16 pack-quantized, symmetric, grouped:
    what vLLM's CompressedTensorsConfig (and SGLang's) read; `ignore` lists the Linear modules left in
    full precision (everything but the routed experts)."""
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
                        "group_size": group_size, "dynamic": False, "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized",
        }},
        "ignore": ignore,
        "kv_cache_scheme": None,
    }


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize


@dataclass
class Variant:
    """One self-contained HF folder of the export: "" (full precision) or "int4/"."""

    prefix: str
    config: dict
    tensors: list[OutTensor] = field(default_factory=list)
    files: list[tuple[str, list[OutTensor]]] = field(default_factory=list)

    def assign_files(self, max_file_bytes: int) -> None:
        groups: list[list[OutTensor]] = []
        size = 0
        for t in self.tensors:
            if not groups or (size + t.nbytes > max_file_bytes and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(t)
            size += t.nbytes
        n = len(groups)
        self.files = [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]

    def index(self) -> dict:
        return {"metadata": {"total_size": sum(t.nbytes for t in self.tensors)},
                "weight_map": {t.name: f for f, ts in self.files for t in ts}}


def is_expert_weight(name: str) -> bool:
    return ".routed_experts.inner_experts." in name and name.rsplit(".", 1)[-1] in EXPERT_WEIGHTS


def _int4_names(hf_name: str, shape: tuple[int, ...], group_size: int) -> list[OutTensor]:
    base = hf_name[: -len(".weight")]
    rows, cols = shape
    return [OutTensor(base + ".weight_packed", torch.int32, (rows, cols // 8)),
            OutTensor(base + ".weight_scale", torch.float32, (rows, cols // group_size)),
            OutTensor(base + ".weight_shape", torch.int64, (2,))]


def _linear_modules(tensors: list[OutTensor]) -> list[str]:
    """HF names of the Linear modules among `tensors` (2-D weights other than the embeddings)."""
    return [t.name[: -len(".weight")] for t in tensors
            if t.name.endswith(".weight") and len(t.shape) == 2 and "embed_tokens" not in t.name]


def plan_export(cfg: JoyAIConfig, sources: dict[str, tuple[tuple[int, ...], torch.dtype]],
                int4_group_size: int | None, max_file_bytes: int = MAX_FILE_BYTES) -> list[Variant]:
    """What the export writes, from the tensors' shapes alone: every output tensor with its file."""
    from flashops.model.hf import hf_adapter, hf_config_dict, to_hf_tensors

    if max_file_bytes < 1:
        raise ValueError(f"max_file_bytes={max_file_bytes}: must be positive (default {MAX_FILE_BYTES})")
    adapter = hf_adapter(cfg)
    full = Variant("", hf_config_dict(cfg))
    int4 = Variant(INT4_DIR + "/", {}) if int4_group_size else None
    for name, (shape, dtype) in sources.items():
        outs = to_hf_tensors(adapter, cfg, name, torch.empty(shape, dtype=dtype, device="meta"))
        for hf_name, t in outs.items():
            full.tensors.append(OutTensor(hf_name, t.dtype, tuple(t.shape)))
            if int4 is not None:
                if is_expert_weight(name):
                    int4.tensors.extend(_int4_names(hf_name, tuple(t.shape), int4_group_size))
                else:
                    int4.tensors.append(OutTensor(hf_name, t.dtype, tuple(t.shape)))
    variants = [full]
    if int4 is not None:
        ignore = [m for m in _linear_modules(int4.tensors) if ".mlp.experts." not in m]
        int4.config = {**hf_config_dict(cfg), "quantization_config": quantization_config(int4_group_size, ignore)}
        variants.append(int4)
    for v in variants:
        v.assign_files(max_file_bytes)
    return variants


def _safetensors_header(tensors: list[OutTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    data = json.dumps(header, separators=(",", ":")).encode()
    data += b" " * (-len(data) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(data)) + data


class _FileSequence:
    """Writes a Variant's planned safetensors files one after another, each tensor as it comes (in plan
    order); a file is open only while its tensors are written."""

    def __init__(self, variant: Variant, open_file: Callable, stack: ExitStack):
        self.variant, self.open_file, self.stack = variant, open_file, stack
        self._queue = [(i, t) for i, (_, ts) in enumerate(variant.files) for t in ts]
        self._pos = 0
        self._stream = None
        self._close: Callable | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, want = self._queue[self._pos]
        if (name, tensor.dtype, tuple(tensor.shape)) != (want.name, want.dtype, want.shape):
            raise RuntimeError(f"export plan mismatch: expected {want}, got {name} {tensor.dtype} "
                               f"{tuple(tensor.shape)}")
        if self._stream is None:
            rel, tensors = self.variant.files[index]
            cm = self.open_file(self.variant.prefix + rel)
            self._stream = cm.__enter__()
            self._close = cm.__exit__
            self.stack.push(self._abort)
            self._stream.write(_safetensors_header(tensors))
        data = memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
        step = 64 << 20
        for start in range(0, len(data), step):
            self._stream.write(data[start:start + step])
        self._pos += 1
        if self._pos == len(self._queue) or self._queue[self._pos][0] != index:
            close, self._stream, self._close = self._close, None, None
            close(None, None, None)

    def _abort(self, exc_type, exc, tb) -> bool:
        if self._close is not None:  # an error while this file was open: its writer aborts
            close, self._stream, self._close = self._close, None, None
            close(exc_type or RuntimeError, exc or RuntimeError("export aborted"), tb)
        return False

    @property
    def done(self) -> bool:
        return self._pos == len(self._queue)


def _tokenizer_config(cfg: JoyAIConfig) -> dict:
    from flashops.model.tokenizer import BOS, EOS, PAD

    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
            "model_max_length": cfg.max_seq_len, "clean_up_tokenization_spaces": False}


def write_export(cfg: JoyAIConfig, sources: dict[str, tuple[tuple[int, ...], torch.dtype]],
                 read: Callable[[str], torch.Tensor], open_file: Callable, put: Callable[[str, bytes], None], *,
                 tokenizer: str | Path, int4_group_size: int | None = None,
                 max_file_bytes: int = MAX_FILE_BYTES, progress: Callable[[str], None] | None = None) -> dict:
    """Write the export, one source tensor at a time: `sources` are the model's tensors (flashops names ->
    (shape, dtype)), `read(name)` returns one, `open_file(rel)` is a context manager giving a writable
    stream (the store's ModelWriter.open), `put(rel, bytes)` writes a small file. Memory: the tensor being
    converted and its HF/INT4 pieces, never the model. Returns the INT4 report (or {})."""
    from flashops.model.hf import hf_adapter, to_hf_tensors

    variants = plan_export(cfg, sources, int4_group_size, max_file_bytes)
    tokenizer_bytes = Path(tokenizer).read_bytes()
    for v in variants:
        put(v.prefix + CONFIG_FILE, json.dumps(v.config, indent=2).encode())
        put(v.prefix + INDEX_FILE, json.dumps(v.index(), indent=2).encode())
        put(v.prefix + "tokenizer.json", tokenizer_bytes)
        put(v.prefix + "tokenizer_config.json", json.dumps(_tokenizer_config(cfg), indent=2).encode())
    adapter = hf_adapter(cfg)
    err_sq = ref_sq = max_abs = 0.0
    quantized = 0
    with ExitStack() as stack:
        sinks = [_FileSequence(v, open_file, stack) for v in variants]
        for i, name in enumerate(sources):
            value = read(name)
            outs = to_hf_tensors(adapter, cfg, name, value)
            for hf_name, t in outs.items():
                sinks[0].write(hf_name, t)
            if len(sinks) > 1:
                if not is_expert_weight(name):
                    for hf_name, t in outs.items():
                        sinks[1].write(hf_name, t)
                else:
                    quantized += 1
                    for e, hf_name in enumerate(outs):  # expert by expert: a few copies of ONE expert at a time
                        w = value[e]
                        q, scales = quantize_int4(w, int4_group_size)
                        diff = dequantize_int4(q, scales, int4_group_size) - w.float()
                        err_sq += diff.pow(2).sum().item()
                        ref_sq += w.float().pow(2).sum().item()
                        max_abs = max(max_abs, diff.abs().max().item())
                        base = hf_name[: -len(".weight")]
                        sinks[1].write(base + ".weight_packed", pack_int32(q))
                        sinks[1].write(base + ".weight_scale", scales)
                        sinks[1].write(base + ".weight_shape", torch.tensor(list(q.shape), dtype=torch.int64))
                        del q, scales, diff
            del value, outs
            if progress:
                progress(f"{i + 1}/{len(sources)} {name}")
        if not all(s.done for s in sinks):
            raise RuntimeError("export plan mismatch: some planned tensors were never written")
    if not int4_group_size:
        return {}
    return {"format": "compressed-tensors/pack-quantized", "group_size": int4_group_size,
            "quantized_tensors": quantized, "relative_rmse": (err_sq / max(ref_sq, 1e-30)) ** 0.5,
            "max_abs_error": max_abs}


# ---------------------------------------------------------------------------- reading the export back


def read_hf_config(directory: str | Path) -> tuple[JoyAIConfig, dict]:
    from flashops.model.hf import config_from_hf

    path = Path(directory) / CONFIG_FILE
    data = json.loads(path.read_text())
    return config_from_hf(data), data


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = directory / INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else sorted(p.name for p in directory.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(directory / f)))
    return state


def int4_group_size(config: dict) -> int | None:
    """The INT4 group size of an export's config.json (compressed-tensors quantization_config), or None."""
    q = config.get("quantization_config") or {}
    for group in (q.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if weights.get("num_bits") == 4:
            return int(weights["group_size"])
    return None


def load_export(directory: str | Path, quantization: str = "none", device: str | torch.device = "cpu",
                kernel: str | None = None):
    """A JoyAIFlash from an export folder: full precision from `directory`, or (quantization="int4") from
    `directory/int4/` with the routed experts kept packed (Int4Experts). Returns (model, config)."""
    import re

    from flashops.model.hf import from_hf_state_dict, hf_adapter
    from flashops.model.model import JoyAIFlash

    directory = Path(directory)
    if quantization == "none":
        cfg, _ = read_hf_config(directory)
        with torch.device(device):
            model = JoyAIFlash(cfg, device=device)
        from_hf_state_dict(model, _read_safetensors(directory))
        return model.eval(), cfg
    folder = directory / INT4_DIR
    cfg, data = read_hf_config(folder)
    group_size = int4_group_size(data)
    if group_size is None:
        raise ValueError(f"{folder / CONFIG_FILE} has no INT4 quantization_config (compressed-tensors, num_bits 4)")
    hf_state = _read_safetensors(folder)
    expert = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\."
                        r"weight_(packed|scale|shape)$")
    parts: dict[tuple[int, str], dict[int, dict[str, torch.Tensor]]] = {}
    rest = {}
    for name, value in hf_state.items():
        m = expert.match(name)
        if m:
            parts.setdefault((int(m[1]), m[3]), {}).setdefault(int(m[2]), {})[m[4]] = value
        else:
            rest[name] = value
    del hf_state
    shared = (".embed_tokens.", ".shared_head.head.")
    rest = {k: v for k, v in rest.items() if not any(s in k for s in shared) or k.startswith("model.embed")}
    tensors = hf_adapter(cfg).from_hf(rest)
    by_proj = {v: k for k, v in _PROJ.items()}
    for (layer, proj), experts in parts.items():
        order = [experts[e] for e in range(len(experts))]
        cols = int(order[0]["shape"][1])
        q = torch.stack([unpack_int32(e["packed"], cols) for e in order])
        base = f"layers.{layer}.moe.routed_experts.inner_experts.{by_proj[proj]}"
        tensors[base + ".qweight"] = pack_int4(q)
        tensors[base + ".scales"] = torch.stack([e["scale"].float() for e in order])
    return load_int4(tensors, cfg, group_size, device=device, kernel=kernel), cfg
