"""Losses as pure functions of tensors: FiberPO (the paper's Definition 3.1), GRPO and GSPO with one
signature, the DPO sigmoid loss, and masked token cross-entropy.

    from flashops.trainers.losses import fiberpo_loss
    loss, stats = fiberpo_loss(logprobs, old_logprobs, advantages, mask)   # all [B, T]
    loss.backward(); stats["gated_ratio"]                                  # G, [B, T]

Policy losses: `logprobs` are the current policy's log-probabilities of the sampled tokens (with grad),
`old_logprobs` the rollout policy's, `advantages` per token, `mask` 1 on response tokens. Every policy
loss returns -J with J = mean over trajectories of the per-trajectory token mean of (ratio term x A),
so on-policy they all equal the plain policy-gradient objective.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from flashops.api.spec import FIBERPO_C_PLUS_SHARE  # the default C+/C- split, decided in the spec


def _lengths(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T_tau clamped to >= 1, which trajectories have any response token)."""
    n = mask.sum(-1)
    return n.clamp(min=1), n > 0


def _trajectory_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """mean over trajectories (with a response) of the per-trajectory token mean of x."""
    t, valid = _lengths(mask)
    per_traj = (x * mask).sum(-1) / t
    return (per_traj * valid).sum() / valid.sum().clamp(min=1)


def _check(logprobs, old_logprobs, advantages, mask):
    """(mask as floats, log r, advantages), with masked positions set to 0 BEFORE any arithmetic.

    Padding can carry anything (-inf old log-probs, NaN advantages): multiplying by the mask afterwards
    would still give inf * 0 = NaN, so the masked values are selected away with `where`, whose gradient
    to the unselected side is exactly 0."""
    shapes = {t.shape for t in (logprobs, old_logprobs, advantages, mask)}
    if len(shapes) != 1 or logprobs.dim() != 2:
        raise ValueError("logprobs, old_logprobs, advantages and mask must all be [B, T]; got "
                         f"{[tuple(t.shape) for t in (logprobs, old_logprobs, advantages, mask)]}")
    keep = mask.bool()
    zero = logprobs.new_zeros(())
    log_r = torch.where(keep, logprobs - torch.where(keep, old_logprobs.to(logprobs.dtype), zero), zero)
    adv = torch.where(keep, advantages.to(logprobs.dtype), zero)
    return keep.to(logprobs.dtype), log_r, adv


def gate(x: torch.Tensor, c: float, t: torch.Tensor) -> torch.Tensor:
    """g(x, C, T): identity inside |x| <= C, a rollback line of slope -T back to 0 at (1 + 1/T) C, then 0."""
    ax = x.abs()
    rollback = torch.sign(x) * (t + 1) * c - t * x
    return torch.where(ax <= c, x, torch.where(ax < (1 + 1 / t) * c, rollback, torch.zeros_like(x)))


def _band(delta: float, c_plus: float | None, c_minus: float | None) -> tuple[float, float]:
    if c_plus is None and c_minus is None:
        return delta * FIBERPO_C_PLUS_SHARE, delta * (1 - FIBERPO_C_PLUS_SHARE)
    if c_plus is None:
        c_plus = delta - c_minus
    if c_minus is None:
        c_minus = delta - c_plus
    if abs(c_plus + c_minus - delta) > 1e-9 or c_plus <= 0 or c_minus <= 0:
        raise ValueError(f"c_plus {c_plus} + c_minus {c_minus} must be positive and add up to delta {delta}")
    return c_plus, c_minus


def fiberpo_loss(logprobs, old_logprobs, advantages, mask, *, eps: float = 0.2, delta: float = 0.4,
                 c_plus: float | None = None, c_minus: float | None = None):
    """FiberPO (DESIGN.md, "FiberPO"): trajectory weight from the gated sign-split means of log r, times a
    clipped per-token fiber residual. Returns (-J, stats) with stats["gated_ratio"] = G [B, T]."""
    m, log_r, advantages = _check(logprobs, old_logprobs, advantages, mask)
    c_plus, c_minus = _band(delta, c_plus, c_minus)
    t, _ = _lengths(m)
    log_s_plus = log_r.clamp(min=0).sum(-1) / t   # (1/T) sum max(log r, 0)
    log_s_minus = (-log_r).clamp(min=0).sum(-1) / t
    log_w = gate(log_s_plus, c_plus, t) - gate(log_s_minus, c_minus, t)  # [B]
    # l_i = sign(log r_i), with 0 counted positive: then log G = log r exactly inside the trust region,
    # so on-policy the gradient is the plain policy gradient (the s+/s- terms cancel).
    sign = torch.where(log_r >= 0, 1.0, -1.0).to(log_r.dtype)
    s_same = torch.where(sign > 0, log_s_plus.unsqueeze(-1), log_s_minus.unsqueeze(-1))
    s_other = torch.where(sign > 0, log_s_minus.unsqueeze(-1), log_s_plus.unsqueeze(-1))
    u = sign * log_r - s_same
    v = -s_other
    r_tilde = torch.exp((sign * u).clamp(-eps, eps) - (sign * v).clamp(-eps, eps))
    g = torch.exp(log_w).unsqueeze(-1) * r_tilde * m
    loss = -_trajectory_mean(g * advantages, m)
    with torch.no_grad():
        ratio = torch.exp(log_r)
        in_band = ((log_s_plus > c_plus) | (log_s_minus > c_minus)).float()
    return loss, {
        "gated_ratio": g,
        "ratio": ratio * m,
        "log_s_plus": log_s_plus.detach(),
        "log_s_minus": log_s_minus.detach(),
        "trajectory_weight": torch.exp(log_w).detach(),
        "gated_fraction": in_band.mean(),
    }


