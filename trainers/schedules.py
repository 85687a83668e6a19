"""Learning-rate schedules as pure functions of the step (so the step alone restores them on resume).

    lr_at(step, total, OptimizerSpec(lr=3e-3, schedule="wsd", warmup_steps=10, decay_fraction=0.2))

constant: warmup, then lr.   cosine: warmup, then cosine from lr to min_lr.
wsd (warmup-stable-decay): warmup, lr held, then a linear decay to min_lr over the last decay_fraction.
min_lr defaults to lr / 10.
"""
from __future__ import annotations

import math


def lr_at(step: int, total: int, opt) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total`."""
    lr = opt.lr
    min_lr = opt.min_lr if opt.min_lr is not None else lr / 10
    warm = opt.warmup_steps
    if warm and step < warm:
        return lr * (step + 1) / warm
    if opt.schedule == "constant":
        return lr
    span = max(total - warm - 1, 1)  # the last step reaches min_lr
    progress = min(max(step - warm, 0) / span, 1.0)
    if opt.schedule == "cosine":
        return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_start = 1.0 - opt.decay_fraction
    if progress <= decay_start or opt.decay_fraction == 0:
        return lr
    return lr + (min_lr - lr) * (progress - decay_start) / opt.decay_fraction
