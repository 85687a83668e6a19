"""`flashops plan`: per-rank memory of a TrainingRun (or every stage of a TrainingPipeline) at its real world
size, before any GPU is scheduled. The model is built on the meta device and parallelized by the trainer's
own code (trainers/parallel.py: torchtitan's EP sharding plan + FSDP2 `fully_shard` of every block, the
experts on the expert-FSDP mesh) over a fake process group of world_size ranks: torchtitan's own dry-run
technique ("fake" c10d backend), so no GPU, network or memory is needed. Parameter, gradient and optimizer
bytes are read off rank 0's local shards (the optimizer's state is created by one step on meta tensors);
activations come from flashops.api.plan.activation_bytes, which a 2-process test checks against a real run.

    plans = plan_file("examples/pretrain-48b.yaml", gpus=64, gpu_memory="80GiB")
    plans[0].fits, plans[0].per_rank.total, plans[0].fix
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch

from flashops.api import plan as arithmetic
from flashops.api.spec import TrainingPipeline, TrainingRun, pipeline_stage_run


def runs_of(objects: Iterable) -> list[TrainingRun]:
    """Every TrainingRun, and every stage of every TrainingPipeline, in file order."""
    runs = []
    for obj in objects:
        if isinstance(obj, TrainingRun):
            runs.append(obj)
        elif isinstance(obj, TrainingPipeline):
            runs += [pipeline_stage_run(obj, i, None) for i, s in enumerate(obj.spec.stages) if not s.is_eval]
    return runs


def model_config(run: TrainingRun):
    from flashops.trainers.checks import model_config_of

    return model_config_of(run)


def arithmetic_plan(run: TrainingRun, gpus: int | None = None, gpu_memory: int | None = None) -> arithmetic.RunPlan:
    """The torch-free plan (what validate and the operator use)."""
    return arithmetic.plan_run(run.metadata.name, run.spec, model_config(run), gpus, gpu_memory)


@contextlib.contextmanager
def fake_process_group(world_size: int):
    """A process group of world_size ranks in this one process (rank 0), no communication."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("flashops plan needs its own process: torch.distributed is already initialised here")
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


def measure_state_bytes(model, optimizers) -> dict[str, int]:
    """Bytes of this rank's parameters, gradients and optimizer state (local shards of DTensors)."""
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    def nbytes(t):
        t = local(t)
        return t.numel() * t.element_size()

    params = [p for p in model.parameters() if p.requires_grad]
    state = 0
    for o in optimizers:
        for s in o.state.values():
            state += sum(nbytes(v) for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {"params": sum(nbytes(p) for p in params),
            "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer": state}


def sharded_state_bytes(run: TrainingRun, gpus: int | None = None) -> dict[str, int]:
    """Rank 0's parameter, gradient and optimizer bytes from the real parallelization at world size, on a fake
    process group, model and optimizer state on the meta device."""
    from types import SimpleNamespace

    from flashops.trainers import parallel
    from flashops.trainers.optim import build_optimizers

    spec, lay = run.spec, arithmetic.layout(run.spec, gpus)
    cfg = model_config(run)
    pspec = SimpleNamespace(ep=lay["ep"], dp_shard=-1)
    with fake_process_group(lay["world_size"]):
        d = parallel.init_distributed(pspec, world_size=lay["world_size"])
        with torch.device("meta"):
            model = parallel.build_model(cfg, d, pspec)
        model = parallel.parallelize(model, d, pspec, compute_dtype=torch.bfloat16 if lay["compute_bytes"] == 2
                                     else torch.float32, qat=spec.qat.mode == "int4")
        optimizers = build_optimizers(model, spec.optimizer)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for o in optimizers:  # creates the state (moments, momentum) on the meta device
            o.step()
        return measure_state_bytes(model, optimizers)


def torch_plan(run: TrainingRun, gpus: int | None = None, gpu_memory: int | None = None) -> arithmetic.RunPlan:
    """The plan with parameter, gradient and optimizer bytes from the real sharding on a fake process group."""
    plan = arithmetic_plan(run, gpus, gpu_memory)
    measured = sharded_state_bytes(run, gpus)
    expected = {k: getattr(plan.per_rank, k) for k in measured}
    if measured != expected:
        plan.notes.append(f"the torch-free arithmetic differs from the sharded model: {expected} vs {measured} "
                          "(the sharded model's figures are used)")
    for k, v in measured.items():
        setattr(plan.per_rank, k, v)
    if plan.gpu_memory is not None:
        plan.fits = plan.per_rank.total <= arithmetic.usable(plan.gpu_memory)
    return plan


def plan_file(objects: Iterable, gpus: int | None = None, gpu_memory: int | str | None = None,
              shard: bool = True) -> list[arithmetic.RunPlan]:
    """A plan per run in `objects` (parsed spec objects). gpu_memory: bytes or '80GiB'; default: the run's
    resources.gpuMemory. shard=False: the torch-free arithmetic only."""
    plans = []
    memory = arithmetic.parse_bytes(gpu_memory) if gpu_memory is not None else None
    for run in runs_of(objects):
        plans.append(torch_plan(run, gpus, memory) if shard else arithmetic_plan(run, gpus, memory))
    return plans
