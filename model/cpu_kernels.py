"""fp32 CPU training kernels, and the choice between them made by measurement on the machine that runs them.

Two choices, each between torch's own kernel and ours:

- matmul: "onednn" sends the model's nn.Linear modules and the grouped expert matmuls through oneDNN's fp32
  kernel (`mkldnn._linear_pointwise`, full fp32, not bf16); "aten" keeps torch's (MKL's sgemm). Which one wins
  depends on the CPU: MKL runs its AVX2 path on AMD CPUs, where oneDNN measured 2.0x faster on the model's
  shapes (`benchmarks/cpu_matmul.py`), while on an Intel Xeon oneDNN measured 0.85x of MKL. Matmuls under
  ~1M multiply-adds (decoding) stay on torch's kernel either way: there oneDNN's call overhead loses.
- attention: "mla" is an MLA-aware per-head training kernel (scores, softmax, value product; probabilities
  kept for the backward while B*H*L*S <= 2^25) that takes q_nope/q_pe/k_nope and the shared k_pe as they are,
  so the model skips its q/k concatenations; its small per-head products run on torch's matmul ("mla") or
  oneDNN's ("mla-onednn"); "batched" is the same product for all heads at once (batched matmuls under autograd,
  no per-head loop: 1.2-1.6x torch's fused SDPA at full-size heads on an Intel Xeon, where the per-head loop
  loses); "sdpa" is torch's fused SDPA (torchtitan_compat.sdpa). Inference and other dtypes
  always use SDPA.

How the choice is made (`kernels()`): on the first fp32 CPU matmul of a process, a short timing of each
candidate on training-sized shapes (~0.5 s in all on an idle 2-core Intel Xeon; each kind capped near its budget on a busy one), cached in `$FLASHOPS_HOME/cpu_kernels.json` under the
CPU's model name (and torch version and thread count), so later processes on the same kind of machine read it.
`FLASHOPS_CPU_MATMUL=onednn|aten` skips the measurement ("aten" = torch's kernels everywhere, "onednn" = ours
everywhere); `auto` (the default) measures. `flashops` logs the choice; tests inject the timings (`decide`).
Remove the oneDNN matmul when torch's CPU fp32 matmul dispatches to oneDNN (or MKL runs its AVX-512 path on
AMD); the attention kernel when torch's CPU flash attention beats it everywhere.
"""
from __future__ import annotations

import json
import logging
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from flashops.api.home import flashops_home  # the one $FLASHOPS_HOME default

log = logging.getLogger(__name__)

MATMUL_ENV = "FLASHOPS_CPU_MATMUL"
ATTENTION_ENV = "FLASHOPS_CPU_ATTENTION"
MATMUL_KERNELS = ("onednn", "aten")
ATTENTION_KERNELS = ("mla", "mla-onednn", "batched", "sdpa")
CACHE_FILE = "cpu_kernels.json"


# ---- the choice ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelChoice:
    matmul: str  # "onednn" or "aten"
    attention: str  # "mla", "mla-onednn", "batched" or "sdpa"
    source: str  # "measured", "cached" or why it was not measured
    cpu: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds per candidate, "matmul.onednn", ...

    def describe(self) -> str:
        ratio = ""
        if {"matmul.onednn", "matmul.aten"} <= self.timings.keys():
            ratio = f", oneDNN {self.timings['matmul.aten'] / self.timings['matmul.onednn']:.2f}x aten"
        return f"CPU kernels: matmul={self.matmul} attention={self.attention} ({self.source}{ratio}; {self.cpu})"


def matmul_setting() -> str:
    """FLASHOPS_CPU_MATMUL: "auto" (default: measure), "onednn" or "aten"; anything else warns and means auto."""
    value = os.environ.get(MATMUL_ENV, "auto")
    if value not in ("auto", *MATMUL_KERNELS):
        warnings.warn(f"{MATMUL_ENV}={value!r} is not one of 'onednn', 'aten', 'auto'; measuring as with 'auto' "
                      f"(set {MATMUL_ENV}=aten for torch's own CPU kernels)", stacklevel=2)
        return "auto"
    return value


