"""Workarounds for running torchtitan 0.3.0's deepseek_v3 components on CPU with torch 2.13. The ONE place
for them; each says why and when it can go.

1. `grouped_mm`: torchtitan's GroupedExperts casts to bf16 for `torch._grouped_mm` (a CUDA kernel
   requirement). On CPU the fp32 kernel exists and is faster, but its backward rejects expanded
   (stride-0) output gradients, e.g. from `y.sum().backward()` ("Invalid strides/sizes, got [0, 0]").
   We pass the gradient through `contiguous()` first.
   Remove when torch's CPU `_grouped_mm` backward accepts non-contiguous grads.
2. `flex_attention_eager`: torchtitan calls a class-level `torch.compile(flex_attention, max_autotune)`,
   which needs triton kernels; on CPU flex must run eagerly (and unfused, which is why the CPU default
   is SDPA). Remove when torchtitan gates its compiled flex on the device.
3. `sdpa`: MLA's value head (128) is narrower than its query/key head (192); with unequal head dims
   torch's CPU SDPA drops to the unfused math kernel (bmm + softmax). Zero-padding V to the q/k width
   keeps the fused CPU flash kernel (about 2.5x faster fwd+bwd at 2 x 16 heads x 256); we slice the
   padding off the output. Remove when the CPU flash kernel accepts a different V head dim.
4. `moe_forward_cpu`: torchtitan's token dispatch is built for GPUs and expert parallelism: it counts
   tokens through a (B, L, E) one-hot map, gathers rows with advanced indexing (whose backward is an
   accumulating index_put, serial on CPU) and combines through `deterministic_scatter_add` over an
   expanded (N, D) int64 index. On CPU, without EP/TP, we sort the routed rows by expert once, gather
   with index_select, run the same grouped expert matmuls on contiguous per-expert slices and combine
   with index_add (deterministic on CPU). Same parameters, same routing, same result up to fp rounding
   (tests/model compares it with torchtitan's path). GPU, EP and TP keep torchtitan's MoE.forward.
   Remove when torchtitan's LocalTokenDispatcher is cheap on CPU (or CPU training stops mattering).
5. `build_device_mesh`: torchtitan's ParallelDims.build_mesh creates the mesh on
   `torchtitan.tools.utils.device_type`, which falls back to "cuda" when no accelerator is visible, so on a
   CPU-only machine (gloo) distributing a tensor fails with "Torch not compiled with CUDA enabled". We build
   the mesh on "cpu" there. Remove when torchtitan derives the mesh device from the process group backend.
6. `sum_reductions_for_gloo`: FSDP2 folds gradient scaling into the reduce-scatter as
   ReduceOp.PREMUL_SUM when a divide factor is set (torchtitan sets one for the routed experts under EP),
   and gloo does not implement PREMUL_SUM. We ask every FSDP unit for plain sums with separate scaling.
   Remove when gloo supports PREMUL_SUM (or FSDP falls back by itself).
7. `linear` / `grouped_mm` on CPU in fp32 go through oneDNN, not MKL: torch's CPU fp32 matmul calls MKL's sgemm,
   which on non-Intel x86 CPUs (this machine: AMD EPYC with AVX-512) takes its AVX2 path, about 150-200
   GFLOP/s on 2 cores, while oneDNN's fp32 kernel (`mkldnn._linear_pointwise`, full fp32, not bf16) reaches
   400-460 GFLOP/s on the same shapes (benchmarks/cpu_matmul.py prints both). `use_onednn_linears(model)`
   points the model's nn.Linear modules at `linear`; DTensors, other dtypes, CUDA and torch.compile keep
   F.linear. FLASHOPS_CPU_MATMUL=aten turns it off. Remove when torch's CPU fp32 matmul dispatches to oneDNN
   (or MKL runs its AVX-512 path on AMD).
"""
from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: D401 - identity
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def grouped_mm(a: torch.Tensor, b_t: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """`a @ b_t[e]` for each expert's row block (ends at offs[e]); CPU runs in the weights' dtype."""
    if a.is_cuda:  # torchtitan's path: the CUDA kernel wants bf16
        return torch._grouped_mm(a.bfloat16(), b_t.bfloat16(), offs=offs)
    a = a.to(b_t.dtype)
    per_expert_macs = a.shape[0] // b_t.shape[0] * b_t.shape[1] * b_t.shape[2]
    if _onednn_applies(a, b_t) and per_expert_macs >= _ONEDNN_MIN_MACS:
        return _OneDNNGroupedLinear.apply(a, b_t.transpose(-2, -1), offs)
    out = torch._grouped_mm(a, b_t, offs=offs)
    return _ContiguousGrad.apply(out) if out.requires_grad else out


def flex_attention_eager(q, k, v, block_mask, scale):
    """(B, L, H, D) layout in and out, like torchtitan's FlexAttention module."""
    from torch.nn.attention.flex_attention import flex_attention

    out = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask, scale=scale)
    return out.transpose(1, 2)


