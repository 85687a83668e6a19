"""Log-probabilities of generated tokens, as OpenAI's `logprobs` / `top_logprobs` report them.

They are the model's own log-softmax over the vocabulary at each generated position (before temperature
and top-p, as OpenAI and vLLM report them), computed by one forward pass of the main model over prompt plus
generation after the request finished. That costs one prefill-sized pass, only for requests that ask, and
keeps the decoding loop (plain and MTP-speculative) free of per-token bookkeeping.

    scores = token_scores(model, prompt_ids, generated_ids, top=2)
    completion_logprobs(scores, decode)   # {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    chat_logprobs(scores, decode)         # {"content": [{"token", "logprob", "bytes", "top_logprobs"}]}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from flashops.serving.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprob, TopLogprob


@dataclass(frozen=True)
class TokenScore:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the `top` most likely tokens at this position, most likely first


@torch.inference_mode()
def token_scores(model: torch.nn.Module, prompt: list[int], generated: list[int], top: int) -> list[TokenScore]:
    """Each generated token's log-probability given everything before it, plus the `top` alternatives."""
    if not generated:
        return []
    tokens = torch.tensor([list(prompt) + list(generated[:-1])])
    logits = model(tokens, mtp=False).logits[0, len(prompt) - 1:]
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp[torch.arange(len(generated)), torch.tensor(generated)].tolist()
    if top:
        values, ids = logp.topk(top, dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [[] for _ in generated]
    return [TokenScore(t, lp, tp) for t, lp, tp in zip(generated, chosen, tops)]


def completion_logprobs(scores: list[TokenScore], decode: Callable[[list[int]], str]) -> CompletionLogprobs:
    tokens = [decode([s.token_id]) for s in scores]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    tops = [{decode([i]): lp for i, lp in s.top} for s in scores]
    return CompletionLogprobs(tokens=tokens, token_logprobs=[s.logprob for s in scores],
                              top_logprobs=tops if any(s.top for s in scores) else None, text_offset=offsets)


def chat_logprobs(scores: list[TokenScore], decode: Callable[[list[int]], str]) -> ChatLogprobs:
    def entry(token_id: int, logprob: float) -> dict:
        text = decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return ChatLogprobs(content=[
        TokenLogprob(**entry(s.token_id, s.logprob), top_logprobs=[TopLogprob(**entry(i, lp)) for i, lp in s.top])
        for s in scores])