def attention_setting() -> str:
    """FLASHOPS_CPU_ATTENTION: "auto" (default: what the matmul setting implies, or the measurement), "mla",
    "mla-onednn", "batched" or "sdpa"; anything else warns and means auto."""
    value = os.environ.get(ATTENTION_ENV, "auto")
    if value not in ("auto", *ATTENTION_KERNELS):
        warnings.warn(f"{ATTENTION_ENV}={value!r} is not one of {', '.join(map(repr, ATTENTION_KERNELS))}, 'auto'; "
                      "using 'auto'", stacklevel=2)
        return "auto"
    return value


def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC 9654 96-Core Processor"), what the measurement is cached under."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cache_path() -> Path:
    return flashops_home() / CACHE_FILE


def fastest(timings: dict[str, float], kind: str, candidates: tuple[str, ...]) -> str:
    """The candidate with the smallest time under "<kind>.<candidate>"."""
    return min(candidates, key=lambda c: timings[f"{kind}.{c}"])


def decide(measure_matmul: Callable[[], dict[str, float]] | None = None,
           measure_attention: Callable[[], dict[str, float]] | None = None,
           setting: str | None = None, cpu: str | None = None, path: Path | None = None,
           attention: str | None = None) -> KernelChoice:
    """`_decide`, then FLASHOPS_CPU_ATTENTION (or `attention`) when it names a kernel."""
    attention = attention or attention_setting()
    choice = _decide(measure_matmul, measure_attention, setting, cpu, path)
    if attention == "auto" or choice.source == "this torch build has no oneDNN":
        return choice
    return KernelChoice(choice.matmul, attention, f"{choice.source}, {ATTENTION_ENV}={attention}", choice.cpu,
                        choice.timings)


def _decide(measure_matmul, measure_attention, setting, cpu, path) -> KernelChoice:
    """The kernels for this machine: the override, else the cached measurement for this CPU, else a new one
    (written to the cache). measure_matmul() -> {"matmul.onednn": s, "matmul.aten": s}; measure_attention()
    -> {"attention.mla": s, "attention.mla-onednn": s, "attention.batched": s, "attention.sdpa": s}."""
    setting = setting or matmul_setting()
    cpu = cpu or cpu_model()
    if not torch.backends.mkldnn.is_available():
        return KernelChoice("aten", "sdpa", "this torch build has no oneDNN", cpu)
    if setting != "auto":
        return KernelChoice(setting, "mla-onednn" if setting == "onednn" else "sdpa", f"{MATMUL_ENV}={setting}", cpu)
    path = path or cache_path()
    # v2: the candidates changed ("batched" added, model-sized attention shape): older entries are measured again
    key = f"{cpu} | torch {torch.__version__} | {torch.get_num_threads()} threads | v2"
    cached = _read_cache(path)
    entry = cached.get(key)
    if (isinstance(entry, dict) and entry.get("matmul") in MATMUL_KERNELS
            and entry.get("attention") in ATTENTION_KERNELS):
        return KernelChoice(entry["matmul"], entry["attention"], "cached", cpu, entry.get("timings", {}))
    timings = dict((measure_matmul or measure_matmul_kernels)())
    matmul = fastest(timings, "matmul", MATMUL_KERNELS)
    # the per-head loop on oneDNN is a candidate only where oneDNN's matmul won: elsewhere its per-call set-up
    # alone took 2-4 s at the measured shape (Intel Xeon), for a kernel that cannot win there
    timings.update((measure_attention or measure_attention_kernels)(include_onednn=matmul == "onednn"))
    candidates = tuple(k for k in ATTENTION_KERNELS if f"attention.{k}" in timings)
    choice = KernelChoice(matmul, fastest(timings, "attention", candidates), "measured", cpu, timings)
    cached[key] = {k: v for k, v in asdict(choice).items() if k in ("matmul", "attention", "timings")}
    _write_cache(path, cached)
    return choice


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or unreadable: measure again (and rewrite it)


