"""Optimizers: AdamW, or Muon (torch's own) for the 2-D hidden matrices with AdamW for the rest.

    optimizers = build_optimizers(model, OptimizerSpec(name="muon", lr=2e-2))
    for o in optimizers: o.step()

Muon orthogonalises 2-D updates, so it takes the hidden weight matrices; embeddings, the output head,
norms, biases and the 3-D grouped expert tensors stay on AdamW (torch's Muon accepts 2-D parameters
only). Muon's lr is rescaled per shape to match AdamW's update RMS (adjust_lr_fn="match_rms_adamw"),
so one lr serves both groups. Each param group keeps its base lr in "base_lr"; `set_lr` scales it.
"""
from __future__ import annotations

import torch

_ADAM_ONLY = ("tok_embeddings", "lm_head")


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.dim() < 2


def _adamw_kernel(named) -> dict:
    """torch's fused AdamW (one pass per tensor; about 3x the per-tensor loop on CPU, benchmarks/
    model_throughput.py), except for DTensor (FSDP/EP) parameters, which keep the per-tensor loop."""
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for _, p in named):
        return {"foreach": False}
    return {"fused": True}


def build_optimizers(model: torch.nn.Module, spec) -> list[torch.optim.Optimizer]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    betas = tuple(spec.betas)
    wd = spec.weight_decay
    if spec.name == "adamw":
        decay = [p for n, p in named if not _no_decay(n, p)]
        rest = [p for n, p in named if _no_decay(n, p)]
        groups = [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=spec.lr, betas=betas, **_adamw_kernel(named))
        return _with_base_lr([opt])
    muon = [p for n, p in named if p.dim() == 2 and not n.startswith(_ADAM_ONLY)]
    muon_ids = {id(p) for p in muon}
    adam_decay = [p for n, p in named if id(p) not in muon_ids and not _no_decay(n, p)]
    adam_rest = [p for n, p in named if id(p) not in muon_ids and _no_decay(n, p)]
    opts = [
        torch.optim.Muon(muon, lr=spec.lr, weight_decay=wd, adjust_lr_fn="match_rms_adamw"),
        torch.optim.AdamW([{"params": adam_decay, "weight_decay": wd}, {"params": adam_rest, "weight_decay": 0.0}],
                          lr=spec.lr, betas=betas, **_adamw_kernel(named)),
    ]
    return _with_base_lr(opts)


def _with_base_lr(opts):
    for o in opts:
        for g in o.param_groups:
            g["base_lr"] = g["lr"]
    return opts


def set_lr(optimizers, lr: float, base: float) -> None:
    for o in optimizers:
        for g in o.param_groups:
            g["lr"] = g["base_lr"] * lr / base
