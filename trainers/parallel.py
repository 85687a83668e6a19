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

    dims = ParallelDims(dp_replicate=1, dp_shard=pspec.dp_shard if pspec.dp_shard > 0 else -1, cp=1, tp=1, pp=1,
                        ep=pspec.ep, world_size=world, spmd_backend="partial_dtensor")
    dims.build_mesh() if hasattr(dims, "build_mesh") else None
    return Dist(dist.get_rank(), world, device, dims)


def parallelize(model, d: Dist, pspec):
    if d.world_size == 1:
        return model
    from torchtitan.models.deepseek_v3.mtp import apply_fsdp_to_mtp_decoder

    dims = d.dims
    if dims.ep_enabled:
        model.parallelize(dims)
    edp_mesh = dims.get_optional_mesh(["efsdp"]) if dims.ep_enabled else None
    apply_fsdp_to_mtp_decoder(model, dims.get_mesh(["fsdp"]), param_dtype=torch.float32, reduce_dtype=torch.float32,
                              pp_enabled=False, ep_degree=dims.ep, edp_mesh=edp_mesh)
    return model