def _write_cache(path: Path, data: dict) -> None:
    """Atomic (several ranks may write at once); a read-only home only costs a re-measurement next time."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not cache the CPU kernel choice in %s (%s); it is measured again next time", path, e)


_choice: KernelChoice | None = None


def kernels() -> KernelChoice:
    """This process's choice, decided at the first call (which may come from inside a no-grad, inference or
    autocast region: the measurement runs outside them)."""
    global _choice
    if _choice is None:
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast("cpu", enabled=False):
            _choice = decide()
        log.info(_choice.describe())
    return _choice


# ---- the measurement -----------------------------------------------------------------------------
# Shapes of a training step's linears (rows = batch x sequence): forward x W^T and both backward products.
_MATMUL_SHAPES = [(512, 256, 1024), (512, 1024, 256)]  # (rows, in, out)
# A training step's attention at the full-size head sizes (48B-A3B and torchtitan's debug model: 128 + 64 -> 128).
# The ranking depends on them: at 2 heads of 64 + 32 (the shape used first) SDPA tied the per-head loop on an
# Intel Xeon, while at the full-size heads the batched products beat SDPA 1.2-1.3x there (1.6x at 16 heads).
_ATTENTION_SHAPE = (2, 8, 256, 128, 64, 128)  # batch, heads, length, nope, rope, v


def _best_of(fns: dict[str, Callable[[], object]], rounds: int, budget_s: float) -> dict[str, float]:
    """Min seconds per candidate over interleaved rounds after a warm-up call (A B A B: a busy neighbour hits
    both alike). Rounds stop once budget_s is spent (at least one), and a candidate whose warm-up alone took the
    budget is not called again (its warm-up time is its sample): a loaded machine must not make this a long wait."""
    start = time.perf_counter()
    first = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        fn()  # warm-up: first-call allocation, oneDNN primitive creation
        first[name] = time.perf_counter() - t0
    best = {name: first[name] if first[name] > budget_s else float("inf") for name in fns}
    for r in range(rounds):
        if r and time.perf_counter() - start > budget_s:
            break
        for name, fn in fns.items():
            if first[name] <= budget_s:
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


@torch.no_grad()
def measure_matmul_kernels(rounds: int = 5, budget_s: float = 0.2) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    cases = []
    for rows, d_in, d_out in _MATMUL_SHAPES:
        x, w, g = (torch.randn(*s, generator=gen) for s in ((rows, d_in), (d_out, d_in), (rows, d_out)))
        cases.append((x, w, g))

    def run(mm):
        for x, w, g in cases:
            mm(x, w), mm(g, w.t()), mm(g.t(), x.t())  # x W^T, dX = g W, dW = g^T x

    times = _best_of({"onednn": lambda: run(_onednn_mm), "aten": lambda: run(_aten_mm)}, rounds, budget_s)
    return {f"matmul.{k}": v for k, v in times.items()}


def measure_attention_kernels(rounds: int = 5, budget_s: float = 0.3, include_onednn: bool = True) -> dict[str, float]:
    from flashops.model.torchtitan_compat import sdpa

    bsz, heads, length, nope, rope, v_dim = _ATTENTION_SHAPE
    gen = torch.Generator().manual_seed(0)
    q_nope, q_pe = torch.randn(bsz, length, heads, nope, generator=gen), torch.randn(bsz, length, heads, rope, generator=gen)
    k_nope, v = torch.randn(bsz, length, heads, nope, generator=gen), torch.randn(bsz, length, heads, v_dim, generator=gen)
    k_pe = torch.randn(bsz, length, 1, rope, generator=gen)
    inputs = [t.requires_grad_(True) for t in (q_nope, q_pe, k_nope, k_pe, v)]
    scale = (nope + rope) ** -0.5

    def ours(kernel):
        mla_attention(*inputs, mask=None, is_causal=True, scale=scale, kernel=kernel).sum().backward()

    def fused():
        q = torch.cat([inputs[0], inputs[1]], -1)
        k = torch.cat([inputs[2], inputs[3].expand(-1, -1, heads, -1)], -1)
        sdpa(q, k, inputs[4], mask=None, is_causal=True, scale=scale).sum().backward()

    candidates = {"mla": lambda: ours("mla"), "mla-onednn": lambda: ours("mla-onednn"),
                  "batched": lambda: ours("batched"), "sdpa": fused}
    if not include_onednn:
        del candidates["mla-onednn"]
    times = _best_of(candidates, rounds, budget_s)
    return {f"attention.{k}": v for k, v in times.items()}


# ---- matmul --------------------------------------------------------------------------------------


def _onednn_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T through oneDNN's fp32 kernel (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


def _aten_mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.matmul(x, weight.t())


_mm = _onednn_mm  # what linear() and grouped_linear() call (tests swap it to count calls)


def _fp32_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    # not under autocast: bf16 compute over fp32 weights is autocast's job (F.linear casts), not these fp32 kernels
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")
            and not isinstance(x, DTensor) and not isinstance(weight, DTensor)
            and not torch.compiler.is_compiling())


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Plain fp32 CPU tensors, outside torch.compile, on a machine where oneDNN won the measurement."""
    return _fp32_cpu(x, weight) and kernels().matmul == "onednn"