def grpo_loss(logprobs, old_logprobs, advantages, mask, *, eps: float = 0.2, eps_high: float | None = None,
              delta: float = 0.4, c_plus: float | None = None, c_minus: float | None = None):
    """GRPO: the PPO clipped surrogate per token, min(r A, clip(r, 1 - eps, 1 + eps_high) A), eps_high
    defaulting to eps. delta/c_* are unused."""
    m, log_r, advantages = _check(logprobs, old_logprobs, advantages, mask)
    lo, hi = 1 - eps, 1 + (eps if eps_high is None else eps_high)
    ratio = torch.exp(log_r)
    surrogate = torch.minimum(ratio * advantages, ratio.clamp(lo, hi) * advantages)
    loss = -_trajectory_mean(surrogate, m)
    with torch.no_grad():
        clipped = ((ratio < lo) | (ratio > hi)).float() * m
        # the ratio that effectively multiplies A (its gradient is 0 where the min picked the clipped side)
        effective = torch.where(ratio * advantages <= ratio.clamp(lo, hi) * advantages, ratio, ratio.clamp(lo, hi))
    return loss, {"gated_ratio": effective * m, "ratio": ratio * m,
                  "clip_fraction": clipped.sum() / m.sum().clamp(min=1)}


def gspo_loss(logprobs, old_logprobs, advantages, mask, *, eps: float = 3e-4, eps_high: float | None = 4e-4,
              delta: float = 0.4, c_plus: float | None = None, c_minus: float | None = None):
    """GSPO (token form): the sequence ratio s = exp(mean log r) carried per token as
    sg(s) * exp(logprob - sg(logprob)), clipped PPO-style at [1 - eps, 1 + eps_high] (GSPO paper,
    arXiv 2507.18071: 3e-4 / 4e-4). delta/c_* are unused."""
    m, log_r, advantages = _check(logprobs, old_logprobs, advantages, mask)
    lo, hi = 1 - eps, 1 + (eps if eps_high is None else eps_high)
    t, _ = _lengths(m)
    log_s = log_r.sum(-1, keepdim=True) / t.unsqueeze(-1)
    # log r's gradient is d logprob on response tokens and exactly 0 on masked ones
    s_tok = torch.exp(log_s.detach() + log_r - log_r.detach())
    surrogate = torch.minimum(s_tok * advantages, s_tok.clamp(lo, hi) * advantages)
    loss = -_trajectory_mean(surrogate, m)
    with torch.no_grad():
        seq = torch.exp(log_s).expand_as(m)
        clipped = ((seq < lo) | (seq > hi)).float() * m
    return loss, {"gated_ratio": seq * m, "ratio": torch.exp(log_r) * m,
                  "clip_fraction": clipped.sum() / m.sum().clamp(min=1)}


POLICY_LOSSES = {"fiberpo": fiberpo_loss, "grpo": grpo_loss, "gspo": gspo_loss}


def kl_penalty(logprobs, ref_logprobs, mask) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token, trajectory-averaged like the policy losses."""
    keep = mask.bool()
    m = keep.to(logprobs.dtype)
    zero = logprobs.new_zeros(())
    d = torch.where(keep, torch.where(keep, ref_logprobs.to(logprobs.dtype), zero) - logprobs, zero)
    return _trajectory_mean(torch.exp(d) - d - 1, m)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's group-relative advantages: (r - mean of the group) / (std of the group + eps). rewards [N]."""
    r = rewards.view(-1, group_size)
    a = (r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True, unbiased=False) + eps)
    return a.view(-1)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1,
             nll_weight: float = 0.0, chosen_tokens: torch.Tensor | None = None):
    """The DPO sigmoid loss on summed response log-probs [B]. Equals log 2 when policy == reference.

    nll_weight > 0 adds nll_weight x the chosen responses' per-token NLL (policy_chosen / chosen_tokens), as
    RPO does (arXiv 2404.19733): the DPO term alone can lower the chosen answer's likelihood together with the
    rejected one's, which on near-identical pairs (a sorted list and its shuffle) costs the answers SFT taught."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = chosen_reward - rejected_reward
    loss = -F.logsigmoid(margin).mean()
    with torch.no_grad():
        stats = {"reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean(),
                 "chosen_reward": chosen_reward.mean(), "rejected_reward": rejected_reward.mean()}
    if nll_weight > 0:
        if chosen_tokens is None:
            raise ValueError("nll_weight > 0 needs chosen_tokens, the number of response tokens of each chosen row")
        nll = (-policy_chosen / chosen_tokens.clamp(min=1).to(policy_chosen.dtype)).mean()
        loss = loss + nll_weight * nll
        stats["chosen_nll"] = nll.detach()
    return loss, stats


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under logits, [B, T, V] x [B, T] -> [B, T], computed in fp32."""
    return -F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of token CE over mask, number of masked tokens); callers divide by the global count."""
    nll = -token_logprobs(logits, targets)
    m = mask.to(nll.dtype)
    return (nll * m).sum(), m.sum()


LOG2 = math.log(2.0)
