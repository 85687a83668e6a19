"""Speculative decoding's acceptance rules (Leviathan et al. 2023; DeepSeek-V3 / JoyAI MTP serving).

The MTP layer drafts k tokens d_1..d_k (with draft distributions q_1..q_k); the main model scores
[last, d_1, .., d_k] in one forward pass, giving target distributions p_1..p_{k+1}. Then:

* greedy: accept the longest prefix where d_i == argmax p_i, then append argmax p_{n+1}. The output
  is token for token the one plain greedy decoding produces.
* sampling: accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample
  from the residual norm(max(0, p_i - q_i)) and stop; if all k are accepted, sample a bonus token from
  p_{k+1}. Each emitted token is distributed exactly as p (the plain sampler's distribution).

Every step therefore emits between 1 and k+1 tokens; `accepted` (0..k) feeds the acceptance metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from flashops.model.sampling import sample


@dataclass(frozen=True)
class Verdict:
    tokens: list[int]  # emitted this step: accepted drafts, then one token from the main model
    accepted: int  # how many drafts were accepted (0..k)


def accept_greedy(draft: list[int], target_logits: torch.Tensor) -> Verdict:
    """target_logits: [k+1, V] main-model logits at the positions of [last, d_1..d_k]."""
    return accept_greedy_targets(draft, target_logits.argmax(-1).tolist())


def accept_greedy_targets(draft: list[int], target: list[int]) -> Verdict:
    """The greedy rule on the main model's argmax tokens [k+1] (already read back, for a whole batch)."""
    n = 0
    while n < len(draft) and draft[n] == target[n]:
        n += 1
    return Verdict(tokens=target[: n + 1], accepted=n)


def accept_sampling(draft: list[int], draft_probs: torch.Tensor, target_probs: torch.Tensor,
                    generator: torch.Generator) -> Verdict:
    """draft_probs: [k, V] the q_i each d_i was sampled from; target_probs: [k+1, V] the p_i.

    Both come from `sampling.token_probs` with the request's temperature and top_p.
    """
    k = len(draft)
    tokens: list[int] = []
    for i in range(k):
        d = draft[i]
        p, q = float(target_probs[i, d]), float(draft_probs[i, d])
        u = float(torch.rand((), generator=generator))
        if q > 0.0 and u * q < p:  # u < p/q without dividing
            tokens.append(d)
            continue
        residual = (target_probs[i] - draft_probs[i]).clamp_min(0.0)
        mass = float(residual.sum())
        # mass == 0 only when p == q, where the draft is always accepted; guard against rounding
        tokens.append(sample(residual / mass if mass > 1e-12 else target_probs[i], generator))
        return Verdict(tokens=tokens, accepted=i)
    tokens.append(sample(target_probs[k], generator))
    return Verdict(tokens=tokens, accepted=k)
