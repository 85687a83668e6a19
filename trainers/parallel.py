"""Process groups and model sharding. One process: nothing to do. Several (torchrun): gloo on CPU, NCCL
on GPU; FSDP2 over all ranks and expert parallelism over `ep` ranks, through torchtitan's own code
(ParallelDims for the meshes, the model's parallelize() for EP, apply_fsdp_to_mtp_decoder for FSDP2).

    dist = init_distributed(spec.parallelism)       # Dist(rank, world_size, device)
    model = parallelize(model, dist, spec.parallelism)
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    dims: object = None


def init_distributed(pspec) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    from torchtitan.distributed import ParallelDims

    _torchtitan_cpu_mesh(device)
    from torchtitan.distributed.utils import set_spmd_backend

    set_spmd_backend("partial_dtensor")  # DTensor-based FSDP2/EP (what fully_shard + the MoE dispatcher use)
    dims = ParallelDims(dp_replicate=1, dp_shard=pspec.dp_shard if pspec.dp_shard > 0 else -1, cp=1, tp=1, pp=1,
                        ep=pspec.ep, world_size=world, spmd_backend="partial_dtensor")
    dims.build_mesh() if hasattr(dims, "build_mesh") else None
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


def parallelize(model, d: Dist, pspec):
    if d.world_size == 1:
        return model
    from torchtitan.models.deepseek_v3.mtp import apply_fsdp_to_mtp_decoder

    dims = d.dims
    if dims.ep_enabled:
        model.parallelize(dims)
    edp_mesh = dims.get_optional_mesh(["efsdp"]) if dims.ep_enabled else None
    dp_mesh = dims.get_mesh(["fsdp"])
    if model.mtp is not None:
        # JoyAIFlash calls the MTP block's norm outside the block's forward (the MTP head), so it needs its
        # own FSDP unit (inner units are wrapped first) to be gathered when called.
        from torch.distributed.fsdp import fully_shard

        fully_shard(model.mtp.mtp_norm, mesh=dp_mesh)
    apply_fsdp_to_mtp_decoder(model, dp_mesh, param_dtype=torch.float32, reduce_dtype=torch.float32,
                              pp_enabled=False, ep_degree=dims.ep, edp_mesh=edp_mesh)
    if d.device == "cpu":
        _gloo_sum_reductions(model)
    return model


def _torchtitan_cpu_mesh(device: str) -> None:
    """Workaround: torchtitan 0.3.0 picks its mesh device type once at import, defaulting to "cuda" when no
    accelerator exists, so building a mesh on a CPU-only torch calls torch.cuda.set_device and fails.
    Point it at "cpu" (gloo). Remove when torchtitan falls back to "cpu" in tools.utils.device_type."""
    if device != "cpu":
        return
    import torchtitan.distributed.parallel_dims as pd

    pd.device_type = "cpu"
    # torchtitan gives size-1 mesh axes (e.g. efsdp when ep == world size) the "fake" c10d backend, whose
    # process-group factory torch registers only in its testing package.
    import torch.testing._internal.distributed.fake_pg  # noqa: F401


def _gloo_sum_reductions(model) -> None:
    """Workaround: FSDP2 scales gradients inside the reduce-scatter with ReduceOp.PREMUL_SUM when a divide
    factor is set (torchtitan sets one for the experts), which gloo does not implement. Ask for plain sums
    with separate scaling instead. Remove when gloo supports PREMUL_SUM or FSDP falls back by itself."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
