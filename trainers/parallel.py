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

from flashops.model import _torchtitan_compat as compat


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

    from torchtitan.distributed.utils import set_spmd_backend

    set_spmd_backend("partial_dtensor")  # DTensor-based FSDP2/EP (what fully_shard + the MoE dispatcher use)
    dims = ParallelDims(dp_replicate=1, dp_shard=pspec.dp_shard if pspec.dp_shard > 0 else -1, cp=1, tp=1, pp=1,
                        ep=pspec.ep, world_size=world, spmd_backend="partial_dtensor")
    _register_fake_backend()
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
        compat.sum_reductions_for_gloo(model)  # gloo has no PREMUL_SUM
    return model



def _register_fake_backend() -> None:
    """Workaround: torchtitan gives size-1 mesh axes (e.g. efsdp when ep == world size) the "fake" c10d
    backend, whose process-group factory torch registers only in its testing package. Remove when torch
    registers it by default (or torchtitan stops creating groups for size-1 axes)."""
    import torch.testing._internal.distributed.fake_pg  # noqa: F401