def sdpa(q, k, v, *, mask, is_causal, scale):
    """(B, L, H, D) layout in and out."""
    v_dim = v.shape[-1]
    if not q.is_cuda and v_dim < q.shape[-1]:
        v = F.pad(v, (0, q.shape[-1] - v_dim))
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, is_causal=is_causal, scale=scale
    )
    return out[..., :v_dim].transpose(1, 2)


def moe_cpu_fast_path_applies(moe, x) -> bool:
    """CPU, plain tensors, no expert parallelism wired into the dispatcher (EP/TP keep torchtitan's path)."""
    dispatcher = moe.routed_experts.token_dispatcher
    return (x.device.type == "cpu" and not isinstance(x, DTensor)
            and getattr(dispatcher, "ep_mesh", None) is None
            and not isinstance(getattr(moe.routed_experts.inner_experts, "w1_EFD", None), DTensor))


def moe_forward_cpu(moe, x_BLD: torch.Tensor) -> torch.Tensor:
    """torchtitan's MoE.forward (router, load counts, routed experts, shared experts) with a CPU dispatch."""
    experts = moe.routed_experts.inner_experts
    scores_BLK, ids_BLK, _ = moe.router(x_BLD, moe.expert_bias_E)
    bsz, seqlen, dim = x_BLD.shape
    top_k = ids_BLK.shape[-1]
    ids_N = ids_BLK.reshape(-1)
    counts_E = torch.bincount(ids_N, minlength=experts.num_experts)
    if moe.training:
        with torch.no_grad():
            moe.tokens_per_expert_E.add_(counts_E)
    order_N = torch.argsort(ids_N, stable=True)  # routed rows grouped by expert
    token_N = torch.div(order_N, top_k, rounding_mode="floor")
    x_TD = x_BLD.reshape(bsz * seqlen, dim)
    routed_ND = experts(x_TD.index_select(0, token_N), counts_E)
    score_N1 = scores_BLK.reshape(-1).index_select(0, order_N).unsqueeze(1)
    routed_ND = (routed_ND.float() * score_N1).to(routed_ND.dtype)  # scores applied in fp32, like torchtitan
    out = torch.zeros_like(x_TD).index_add_(0, token_N, routed_ND).view(bsz, seqlen, dim)
    if moe.shared_experts is not None:
        out = out + moe.shared_experts(x_BLD)
    return out


def build_device_mesh(parallel_dims):
    """`parallel_dims.build_mesh()`, on the CPU when no accelerator is available (torchtitan assumes CUDA)."""
    import torchtitan.distributed.parallel_dims as tt_parallel_dims

    if torch.accelerator.is_available():
        return parallel_dims.build_mesh()
    saved, tt_parallel_dims.device_type = tt_parallel_dims.device_type, "cpu"
    try:
        return parallel_dims.build_mesh()
    finally:
        tt_parallel_dims.device_type = saved


def sum_reductions_for_gloo(model) -> None:
    """Call after fully_shard on a gloo (CPU) process group: plain-sum gradient reductions, scaled separately."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


# ---- 7. fp32 CPU matmuls through oneDNN ----------------------------------------------------------


def _cpu_matmul_setting() -> bool:
    """FLASHOPS_CPU_MATMUL: "onednn" (default) or "aten" (torch's own kernels everywhere)."""
    value = os.environ.get("FLASHOPS_CPU_MATMUL", "onednn")
    if value not in ("onednn", "aten"):
        warnings.warn(f"FLASHOPS_CPU_MATMUL={value!r} is not one of 'onednn', 'aten'; using 'onednn' "
                      "(set FLASHOPS_CPU_MATMUL=aten for torch's own CPU kernels)", stacklevel=2)
    return value != "aten" and torch.backends.mkldnn.is_available()


_ONEDNN_FP32 = _cpu_matmul_setting()


def _onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and weight.dtype == torch.float32
            and not isinstance(x, DTensor) and not isinstance(weight, DTensor)
            and _ONEDNN_FP32 and not torch.compiler.is_compiling())


