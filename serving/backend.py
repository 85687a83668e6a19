"""JoyAIFlash as the engine's `Backend`: one KV cache with a row per slot, and batched forward passes
where every row sits at its own position (continuous batching).

`JoyAIFlash.forward(tokens, cache=, start_pos=)` takes one start position for the whole batch and
writes cache rows [0, B): right for one sequence, but the sequences of a continuous batch are all at
different positions in different cache rows. So this module runs the model's own submodules (the
same weights and the same MLA math as flashops.model.MLAttention.forward) with per-row positions and
slot indices. tests/serving/test_backend.py checks it against `JoyAIFlash.forward` row by row.
It can shrink to a thin wrapper once the model's cached forward accepts per-row start positions and
cache slots (asked of the model's owner).
"""
from __future__ import annotations

import torch

from flashops.model import _torchtitan_compat as compat
from flashops.model.model import JoyAIFlash, LayerCache, MLAttention


class JoyAIBackend:
    def __init__(self, model: JoyAIFlash, slots: int, max_len: int):
        if max_len > model.arch.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={model.arch.max_seq_len}")
        self.model = model.eval()
        self.slots, self.max_len = slots, max_len
        self.vocab_size = model.arch.vocab_size
        self.has_mtp = model.mtp is not None
        with torch.inference_mode():
            self.cache = model.new_cache(slots, max_len)

    @torch.inference_mode()
    def forward(self, slots: list[int], tokens: torch.Tensor, starts: list[int],
                logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows, positions = self._rows_positions(slots, tokens, starts)
        h = self.model.tok_embeddings(tokens)
        for layer, cache in zip(self.model.layers.values(), self.cache.layers):
            h = h + _attention(layer.attention, layer.attention_norm(h), cache, rows, positions)
            h = h + (layer.moe if layer.moe_enabled else layer.feed_forward)(layer.ffn_norm(h))
        return self.model._head(_pick(h, logits_at)).float(), h

    @torch.inference_mode()
    def mtp(self, slots: list[int], hidden: torch.Tensor, tokens: torch.Tensor, starts: list[int],
            logits_at: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        rows, positions = self._rows_positions(slots, tokens, starts)
        mtp = self.model.mtp
        h = mtp.eh_proj(torch.cat([mtp.enorm(self.model.tok_embeddings(tokens)), mtp.hnorm(hidden)], dim=-1))
        h = h + _attention(mtp.attention, mtp.attention_norm(h), self.cache.mtp, rows, positions)
        h = h + mtp.feed_forward(mtp.ffn_norm(h))
        return self.model._mtp_head(_pick(h, logits_at)).float(), h

    def _rows_positions(self, slots, tokens, starts):
        length = tokens.shape[1]
        if max(starts) + length > self.max_len:
            raise ValueError(f"positions up to {max(starts) + length - 1} exceed the cache (max_len={self.max_len})")
        rows = torch.tensor(slots)
        return rows, torch.tensor(starts).unsqueeze(1) + torch.arange(length).unsqueeze(0)


def _pick(h: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
    """Only the positions whose logits are used (prefill: the last prompt token; MTP catch-up: the last
    new pair): the vocabulary projection is the biggest matmul per position at a real vocabulary."""
    return h if at is None else h[torch.arange(h.shape[0]), at].unsqueeze(1)


def _attention(attn: MLAttention, x: torch.Tensor, cache: LayerCache, rows: torch.Tensor,
               positions: torch.Tensor) -> torch.Tensor:
    """MLA with a latent cache; row b of x sits at positions[b] in cache row rows[b]."""
    bsz, seqlen, _ = x.shape
    q = attn.wq(x) if attn.q_lora_rank == 0 else attn.wq_b(attn.q_norm(attn.wq_a(x)))
    q = q.view(bsz, seqlen, -1, attn.qk_head_dim)
    q_nope, q_pe = torch.split(q, [attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    c_kv, k_pe = torch.split(attn.wkv_a(x), [attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    q_pe, k_pe = attn.rope(q_pe, k_pe.unsqueeze(2), positions)
    c_kv = attn.kv_norm(c_kv)
    cache.c_kv[rows.unsqueeze(1), positions] = c_kv.to(cache.c_kv.dtype)
    cache.k_pe[rows.unsqueeze(1), positions] = k_pe.squeeze(2).to(cache.k_pe.dtype)
    kv_len = int(positions.max()) + 1
    c_kv = cache.c_kv[rows, :kv_len].to(x.dtype)
    k_pe = cache.k_pe[rows, :kv_len].unsqueeze(2).to(x.dtype)
    kv = attn.wkv_b(c_kv).view(bsz, kv_len, -1, attn.qk_nope_head_dim + attn.v_head_dim)
    k_nope, v = torch.split(kv, [attn.qk_nope_head_dim, attn.v_head_dim], dim=-1)
    k = torch.cat([k_nope, k_pe.expand(-1, -1, k_nope.size(2), -1)], dim=-1)
    q = torch.cat([q_nope, q_pe], dim=-1)
    # each query sees its own row's keys up to its own position; stale entries past it stay hidden
    mask = (torch.arange(kv_len).view(1, 1, kv_len) <= positions.unsqueeze(2)).unsqueeze(1)
    out = compat.sdpa(q, k, v, mask=mask, is_causal=False, scale=attn.softmax_scale)
    return attn.wo(out.contiguous().view(bsz, seqlen, -1))