def _weight_grad(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """grad^T @ x for (N, out) and (N, in), as a contiguous (out, in) tensor like the weight. oneDNN takes a
    transposed weight as is but copies a transposed input, so one operand gets transposed: grad (N x out
    copied), or x (N x in copied, then the (in, out) result transposed back) when that moves less memory,
    e.g. for the output head (out = vocab)."""
    n, d_out, d_in = grad.shape[0], grad.shape[1], x.shape[1]
    if d_in * (n + d_out) < n * d_out:
        return _mm(x.t().contiguous(), grad.t()).t().contiguous()
    return _mm(grad.t(), x.t())


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return _mm(x, weight)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = _mm(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = _weight_grad(grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]))
        return grad_x, grad_w


# Below about a million multiply-adds (e.g. batch-1 decoding) oneDNN's per-call overhead (~10-15 us) loses to
# MKL (benchmarks/cpu_matmul.py --rows 1); from ~1.5M up oneDNN wins.
ONEDNN_MIN_MACS = 1 << 20


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN for plain fp32 CPU tensors big enough to gain from it (where it wins)."""
    if x.numel() * weight.shape[0] < ONEDNN_MIN_MACS or not onednn_applies(x, weight):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        y = _OneDNNLinear.apply(x, weight)
    else:
        y = _mm(x, weight)
    return y if bias is None else y + bias


def grouped_linear_applies(x: torch.Tensor, weight_t: torch.Tensor) -> bool:
    """x (rows, in), weight_t (E, in, out): big enough per expert and oneDNN chosen."""
    per_expert_macs = x.shape[0] // weight_t.shape[0] * weight_t.shape[1] * weight_t.shape[2]
    return per_expert_macs >= ONEDNN_MIN_MACS and onednn_applies(x, weight_t)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows [offs[e-1], offs[e]) of x times weight[e].T for each expert e (weight: (E, out, in)), via oneDNN."""
    return _OneDNNGroupedLinear.apply(x, weight, offs)


