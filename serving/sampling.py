"""A request's sampling parameters. The sampler itself (`token_probs`, `sample`) is the project's one,
flashops.model.sampling: plain decoding and speculative decoding (both the MTP draft and the main model's
verification) draw through it, which is what makes rejection sampling preserve the distribution exactly.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from flashops.model.sampling import sample, token_probs  # noqa: F401 - the serving side's names

DEFAULT_MAX_TOKENS = 256


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens}: must be >= 1")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature={self.temperature}: must be within [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be within (0, 1]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self) -> torch.Generator:
        """A private RNG per request: concurrent requests never perturb each other's samples."""
        return torch.Generator().manual_seed(self.seed if self.seed is not None else random.getrandbits(63))
