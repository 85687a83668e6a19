"""JoyAIFlash as the engine's `Backend`: one KV cache with a row per slot, and batched forward passes
where every row sits at its own position (continuous batching).

A thin wrapper: the model's own cached forward (`forward_cached` / `mtp_forward_cached`, per-row start
positions and cache slots) and its heads (`logits` / `mtp_logits`), so serving runs the one MLA attention
the model trains with. tests/serving/test_int4_and_backend.py checks it against `JoyAIFlash.forward`.

On a GPU (`device="cuda"`, usually with `dtype=torch.bfloat16`) the weights and the KV cache live there; the
engine keeps building its small token tensors on the CPU, so they move in here, and the logits come back to
the CPU for the sampler (one copy per step, which also makes the step's time the real one). Hidden states stay
on the device between the main pass and the MTP calls.
"""
from __future__ import annotations

import torch

from flashops.model.model import JoyAIFlash


class JoyAIBackend:
    def __init__(self, model: JoyAIFlash, slots: int, max_len: int, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None):
        if max_len > model.arch.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={model.arch.max_seq_len}")
        self.model = place(model, device, dtype).eval()
        self.device = next(model.parameters()).device
        self.slots, self.max_len = slots, max_len
        self.vocab_size = model.arch.vocab_size
        self.has_mtp = model.mtp is not None
        with torch.inference_mode():
            self.cache = model.new_cache(slots, max_len)

    @torch.inference_mode()
    def forward(self, slots: list[int], tokens: torch.Tensor, starts: list[int],
                logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.forward_cached(tokens.to(self.device), self.cache, list(starts), list(slots))
        return self.model.logits(_pick(h, logits_at)).float().cpu(), h

    @torch.inference_mode()
    def mtp(self, slots: list[int], hidden: torch.Tensor, tokens: torch.Tensor, starts: list[int],
            logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.model.mtp_forward_cached(hidden.to(self.device), tokens.to(self.device), self.cache, list(starts),
                                          list(slots))
        return self.model.mtp_logits(_pick(h, logits_at)).float().cpu(), h


def place(model: JoyAIFlash, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> JoyAIFlash:
    """Move the model (in place) to `device` and cast its real floating-point weights and buffers to `dtype`.
    Not `model.to(dtype=...)`: that also casts the complex RoPE tables to a real dtype (dropping the imaginary
    part: wrong positions, and only a warning), and packed INT4 weights must stay integers."""
    if device is not None:
        model.to(device=device)
    if dtype is not None:
        for t in [*model.parameters(), *model.buffers()]:
            if t.is_floating_point():
                t.data = t.data.to(dtype)
    return model


def _pick(h: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
    """Only the positions whose logits are used (prefill: the last prompt token; MTP catch-up: the last
    new pair): the vocabulary projection is the biggest matmul per position at a real vocabulary."""
    return h if at is None else h[torch.arange(h.shape[0], device=h.device), at.to(h.device)].unsqueeze(1)


def mtp_cost_ratio(backend: JoyAIBackend, context: int = 32, repeats: int = 20) -> float:
    """The measured cost of one MTP call relative to one main decoding pass on this model and machine: the fastest
    of `repeats` one-token MTP steps over the fastest one-token main step (the least-disturbed runs on a busy
    machine), after a `context`-token prefill, the two interleaved. `speculative.mtpTokens: auto` weighs acceptance against it
    (flashops.api.promotion.choose_mtp_tokens: acceptance_length(k) / (1 + k x ratio)); flashops eval records it."""
    import time

    if not backend.has_mtp:
        raise ValueError("the model has no MTP layer (num_mtp_layers=0): there is no MTP call to measure")
    context = max(1, min(context, backend.max_len - 2))
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, backend.vocab_size, (1, context), generator=g)
    _, hidden = backend.forward([0], prompt, [0], logits_at=torch.tensor([context - 1]))
    token = prompt[:, -1:]
    last = hidden[:, -1:]
    main, mtp = [], []
    for i in range(repeats + 2):  # the first two are warm-up
        t0 = time.perf_counter()
        _, h = backend.forward([0], token, [context])
        t1 = time.perf_counter()
        backend.mtp([0], last, token, [context])
        t2 = time.perf_counter()
        if i >= 2:
            main.append(t1 - t0)
            mtp.append(t2 - t1)
        last = h
    return min(mtp) / min(main)  # the least-disturbed run of each: the machine may be busy
