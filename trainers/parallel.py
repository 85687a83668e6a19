"""Process groups and model sharding. Every process trains on its GPU when there is one, else on the CPU.
One process: nothing to shard. Several (torchrun): gloo on CPU, NCCL on GPU; FSDP2 over all ranks and expert
parallelism over `ep` ranks, through torchtitan's own code (ParallelDims for the meshes, the model's
parallelize() for EP, apply_fsdp_to_mtp_decoder for FSDP2).

    dist = init_distributed(spec.parallelism)       # Dist(rank, world_size, device)
    model = parallelize(model, dist, spec.parallelism)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from flashops.model import torchtitan_compat as compat


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    dims: object = None


def init_distributed(pspec, world_size: int | None = None) -> Dist:
    """world_size: given by `flashops plan` (a fake process group already initialised, meta tensors, CPU
    mesh); else WORLD_SIZE from torchrun."""
    world = world_size or int(os.environ.get("WORLD_SIZE", "1"))
    # a process trains on the GPU when torch sees one (CUDA_VISIBLE_DEVICES= keeps it on the CPU); a plan's
    # fake process group stays on the CPU
    device = "cuda" if torch.cuda.is_available() and world_size is None else "cpu"
    if world == 1:
        return Dist(device=device)
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    from torchtitan.distributed import ParallelDims

    from torchtitan.distributed.utils import set_spmd_backend

    set_spmd_backend("partial_dtensor")  # DTensor-based FSDP2/EP (what fully_shard + the MoE dispatcher use)
    dims = ParallelDims(dp_replicate=1, dp_shard=pspec.dp_shard if pspec.dp_shard > 0 else -1, cp=1, tp=1, pp=1,
                        ep=pspec.ep, world_size=world, spmd_backend="partial_dtensor")
    compat.register_fake_backend()  # torchtitan gives size-1 mesh axes the "fake" backend
    compat.build_device_mesh(dims)  # torchtitan assumes CUDA when no accelerator is visible
    return Dist(dist.get_rank(), world, device, dims)


def build_model(cfg, d: Dist, pspec):
    """JoyAIFlash for this process layout. With expert parallelism the torchtitan config carries the
    DeepSeek-V3 sharding plan (set before the modules are built), so model.parallelize() shards experts."""
    from flashops.model import JoyAIFlash

    if d.world_size == 1 or pspec.ep == 1:
        return JoyAIFlash(cfg)
    from torchtitan.models.deepseek_v3.sharding import set_deepseek_v3_sharding_config

    from flashops.model.model import resolve_attention_backend, torchtitan_config

    tt = torchtitan_config(cfg.validate(), resolve_attention_backend(cfg, d.device))
    set_deepseek_v3_sharding_config(tt, enable_sp=False, enable_ep=True)
    return JoyAIFlash(tt)


def reshard(model) -> None:
    """Put every FSDP2 unit of `model` back to its shards. FSDP2's root unit stays gathered after a forward
    without a backward (RL's generation, an evaluation), and its module then holds the gathered parameters: an
    optimizer built, or a state dict read, at that moment would see those instead of the shards."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def apply_activation_checkpointing(model, mode: str) -> None:
    """torchtitan's activation checkpointing on every block (model.layers): "full" recomputes each block in
    backward (keeps only its input), "selective" is torchtitan's op-level SAC (keeps matmul / attention /
    communication outputs, every second matmul recomputed, recomputes the rest); "none" leaves the model as is.
    Apply before FSDP, as torchtitan does."""
    if mode == "none":
        return
    from torchtitan.distributed.activation_checkpoint import FullAC, SelectiveAC

    policy = {"full": FullAC, "selective": SelectiveAC}[mode]
    policy.Config().build().apply(model)


def apply_compile(model, enabled: bool, device: str) -> bool:
    """torch.compile each block (torchtitan compiles per block too). On CPU it does not pay for these models
    (and needs a C++ toolchain): skipped with a warning. Returns whether it compiled."""
    if not enabled:
        return False
    if device == "cpu":
        import warnings

        warnings.warn("training.compile: true is ignored on CPU (torch.compile of the blocks pays on GPUs only); "
                      "set training.compile: false to silence this", stacklevel=2)
        return False
    for layer_id, block in model.layers.named_children():
        model.layers.register_module(layer_id, torch.compile(block, fullgraph=False))
    return True


def parallelize(model, d: Dist, pspec, compute_dtype: torch.dtype = torch.float32, qat: bool = False):
    """FSDP2 (+ EP) over the process group. Sharded parameters, gradients and optimizer state stay fp32;
    FSDP2 gathers parameters in `compute_dtype` and reduces gradients in fp32, as torchtitan does
    (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)). With QAT the routed experts are gathered in
    fp32 (their own FSDP unit) so fake quantization sees the fp32 masters, exactly what export rounds."""
    if d.world_size == 1:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from torchtitan.models.deepseek_v3.mtp import apply_fsdp_to_mtp_decoder

    dims = d.dims
    if dims.ep_enabled:
        model.parallelize(dims)
    edp_mesh = dims.get_optional_mesh(["efsdp"]) if dims.ep_enabled else None
    dp_mesh = dims.get_mesh(["fsdp"])
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    if qat and compute_dtype != torch.float32:
        from torch.distributed.tensor import Shard

        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        for moe in model.moe_layers:  # torchtitan's placement: Shard(1) when efsdp x ep exceeds the experts
            experts = moe.routed_experts.inner_experts
            placement = Shard(1) if d.world_size > experts.num_experts else Shard(0)
            fully_shard(experts, mesh=edp_mesh if edp_mesh is not None else dp_mesh, mp_policy=fp32,
                        shard_placement_fn=lambda p, placement=placement: placement)
    if model.mtp is not None:
        # JoyAIFlash calls the MTP block's norm outside the block's forward (the MTP head), so it needs its
        # own FSDP unit (inner units are wrapped first) to be gathered when called.
        fully_shard(model.mtp.mtp_norm, mesh=dp_mesh, mp_policy=policy)
    apply_fsdp_to_mtp_decoder(model, dp_mesh, param_dtype=compute_dtype, reduce_dtype=torch.float32,
                              pp_enabled=False, ep_degree=dims.ep, edp_mesh=edp_mesh)
    if d.device == "cpu":
        compat.sum_reductions_for_gloo(model)  # gloo has no PREMUL_SUM
    return model