class _OneDNNGroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, offs):
        bounds = [0, *offs.tolist()]
        out = x.new_empty(x.shape[0], weight.shape[1])
        out[bounds[-1]:] = 0  # rows past the last expert's (none on the CPU dispatch path)
        for e in range(weight.shape[0]):
            if bounds[e + 1] > bounds[e]:
                out[bounds[e]:bounds[e + 1]] = _mm(x[bounds[e]:bounds[e + 1]], weight[e])
        ctx.bounds = bounds
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad, b = grad.contiguous(), ctx.bounds
        grad_x = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        grad_w = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        if grad_x is not None:
            grad_x[b[-1]:] = 0
        for e in range(weight.shape[0]):
            if b[e + 1] == b[e]:
                if grad_w is not None:
                    grad_w[e] = 0
                continue
            g = grad[b[e]:b[e + 1]]
            if grad_x is not None:
                grad_x[b[e]:b[e + 1]] = _mm(g, weight[e].t())
            if grad_w is not None:
                grad_w[e] = _weight_grad(g, x[b[e]:b[e + 1]])
        return grad_x, grad_w, None


def use_onednn_linears(model: torch.nn.Module) -> None:
    """Route every nn.Linear of `model` through `linear` (same parameters, same state dict); `linear` itself
    decides per call (measured kernel choice, dtype, size)."""
    for module in model.modules():
        cls = type(module)
        if isinstance(module, torch.nn.Linear) and not getattr(cls, "_onednn_linear", False):
            module.__class__ = _onednn_subclass(cls)


_SUBCLASSES: dict[type, type] = {}


def _onednn_subclass(cls: type) -> type:
    if cls not in _SUBCLASSES:
        def forward(self, x):
            return linear(x, self.weight, self.bias)
        _SUBCLASSES[cls] = type(cls.__name__, (cls,), {"forward": forward, "_onednn_linear": True,
                                                       "__module__": cls.__module__})
    return _SUBCLASSES[cls]


# ---- MLA training attention ----------------------------------------------------------------------
# The fused flash kernel's inner products run on MKL (its AVX2 path on AMD). Instead: per (batch, head),
# scores through the measured matmul, the softmax into a saved probability buffer, and the value product, so
# the L x S temporaries stay in cache; the backward reuses the probabilities (no recomputation). It takes
# MLA's pieces as they come (q_nope/q_pe, per-head k_nope, the one shared roped key k_pe, v) and packs them
# per head once. Used while B*H*L*S probabilities fit the limit below and the measurement picked it.
ATTENTION_PROBS_LIMIT = 1 << 25  # elements of B*H*L*S (128 MiB fp32 per layer)


def mla_attention_applies(q: torch.Tensor, kv_len: int) -> bool:
    """q (B, L, H, D), requiring grad, fp32 on CPU, probabilities within the limit, the MLA kernel chosen."""
    bsz, q_len, heads, _ = q.shape
    return (torch.is_grad_enabled() and q.requires_grad and _fp32_cpu(q, q)
            and bsz * heads * q_len * kv_len <= ATTENTION_PROBS_LIMIT and kernels().attention != "sdpa")


def mla_attention(q_nope, q_pe, k_nope, k_pe, v, *, mask, is_causal, scale, kernel=None):
    """softmax(scale * [q_nope, q_pe] . [k_nope, k_pe]) v per head. q_*: (B, L, H, .), k_nope and v:
    (B, S, H, .), k_pe: (B, S, 1, rope) shared by all heads; mask: bool (True = attend) broadcastable to
    (B, 1, L, S), or is_causal. Returns (B, L, H, v_dim). kernel: "mla", "mla-onednn" or "batched"; the
    measured choice by default (the measurement names each one)."""
    q_len, kv_len = q_nope.shape[1], k_nope.shape[1]
    if is_causal:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q_nope.device).tril()
    bias = None
    if mask is not None:  # additive, (Bm, L, S) with Bm in (1, B)
        mask = mask.reshape(-1, q_len, kv_len)
        bias = torch.zeros(mask.shape, dtype=q_nope.dtype, device=q_nope.device).masked_fill_(~mask, float("-inf"))
    kernel = kernel or kernels().attention
    if kernel == "batched":
        return _batched_mla(q_nope, q_pe, k_nope, k_pe, v, bias, scale)
    return _MLAttentionCPU.apply(q_nope, q_pe, k_nope, k_pe, v, bias, scale,
                                 _mm if kernel == "mla-onednn" else _aten_mm)