def _mm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T through oneDNN's fp32 kernel (any strides)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")


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
_ONEDNN_MIN_MACS = 1 << 20


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, through oneDNN for plain fp32 CPU tensors big enough to gain from it."""
    if not _onednn_applies(x, weight) or x.numel() * weight.shape[0] < _ONEDNN_MIN_MACS:
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        y = _OneDNNLinear.apply(x, weight)
    else:
        y = _mm(x, weight)
    return y if bias is None else y + bias


class _OneDNNGroupedLinear(torch.autograd.Function):
    """Rows [offs[e-1], offs[e]) of x times weight[e].T, for each expert e (weight: (E, out, in))."""

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
    """Route every nn.Linear of `model` through `linear` (same parameters, same state dict)."""
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


# ---- 8. MLA training attention on CPU (fp32) -----------------------------------------------------
# The fused flash kernel's inner products run on MKL (its AVX2 path here, see 7). Instead: per (batch, head),
# scores through oneDNN, the softmax into a saved probability buffer, and the value product, so the L x S
# temporaries stay in cache; the backward reuses the probabilities (no recomputation). It takes MLA's
# pieces as they come (q_nope/q_pe, per-head k_nope, the one shared roped key k_pe, v) and packs them per
# head once, so the model skips its q/k concatenations. Used while B*H*L*S probabilities fit the limit
# below; inference, other dtypes and larger shapes stay on SDPA. Remove with 7.
_ATTENTION_PROBS_LIMIT = 1 << 25  # elements of B*H*L*S (128 MiB fp32 per layer)


def mla_attention_applies(q: torch.Tensor, kv_len: int) -> bool:
    """q (B, L, H, D), requiring grad, fp32 on CPU, probabilities within the limit."""
    bsz, q_len, heads, _ = q.shape
    return (torch.is_grad_enabled() and q.requires_grad and _onednn_applies(q, q)
            and bsz * heads * q_len * kv_len <= _ATTENTION_PROBS_LIMIT)


def mla_attention(q_nope, q_pe, k_nope, k_pe, v, *, mask, is_causal, scale):
    """softmax(scale * [q_nope, q_pe] . [k_nope, k_pe]) v per head. q_*: (B, L, H, .), k_nope and v:
    (B, S, H, .), k_pe: (B, S, 1, rope) shared by all heads; mask: bool (True = attend) broadcastable to
    (B, 1, L, S), or is_causal. Returns (B, L, H, v_dim)."""
    q_len, kv_len = q_nope.shape[1], k_nope.shape[1]
    if is_causal:
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q_nope.device).tril()
    bias = None
    if mask is not None:  # additive, (Bm, L, S) with Bm in (1, B)
        mask = mask.reshape(-1, q_len, kv_len)
        bias = torch.zeros(mask.shape, dtype=q_nope.dtype, device=q_nope.device).masked_fill_(~mask, float("-inf"))
    return _MLAttentionCPU.apply(q_nope, q_pe, k_nope, k_pe, v, bias, scale)


class _MLAttentionCPU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_nope, q_pe, k_nope, k_pe, v, bias, scale):
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
            scores = _mm(q[i], k[i])
            if bias is not None:
                scores.add_(bias[(i // heads) % bias.shape[0]])
            torch.ops.aten._softmax.out(scores, -1, False, out=probs[i])
            out_heads[i // heads, i % heads] = _mm(probs[i], v_[i].t())
        ctx.save_for_backward(q, k, v_, probs)
        ctx.dims = (bsz, heads, nope, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, probs = ctx.saved_tensors
        bsz, heads, nope, scale = ctx.dims
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
            grad_p = _mm(g[i], v[i])  # dP = dO V^T
            torch.ops.aten._softmax_backward_data.out(grad_p, p, -1, q.dtype, grad_input=grad_s)
            grad_q[i] = _mm(grad_s, k[i].t())  # dQ = dS K (scale applied below)
            grad_k_t[i] = _mm(q_t[i], grad_s.t())  # dK^T = (scale Q)^T dS
            grad_v_t[i] = _mm(g_t[i], p.t())  # dV^T = dO^T P
        grad_q = grad_q.mul_(scale).view(bsz, heads, q_len, qk_dim).transpose(1, 2)
        grad_k = grad_k_t.view(bsz, heads, qk_dim, kv_len).permute(0, 3, 1, 2)  # (B, S, H, qk)
        grad_v = grad_v_t.view(bsz, heads, v_dim, kv_len).permute(0, 3, 1, 2)
        return (grad_q[..., :nope], grad_q[..., nope:], grad_k[..., :nope],
                grad_k[..., nope:].sum(2, keepdim=True), grad_v, None, None)
