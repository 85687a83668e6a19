"""The paper's difficulty curriculum for RL prompts (DESIGN.md, "The training pipeline").

    target   mu_t = 0.8 + (0.2 - 0.8) * t / (T - 1)    (t = 0..T-1: 0.8 at the first step, 0.2 at the last)
    weight   w_i  = exp(-0.5 * ((p_i - mu_t) / 0.15) ** 2)  (p_i: the prompt's pass rate)
    group    a domain g is chosen with probability proportional to sqrt(N_g) (N_g: its active prompts)

    sampler = CurriculumSampler(groups=["arithmetic", "sorting", ...], total_steps=T)
    sampler.set_profile(rates, rollouts=10, drop_solved=True)   # once, before step 0 (the paper's profiling)
    idx = sampler.sample(step, n=8, seed=0)     # prompt indices; then, after the rollouts:
    sampler.update(idx, pass_rates, rollouts=8) # observed per-prompt pass rates (group means)

As published, pass rates are first profiled with K rollouts of the starting checkpoint and prompts it
already solves (K of K right) are dropped (drop_unsolved also drops those it never solves, 0 of K);
without a profile they start unknown (0.5). Either way they become the running mean of every rollout seen
(the profile counts as its K rollouts). Sampling is a pure function of (seed, step, pass rates, active
prompts), so saving `state_dict()` (the profile included) is enough for an exact resume that does not profile
again.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict

import torch

MU_START, MU_END, WIDTH, PRIOR = 0.8, 0.2, 0.15, 0.5


def target_pass_rate(step: int, total_steps: int) -> float:
    """mu_t for step t = 0..T-1: MU_START at the first step, MU_END at the last (t = T - 1)."""
    return MU_START + (MU_END - MU_START) * min(step, total_steps - 1) / max(total_steps - 1, 1)


def prompt_weight(pass_rate, mu: float):
    """w_i = exp(-0.5 ((p_i - mu) / 0.15)^2); works on floats and tensors."""
    if isinstance(pass_rate, torch.Tensor):
        return torch.exp(-0.5 * ((pass_rate - mu) / WIDTH) ** 2)
    return math.exp(-0.5 * ((pass_rate - mu) / WIDTH) ** 2)


def solved_and_unsolved(pass_rates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks of the profiled prompts every rollout solved (K of K) and none did (0 of K)."""
    return pass_rates >= 1.0, pass_rates <= 0.0


class CurriculumSampler:
    def __init__(self, groups: list[str], total_steps: int, enabled: bool = True):
        if not groups:
            raise ValueError("the RL prompt pool is empty")
        self.groups = list(groups)
        self.total_steps = total_steps
        self.enabled = enabled
        self.pass_rate = torch.full((len(groups),), PRIOR, dtype=torch.float64)
        self.seen = torch.zeros(len(groups), dtype=torch.float64)  # rollouts observed per prompt
        self.active = torch.ones(len(groups), dtype=torch.bool)    # False: dropped (solved when profiled)
        self.profiled = False
        self._index()

    def _index(self) -> None:
        self.members: dict[str, list[int]] = defaultdict(list)
        for i, g in enumerate(self.groups):
            if self.active[i]:
                self.members[g].append(i)
        self.names = sorted(self.members)

    def group_probs(self) -> dict[str, float]:
        z = sum(math.sqrt(len(self.members[g])) for g in self.names)
        return {g: math.sqrt(len(self.members[g])) / z for g in self.names}

    def weights(self, step: int) -> torch.Tensor:
        return prompt_weight(self.pass_rate, target_pass_rate(step, self.total_steps))

    def set_profile(self, pass_rates, rollouts: int, drop_solved: bool = True,
                    indices: list[int] | None = None, drop_unsolved: bool = False) -> int:
        """The profile of the starting policy: pass rates of `indices` (default: every prompt) from `rollouts`
        rollouts each. Prompts not profiled leave the pool; with drop_solved so do those solved every time, and
        with drop_unsolved those never solved. Returns how many profiled prompts were dropped (none when that
        would empty the pool)."""
        idx = list(range(len(self.groups))) if indices is None else list(indices)
        rates = torch.as_tensor(pass_rates, dtype=torch.float64)
        if rates.shape != (len(idx),):
            raise ValueError(f"{rates.shape[0] if rates.dim() else 0} pass rates for {len(idx)} profiled prompts")
        keep = torch.zeros(len(self.groups), dtype=torch.bool)
        keep[idx] = True
        self.pass_rate[idx] = rates
        self.seen[idx] = float(rollouts)
        drop = torch.zeros(len(self.groups), dtype=torch.bool)
        solved, unsolved = solved_and_unsolved(rates)
        drop[idx] = (solved & drop_solved) | (unsolved & drop_unsolved)
        dropped = 0
        if bool((keep & ~drop).any()):
            dropped = int((keep & drop).sum())
            keep &= ~drop
        self.active = keep
        self.profiled = True
        self._index()
        return dropped

    def sample(self, step: int, n: int, seed: int = 0) -> list[int]:
        rng = random.Random(f"curriculum:{seed}:{step}")
        if not self.enabled:
            pool = [i for i in range(len(self.groups)) if self.active[i]]
            return [pool[rng.randrange(len(pool))] for _ in range(n)]
        probs = self.group_probs()
        w = self.weights(step)
        out = []
        for _ in range(n):
            g = rng.choices(self.names, weights=[probs[x] for x in self.names])[0]
            idx = self.members[g]
            gw = [float(w[i]) + 1e-12 for i in idx]  # never all-zero
            out.append(rng.choices(idx, weights=gw)[0])
        return out

    def update(self, indices: list[int], pass_rates: list[float], rollouts: int = 1) -> None:
        """Online update: each prompt's pass rate is the mean over every rollout seen (profile included)."""
        for i, p in zip(indices, pass_rates):
            self.seen[i] += rollouts
            self.pass_rate[i] += (p - self.pass_rate[i]) * rollouts / self.seen[i]

    def state_dict(self) -> dict:
        return {"pass_rate": self.pass_rate.clone(), "seen": self.seen.clone(),
                "active": self.active.clone(), "profiled": torch.tensor(int(self.profiled))}

    def load_state_dict(self, state: dict) -> None:
        self.pass_rate.copy_(state["pass_rate"])
        self.seen.copy_(state["seen"])
        self.active = state["active"].clone().bool()
        self.profiled = bool(int(state["profiled"]))
        self._index()
