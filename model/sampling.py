"""Turning logits into tokens, the one sampler: temperature, top-p (nucleus), greedy, seeded generators.

`token_probs` defines the distribution a token is drawn from. Serving (plain decoding and both sides of
MTP speculative decoding, which is what makes its rejection sampling preserve the distribution exactly),
the model's MTP drafting and RL rollouts all draw through it.

    probs = token_probs(logits, temperature=0.7, top_p=0.9)   # (..., V) fp32
    token = sample(probs[0], generator)                       # one int from a 1-D distribution
    tokens = sample_tokens(logits, 1.0, generator=g)          # (B,) from (B, V) logits; argmax at temperature 0
"""
from __future__ import annotations

import torch


def token_probs(logits: torch.Tensor, temperature: float, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities over the vocabulary (last dim), fp32. temperature 0 -> one-hot argmax."""
    logits = logits.float()
    if temperature == 0.0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the top token is always kept)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def where_generator_draws(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """A seeded generator draws on its own device: probs on another one are copied there (serving's
    per-request CPU generators over GPU logits: a row per token), so a seed is one stream on every device."""
    if generator is not None and generator.device != probs.device:
        return probs.to(generator.device)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One token from a 1-D distribution."""
    return int(torch.multinomial(where_generator_draws(probs, generator), 1, generator=generator))


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of logits (B, V) -> (B,) long: argmax at temperature 0 (no draw, so the generator
    is untouched), else a draw from token_probs."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = where_generator_draws(token_probs(logits, temperature, top_p), generator)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)
