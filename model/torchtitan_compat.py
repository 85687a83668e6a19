"""Workarounds for running torchtitan 0.3.0's deepseek_v3 components with torch 2.13, mostly on CPU. The ONE
place for them; each says why and when it can go. (The CPU kernels themselves, and how they are chosen, are
flashops.model.cpu_kernels: those are not workarounds but a speed choice measured on the machine.)

1. `grouped_mm`: torchtitan's GroupedExperts casts to bf16 for `torch._grouped_mm` (a CUDA kernel
   requirement). On CPU the fp32 kernel exists and is faster, but its backward rejects expanded
   (stride-0) output gradients, e.g. from `y.sum().backward()` ("Invalid strides/sizes, got [0, 0]").
   We pass the gradient through `contiguous()` first (or take cpu_kernels' oneDNN grouped matmul).
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
7. `register_fake_backend`: torchtitan gives size-1 mesh axes (e.g. efsdp when ep == world size) the "fake"
   c10d backend, whose process-group factory torch registers only in its testing package, so building the
   mesh fails with "Unknown c10d backend type fake". We import that package to register it. Remove when
   torch registers it by default (or torchtitan stops creating groups for size-1 axes).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from flashops.model import cpu_kernels


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
    if torch.is_autocast_enabled("cpu"):  # autocast does not cover _grouped_mm: cast the (fp32 master) weights here
        b_t = b_t.to(torch.get_autocast_dtype("cpu"))
    a = a.to(b_t.dtype)
    if cpu_kernels.grouped_linear_applies(a, b_t):
        return cpu_kernels.grouped_linear(a, b_t.transpose(-2, -1), offs)
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


def register_fake_backend() -> None:
    """Make torch's "fake" c10d backend available before torchtitan builds meshes with size-1 axes."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401