def _batched_mla(q_nope, q_pe, k_nope, k_pe, v, bias, scale):
    """All B*H heads in three batched products under autograd (scores, softmax, values); bias (Bm, L, S)."""
    bsz, q_len, heads, _ = q_nope.shape
    kv_len, v_dim, n = k_nope.shape[1], v.shape[-1], bsz * heads
    q = torch.cat([q_nope, q_pe], -1).transpose(1, 2).reshape(n, q_len, -1)
    k = torch.cat([k_nope, k_pe.expand(-1, -1, heads, -1)], -1).transpose(1, 2).reshape(n, kv_len, -1)
    if bias is None:
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    else:  # one bias per batch row (or one for all), repeated over its heads
        if bias.shape[0] > 1:
            bias = bias.repeat_interleave(heads, 0)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), alpha=scale)
    probs = torch.softmax(scores, -1)
    out = torch.bmm(probs, v.transpose(1, 2).reshape(n, kv_len, v_dim))
    return out.view(bsz, heads, q_len, v_dim).transpose(1, 2)


class _MLAttentionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_nope, q_pe, k_nope, k_pe, v, bias, scale, mm):
        bsz, q_len, heads, nope = q_nope.shape
        kv_len, rope, v_dim, n = k_nope.shape[1], q_pe.shape[-1], v.shape[-1], bsz * q_nope.shape[2]
        q = q_nope.new_empty(bsz, heads, q_len, nope + rope)  # per-head contiguous, scale folded in
        torch.mul(q_nope.transpose(1, 2), scale, out=q[..., :nope])
        torch.mul(q_pe.transpose(1, 2), scale, out=q[..., nope:])
        k = k_nope.new_empty(bsz, heads, kv_len, nope + rope)
        k[..., :nope] = k_nope.transpose(1, 2)
        k[..., nope:] = k_pe.transpose(1, 2)  # broadcast over heads
        q, k = q.view(n, q_len, -1), k.view(n, kv_len, -1)
        v_ = v.transpose(1, 2).reshape(n, kv_len, v_dim)
        probs = q.new_empty(n, q_len, kv_len)
        out = q.new_empty(bsz, q_len, heads, v_dim)  # written per head, returned in the model's layout
        out_heads = out.transpose(1, 2)
        for i in range(n):
            scores = mm(q[i], k[i])
            if bias is not None:
                scores.add_(bias[(i // heads) % bias.shape[0]])
            torch.ops.aten._softmax.out(scores, -1, False, out=probs[i])
            out_heads[i // heads, i % heads] = mm(probs[i], v_[i].t())
        ctx.save_for_backward(q, k, v_, probs)
        ctx.dims = (bsz, heads, nope, scale)
        ctx.mm = mm
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        bsz, heads, nope, scale = ctx.dims
        mm = ctx.mm
        n, q_len, qk_dim = q.shape
        kv_len, v_dim = k.shape[1], v.shape[-1]
        g = grad_out.transpose(1, 2).reshape(n, q_len, v_dim)
        q_t, g_t = q.transpose(1, 2).contiguous(), g.transpose(1, 2).contiguous()  # thin operands, transposed once
        grad_q = torch.empty_like(q)
        grad_k_t = q.new_empty(n, qk_dim, kv_len)
        grad_v_t = q.new_empty(n, v_dim, kv_len)
        grad_s = q.new_empty(q_len, kv_len)
        for i in range(n):
            p = probs[i]
            grad_p = mm(g[i], v[i])  # dP = dO V^T
            torch.ops.aten._softmax_backward_data.out(grad_p, p, -1, q.dtype, grad_input=grad_s)
            grad_q[i] = mm(grad_s, k[i].t())  # dQ = dS K (scale applied below)
            grad_k_t[i] = mm(q_t[i], grad_s.t())  # dK^T = (scale Q)^T dS
            grad_v_t[i] = mm(g_t[i], p.t())  # dV^T = dO^T P
        grad_q = grad_q.mul_(scale).view(bsz, heads, q_len, qk_dim).transpose(1, 2)
        grad_k = grad_k_t.view(bsz, heads, qk_dim, kv_len).permute(0, 3, 1, 2)  # (B, S, H, qk)
        grad_v = grad_v_t.view(bsz, heads, v_dim, kv_len).permute(0, 3, 1, 2)
        return (grad_q[..., :nope], grad_q[..., nope:], grad_k[..., :nope],
                grad_k[..., nope:].sum(2, keepdim=True), grad_v, None, None, None)


# ---- weight-only INT4 matmul (serving) -----------------------------------------------------------
# The routed experts of an INT4 export run either on torch's packed CPU kernel or on the reference path.
# - "int4pack": `aten._weight_int4pack_mm_for_cpu` over weights repacked once at load
#   (`_convert_weight_to_int4pack_for_cpu`). Its vectorized path needs bf16 activations: fp32 activations
#   take a scalar reference loop ~15-20x slower than fp32 sgemm (measured on an AMD EPYC, torch 2.13). So it
#   computes in bf16 with bf16 group scales and fp32 accumulation, as GPU INT4 kernels (vLLM's Marlin) do:
#   about 3 significant digits per expert output, next to INT4 rounding's ~1 (tests bound the difference).
#   It takes group sizes 32/64/128/256 and output widths divisible by 16.
# - "dequant": dequantize the experts that received tokens, per call, into the activations' dtype and
#   matmul (exact against the fake-quantized fp32 model; no faster than fp32).
# Which is faster depends on the CPU: the packed kernel's AVX-512 path is 1.2-2.5x fp32 sgemm at one row, its
# AVX2 path slower. The choice is measured once per CPU model like the ones above (`int4_kernel()`), cached
# in the same file; FLASHOPS_CPU_INT4=int4pack|dequant skips the measurement. Remove "dequant" (keep it for
# shapes the kernel rejects) when torch's packed kernel beats fp32 on every CPU we serve on.
INT4_ENV = "FLASHOPS_CPU_INT4"
INT4_KERNELS = ("int4pack", "dequant")
INT4_GROUP_SIZES = (32, 64, 128, 256)
_INT4_SHAPES = [(512, 512), (512, 256)]  # (out, in) of a joyai-flash-small expert's fused w1|w3 and w2


@dataclass(frozen=True)
class Int4Choice:
    kernel: str  # "int4pack" or "dequant"
    source: str  # "measured", "cached", or why it was not measured
    cpu: str = ""
    timings: dict[str, float] = field(default_factory=dict)  # seconds per candidate, "int4.int4pack", ...

    def describe(self) -> str:
        ratio = ""
        if {"int4.int4pack", "int4.dequant"} <= self.timings.keys():
            ratio = f", packed {self.timings['int4.dequant'] / self.timings['int4.int4pack']:.2f}x dequant"
        return f"CPU INT4 kernel: {self.kernel} ({self.source}{ratio}; {self.cpu})"


def int4pack_available() -> bool:
    return all(hasattr(torch.ops.aten, op) for op in
               ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"))


def int4pack_fits(out_features: int, in_features: int, group_size: int) -> bool:
    """Shapes torch's packed CPU kernel takes."""
    return group_size in INT4_GROUP_SIZES and in_features % group_size == 0 and out_features % 16 == 0


def int4_setting() -> str:
    """FLASHOPS_CPU_INT4: "auto" (default: measure), "int4pack" or "dequant"; anything else warns and means auto."""
    value = os.environ.get(INT4_ENV, "auto")
    if value not in ("auto", *INT4_KERNELS):
        warnings.warn(f"{INT4_ENV}={value!r} is not one of 'int4pack', 'dequant', 'auto'; measuring as with 'auto' "
                      f"(set {INT4_ENV}=dequant for the reference path)", stacklevel=2)
        return "auto"
    return value


def decide_int4(measure: Callable[[], dict[str, float]] | None = None, setting: str | None = None,
                cpu: str | None = None, path: Path | None = None) -> Int4Choice:
    """The INT4 expert kernel for this machine: the override, else the cached measurement for this CPU, else a
    new one (written to the cache). measure() -> {"int4.int4pack": s, "int4.dequant": s}."""
    setting = setting or int4_setting()
    cpu = cpu or cpu_model()
    if not int4pack_available():
        return Int4Choice("dequant", "this torch build has no packed CPU INT4 kernel", cpu)
    if setting != "auto":
        return Int4Choice(setting, f"{INT4_ENV}={setting}", cpu)
    path = path or cache_path()
    key = f"int4 | {cpu} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    cached = _read_cache(path)
    entry = cached.get(key)
    if isinstance(entry, dict) and entry.get("kernel") in INT4_KERNELS:
        return Int4Choice(entry["kernel"], "cached", cpu, entry.get("timings", {}))
    timings = dict((measure or measure_int4_kernels)())
    choice = Int4Choice(fastest(timings, "int4", INT4_KERNELS), "measured", cpu, timings)
    cached[key] = {"kernel": choice.kernel, "timings": timings}
    _write_cache(path, cached)
    return choice


_int4_choice: Int4Choice | None = None


def int4_kernel() -> Int4Choice:
    """This process's INT4 kernel, decided at the first call (an INT4 model's load)."""
    global _int4_choice
    if _int4_choice is None:
        with torch.inference_mode():
            _int4_choice = decide_int4()
        log.info(_int4_choice.describe())
    return _int4_choice


def int4_pack(q: torch.Tensor, scales: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One (out, in) weight as the packed kernel wants it, from symmetric INT4: q, integers in [-8, 7], and
    fp32 scales (out, in/group). The kernel dequantizes (u - 8) * scale + zero with u = q + 8 in [0, 15], so
    zero = 0 reproduces q * scale exactly. Returns (uint8 (out, in/2) in the kernel's nibble order,
    bf16 (in/group, out, 2) scales and zeros)."""
    out_features, in_features = q.shape
    if not int4pack_fits(out_features, in_features, group_size):
        raise ValueError(f"INT4 weight ({out_features}, {in_features}) with group size {group_size} does not fit "
                         f"the packed CPU kernel (group 32/64/128/256 dividing the input, output divisible by 16); "
                         f"set {INT4_ENV}=dequant")
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32) + 8, 1)
    scales_t = scales.t().to(torch.bfloat16)
    return packed, torch.stack([scales_t, torch.zeros_like(scales_t)], dim=-1).contiguous()


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (rows, in) @ W.T for a weight packed by int4_pack: bf16 in, fp32 accumulation, bf16 out. Scales cast
    to another float dtype (serving.backend.place casts every float buffer) are cast back per call."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), packed, group_size,
                                                      scales_and_zeros.to(torch.bfloat16))


@torch.no_grad()
def measure_int4_kernels(rounds: int = 5, budget_s: float = 0.2) -> dict[str, float]:
    """One decoding row through each expert shape: the packed kernel against per-call dequantization + fp32."""
    gen, group = torch.Generator().manual_seed(0), 64
    cases = []
    for out_f, in_f in _INT4_SHAPES:
        q = torch.randint(-8, 8, (out_f, in_f), generator=gen, dtype=torch.int8)
        scales = torch.rand(out_f, in_f // group, generator=gen) * 0.01 + 1e-3
        cases.append((torch.randn(1, in_f, generator=gen), q, scales, *int4_pack(q, scales, group)))

    def packed():
        for x, _, _, p, sz in cases:
            int4_mm(x, p, sz, group)

    def dequant():
        for x, q, scales, _, _ in cases:
            w = (q.float().view(q.shape[0], -1, group) * scales.unsqueeze(-1)).view(q.shape)
            torch.matmul(x, w.t())

    times = _best_of({"int4pack": packed, "dequant": dequant}, rounds, budget_s)
    return {f"int4.{k}": v for k, v in times.items()}
