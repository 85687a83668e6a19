"""The paper's difficulty curriculum for RL prompts (DESIGN.md, "The training pipeline").

    target   mu_t = 0.8 + (0.2 - 0.8) * t / T              (easy prompts first, harder ones later)
    weight   w_i  = exp(-0.5 * ((p_i - mu_t) / 0.15) ** 2)  (p_i: the prompt's pass rate)
    group    a domain g is chosen with probability proportional to sqrt(N_g)

    sampler = CurriculumSampler(groups=["arithmetic", "sorting", ...], total_steps=T)
    idx = sampler.sample(step, n=8, seed=0)     # prompt indices; then, after the rollouts:
    sampler.update(idx, pass_rates)             # observed per-prompt pass rates (group means)

Pass rates start unknown (0.5) and become the running mean of what the rollouts observe. Sampling is a
pure function of (seed, step, pass rates), so saving `state_dict()` is enough for an exact resume.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict

import torch

MU_START, MU_END, WIDTH, PRIOR = 0.8, 0.2, 0.15, 0.5


def target_pass_rate(step: int, total_steps: int) -> float:
    return MU_START + (MU_END - MU_START) * step / max(total_steps, 1)


def prompt_weight(pass_rate, mu: float):
    """w_i = exp(-0.5 ((p_i - mu) / 0.15)^2); works on floats and tensors."""
    if isinstance(pass_rate, torch.Tensor):
        return torch.exp(-0.5 * ((pass_rate - mu) / WIDTH) ** 2)
    return math.exp(-0.5 * ((pass_rate - mu) / WIDTH) ** 2)


class CurriculumSampler:
    def __init__(self, groups: list[str], total_steps: int, enabled: bool = True):
        if not groups:
            raise ValueError("the RL prompt pool is empty")
        self.groups = list(groups)
        self.total_steps = total_steps
        self.enabled = enabled
        self.members: dict[str, list[int]] = defaultdict(list)
        for i, g in enumerate(self.groups):
            self.members[g].append(i)
        self.names = sorted(self.members)
        self.pass_rate = torch.full((len(groups),), PRIOR, dtype=torch.float64)
        self.seen = torch.zeros(len(groups), dtype=torch.float64)

    def group_probs(self) -> dict[str, float]:
        z = sum(math.sqrt(len(self.members[g])) for g in self.names)
        return {g: math.sqrt(len(self.members[g])) / z for g in self.names}

    def weights(self, step: int) -> torch.Tensor:
        return prompt_weight(self.pass_rate, target_pass_rate(step, self.total_steps))

    def sample(self, step: int, n: int, seed: int = 0) -> list[int]:
        rng = random.Random(f"curriculum:{seed}:{step}")
        if not self.enabled:
            return [rng.randrange(len(self.groups)) for _ in range(n)]
        probs = self.group_probs()
        w = self.weights(step)
        out = []
        for _ in range(n):
            g = rng.choices(self.names, weights=[probs[x] for x in self.names])[0]
            idx = self.members[g]
            gw = [float(w[i]) + 1e-12 for i in idx]  # never all-zero
            out.append(rng.choices(idx, weights=gw)[0])
        return out

    def update(self, indices: list[int], pass_rates: list[float]) -> None:
        for i, p in zip(indices, pass_rates):
            self.seen[i] += 1
            self.pass_rate[i] += (p - self.pass_rate[i]) / self.seen[i] if self.seen[i] > 1 else p - self.pass_rate[i]

    def state_dict(self) -> dict:
        return {"pass_rate": self.pass_rate.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.pass_rate.copy_(state["pass_rate"])
        self.seen.copy_(state["seen"])
