"""JoyAI-Flash: torchtitan's DeepSeek-V3 model with JoyAI-Flash's choices, a KV cache and MTP drafting.

    from flashops.model import JoyAIFlash, get_config
    model = JoyAIFlash(get_config("joyai-flash-debug"))
    out = model(tokens)                          # ModelOutput(logits, mtp_logits, hidden)
    cache = model.new_cache(batch=1, max_len=256)
    out = model(prompt, cache=cache, start_pos=0)  # then model(next_tok, cache=cache, start_pos=len(prompt))
    draft = model.draft(out.hidden, next_tok, k=3, cache=cache, start_pos=len(prompt) - 1)
    # continuous batching (what serving does): each row in its own cache slot at its own position
    h = model.forward_cached(tokens, cache, starts=[17, 4], slots=[3, 0]); logits = model.logits(h)

What comes from torchtitan (torchtitan.models.deepseek_v3 / common): the model and block classes, MLA
attention's projections and RoPE, the MoE (sigmoid router with a selection-only bias, grouped experts,
shared expert, token dispatch incl. expert parallelism), the MTP block layout, parameter init, FSDP/EP
sharding. What we add: an attention forward with an MLA latent KV cache and an SDPA path (CPU default),
an fp32 router with route normalisation x 2.5, experts that run fp32 on CPU and fake-quantize for QAT,
a DENSE MTP layer with a recursive draft path, and aux-loss-free bias updates at a configurable rate.

MTP alignment: `mtp_logits[:, i]` predicts the SAME target as `logits[:, i]` (tokens[:, i+1]), computed
by the MTP layer from the main hidden state at i-1 and the embedding of tokens[:, i] (the paper's
h'_{i-1} = eh_proj([enorm(emb(t_i)); hnorm(h_{i-1})])). So every output is causal, and
`mtp_logits[:, 0]` is zeros (no previous hidden state): leave position 0 out of the MTP loss.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
from torchtitan.models.common.config_utils import make_ffn_config
from torchtitan.models.common.moe import GroupedExperts, MoE, TokenChoiceTopKRouter
from torchtitan.models.common.param_init import depth_scaled_std
from torchtitan.models.deepseek_v3 import build_mla_moe_layers
from torchtitan.models.deepseek_v3.model import Attention, DeepSeekV3Model, DeepSeekV3TransformerBlock
from torchtitan.models.deepseek_v3.mtp import MTPTransformerBlock

from flashops.model import cpu_kernels
from flashops.model import torchtitan_compat as compat
from flashops.model.config import JoyAIConfig
from flashops.model.sampling import sample_tokens


class ModelOutput(NamedTuple):
    logits: torch.Tensor  # (B, L, V): logits[:, i] predicts tokens[:, i+1]
    mtp_logits: torch.Tensor | None  # (B, L, V), same targets, from the MTP layer; [:, 0] is zeros
    hidden: torch.Tensor  # (B, L, D) last main-layer output before the final norm (the MTP/draft input)


class DraftOutput(NamedTuple):
    tokens: torch.Tensor  # (B, k) drafted tokens following the last input token
    logits: torch.Tensor  # (B, k, V) the MTP logits each draft was chosen from
    hidden: torch.Tensor  # (B, 1, D) the MTP hidden state after the last draft


@dataclass
class LayerCache:
    """MLA caches the compressed latent (kv_lora_rank) and the roped key part per position, not K/V."""

    c_kv: torch.Tensor  # (B, max_len, kv_lora_rank), after kv_norm
    k_pe: torch.Tensor  # (B, max_len, qk_rope_head_dim), after RoPE


@dataclass(frozen=True)
class CacheSlots:
    """Where a cached forward's rows go: input row b is written to cache row rows[b] at positions
    positions[b] (starts[b], starts[b]+1, ...) and attends to that row's positions 0..positions[b, t].
    When every row starts at the same position in cache rows 0..B-1 (`start` is set), the cache is read
    and written by slicing and the mask is the plain causal one."""

    rows: torch.Tensor  # (B,) long
    positions: torch.Tensor  # (B, L) long: RoPE positions and cache positions
    start: int | None  # the shared start position when rows == 0..B-1, else None
    kv_len: int  # keys each query may see at most: max position + 1

    @property
    def rope_positions(self) -> torch.Tensor | None:
        return None if self.start == 0 else self.positions  # None = 0..L-1 (RoPE's own default)

    def attention_mask(self, q_len: int) -> tuple[torch.Tensor | None, bool]:
        """(mask, is_causal) for SDPA; mask True = attend. Stale cache entries past a row's position stay hidden."""
        device = self.positions.device
        if self.start is not None:
            if self.start == 0:
                return None, True
            q_pos = torch.arange(self.start, self.start + q_len, device=device)
            return torch.arange(self.kv_len, device=device).unsqueeze(0) <= q_pos.unsqueeze(1), False
        keys = torch.arange(self.kv_len, device=device).view(1, 1, self.kv_len)
        return (keys <= self.positions.unsqueeze(2)).unsqueeze(1), False


@dataclass
class KVCache:
    layers: list[LayerCache]
    mtp: LayerCache | None
    max_len: int

    @property
    def batch(self) -> int:
        return self.layers[0].c_kv.shape[0]

    def check(self, start_pos: int, length: int, batch: int) -> None:
        if start_pos < 0 or start_pos + length > self.max_len:
            raise ValueError(
                f"cache positions {start_pos}..{start_pos + length - 1} do not fit max_len={self.max_len}; "
                f"create the cache with model.new_cache(batch, max_len >= {start_pos + length})"
            )
        if batch > self.batch:
            raise ValueError(f"batch {batch} exceeds the cache's batch {self.batch}")

    def place(self, starts: int | list[int], length: int, batch: int, slots: list[int] | None = None,
              device=None) -> CacheSlots:
        """CacheSlots for `batch` rows of `length` tokens: a shared start (int) in rows 0..batch-1, or one
        start per row (list) in cache rows `slots` (default 0..batch-1)."""
        if isinstance(starts, int):
            starts = [starts] * batch
        slots = list(range(batch)) if slots is None else list(slots)
        if len(starts) != batch or len(slots) != batch:
            raise ValueError(f"{len(starts)} starts and {len(slots)} slots for {batch} rows: pass one of each per row")
        for s in starts:
            self.check(s, length, 1)
        bad = [r for r in slots if not 0 <= r < self.batch]
        if bad or len(set(slots)) != batch:
            raise ValueError(f"cache slots {slots}: each row needs its own slot in 0..{self.batch - 1} "
                             f"(create the cache with model.new_cache(batch >= {max(slots) + 1}, ...))")
        self.check(0, 0, batch)
        shared = starts[0] if all(s == starts[0] for s in starts) and slots == list(range(batch)) else None
        positions = torch.tensor(starts, device=device).unsqueeze(1) + torch.arange(length, device=device)
        return CacheSlots(torch.tensor(slots, device=device), positions, shared, max(starts) + length)

    @staticmethod
    def store(layer: LayerCache, at: CacheSlots, c_kv: torch.Tensor, k_pe: torch.Tensor, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write c_kv (B, L, r) and k_pe (B, L, rope) at `at`; return each row's keys 0..kv_len-1 in `dtype`
        (c_kv (B, S, r), k_pe (B, S, 1, rope))."""
        bsz, end = c_kv.shape[0], at.kv_len
        if at.start is not None:
            layer.c_kv[:bsz, at.start:end] = c_kv.to(layer.c_kv.dtype)
            layer.k_pe[:bsz, at.start:end] = k_pe.to(layer.k_pe.dtype)
            c_kv, k_pe = layer.c_kv[:bsz, :end], layer.k_pe[:bsz, :end]
        else:
            layer.c_kv[at.rows.unsqueeze(1), at.positions] = c_kv.to(layer.c_kv.dtype)
            layer.k_pe[at.rows.unsqueeze(1), at.positions] = k_pe.to(layer.k_pe.dtype)
            c_kv, k_pe = layer.c_kv[at.rows, :end], layer.k_pe[at.rows, :end]
        return c_kv.to(dtype), k_pe.unsqueeze(2).to(dtype)


# ---- attention -----------------------------------------------------------------------------------


class MLAttention(Attention):
    """torchtitan's MLA (same parameters), with a latent KV cache and an SDPA path for CPU."""

    @dataclass(kw_only=True, slots=True)
    class Config(Attention.Config):
        backend: str = "sdpa"  # "sdpa" or "flex"

    def __init__(self, config: Config):
        super().__init__(config)
        self.backend = config.backend

    def forward(self, x, attention_masks=None, positions=None, cache: LayerCache | None = None,
                at: CacheSlots | None = None):
        """Training: positions (B, L) for packed documents (restart at 0 per document), else causal.
        Inference: `cache` with `at` (where each row's tokens go; see CacheSlots)."""
        bsz, seqlen, _ = x.shape
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(bsz, seqlen, -1, self.qk_head_dim)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = torch.split(self.wkv_a(x), [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        q_pe, k_pe = self.rope(q_pe, k_pe.unsqueeze(2), at.rope_positions if cache is not None else positions)
        c_kv = self.kv_norm(c_kv)
        if cache is not None:
            c_kv, k_pe = KVCache.store(cache, at, c_kv, k_pe.squeeze(2), x.dtype)
            mask, is_causal = at.attention_mask(seqlen)
        else:
            mask, is_causal = _training_mask(positions, seqlen, x.device)
        kv_len = c_kv.shape[1]
        if cache is not None and self.absorb_pays(seqlen):
            out = self.absorbed_attention(q_nope, q_pe, c_kv, k_pe, mask, is_causal)
            return self.wo(out.reshape(bsz, seqlen, -1))
        kv = self.wkv_b(c_kv).view(bsz, kv_len, -1, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        if self.backend == "sdpa" and cpu_kernels.mla_attention_applies(q_nope, kv_len):  # CPU training
            out = cpu_kernels.mla_attention(q_nope, q_pe, k_nope, k_pe, v, mask=mask, is_causal=is_causal,
                                            scale=self.softmax_scale)
            return self.wo(out.reshape(bsz, seqlen, -1))
        k = torch.cat([k_nope, k_pe.expand(-1, -1, k_nope.size(2), -1)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)

        if self.backend == "flex" and cache is None:
            if x.is_cuda:
                out = self.inner_attention(q, k, v, attention_masks=attention_masks, scale=self.softmax_scale)
            else:
                out = compat.flex_attention_eager(q, k, v, attention_masks, self.softmax_scale)
        else:
            out = compat.sdpa(q, k, v, mask=mask, is_causal=is_causal, scale=self.softmax_scale)
        return self.wo(out.contiguous().view(bsz, seqlen, -1))

    def absorb_pays(self, q_len: int) -> bool:
        """Attend in the latent space for q_len new tokens (decode steps, MTP drafts and verifies)? Expanding the
        cache costs S*r*H*(nope+v) multiply-adds per call plus q_len*S*H*(nope+rope+v); absorbing costs
        q_len*S*H*(2r+rope) (and two small per-token products): absorb while q_len*(2r-nope-v) < r*(nope+v)
        (q_len < 128 on joyai-flash-small, < 170 on the 48B-A3B model)."""
        w = self.wkv_b.weight
        r, nope, v = self.kv_lora_rank, self.qk_nope_head_dim, self.v_head_dim
        return (type(w) in (torch.Tensor, torch.nn.Parameter) and self.wkv_b.bias is None
                and q_len * (2 * r - nope - v) < r * (nope + v))

    def absorbed_attention(self, q_nope, q_pe, c_kv, k_pe, mask, is_causal):
        """Attention straight from the latent cache, as DeepSeek-V2 decodes MLA: wkv_b's key half folds into
        the query and its value half into the output, so the S cached latents are never expanded per head.
        The same products as the expanded path, reassociated. q_*: (B, L, H, .), c_kv (B, S, r), k_pe
        (B, S, 1, rope); mask True = attend, (L, S) or (B, 1, L, S), or is_causal (L == S). Returns (B, L, H, v)."""
        bsz, q_len, heads, nope = q_nope.shape
        kv_len, rank = c_kv.shape[1], c_kv.shape[-1]
        w = self.wkv_b.weight.view(heads, nope + self.v_head_dim, rank)
        q_latent = torch.einsum("blhn,hnr->blhr", q_nope, w[:, :nope])
        q = torch.cat([q_latent, q_pe], dim=-1).reshape(bsz, q_len * heads, -1)  # heads fold into queries
        k = torch.cat([c_kv, k_pe.squeeze(2)], dim=-1)  # one latent key per position, shared by all heads
        softmax_dtype = torch.promote_types(c_kv.dtype, torch.float32)  # bf16 caches: the softmax in fp32
        scores = torch.bmm(q, k.transpose(1, 2)).view(bsz, q_len, heads, kv_len).to(softmax_dtype)
        scores = scores * self.softmax_scale
        if is_causal:
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=c_kv.device).tril()
        if mask is not None:
            scores.masked_fill_(~mask.reshape(-1, q_len, 1, kv_len), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(c_kv.dtype).view(bsz, q_len * heads, kv_len)
        out_latent = torch.bmm(probs, c_kv).view(bsz, q_len, heads, rank)
        return torch.einsum("blhr,hvr->blhv", out_latent, w[:, nope:])


def _training_mask(positions, q_len: int, device):
    """(mask, is_causal) for SDPA without a cache: plain causal, or causal within each packed document."""
    if positions is not None and positions.shape[0] > 0:
        # packed documents: positions restart at 0 for each document; attend only within a document
        doc = torch.cumsum((positions == 0).to(torch.int32), dim=1)
        same_doc = doc.unsqueeze(2) == doc.unsqueeze(1)
        causal = torch.ones(q_len, q_len, dtype=torch.bool, device=device).tril()
        return (same_doc & causal).unsqueeze(1), False
    return None, True


# ---- MoE pieces ----------------------------------------------------------------------------------


class JoyAIRouter(TokenChoiceTopKRouter):
    """Sigmoid scores in fp32 whatever the model dtype; top-k by score + bias (selection only);
    weights = the raw scores of the chosen experts, renormalised, x route_scale (2.5)."""

    @dataclass(kw_only=True, slots=True)
    class Config(TokenChoiceTopKRouter.Config):
        pass

    def forward(self, x_BLD, expert_bias_E=None):
        weight = self.gate.weight
        with torch.autocast(x_BLD.device.type, enabled=False):  # fp32 scores under bf16 autocast too
            scores_BLE = torch.sigmoid(F.linear(x_BLD.float(), weight.float()))
        choice_BLE = scores_BLE if expert_bias_E is None else scores_BLE + expert_bias_E.float()
        _, topk_ids_BLK = torch.topk(choice_BLE, k=self.top_k, dim=-1, sorted=False)
        topk_scores_BLK = scores_BLE.gather(-1, topk_ids_BLK)
        topk_scores_BLK = topk_scores_BLK / (topk_scores_BLK.sum(-1, keepdim=True) + 1e-20) * self.route_scale
        return topk_scores_BLK, topk_ids_BLK, scores_BLE


class JoyAIExperts(GroupedExperts):
    """torchtitan's grouped experts (same parameters, so EP sharding applies), computing in the weights'
    dtype on CPU, with INT4 fake quantization of the weights when QAT is on (see qat.py)."""

    @dataclass(kw_only=True, slots=True)
    class Config(GroupedExperts.Config):
        pass

    def __init__(self, config: Config):
        super().__init__(config)
        self.fake_quant = None  # set by flashops.model.qat.enable_qat: callable(weight) -> weight

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        ws = [w.to_local() if isinstance(w, DTensor) else w for w in (self.w1_EFD, self.w2_EDF, self.w3_EFD)]
        if self.fake_quant is not None:
            ws = [self.fake_quant(w) for w in ws]
        return ws[0], ws[1], ws[2]

    def forward(self, x_RD, num_tokens_per_expert_E):
        w1, w2, w3 = self.expert_weights()
        offs = torch.cumsum(num_tokens_per_expert_E, dim=0, dtype=torch.int32)
        h = F.silu(compat.grouped_mm(x_RD, w1.transpose(-2, -1), offs))
        h = h * compat.grouped_mm(x_RD, w3.transpose(-2, -1), offs)
        return compat.grouped_mm(h, w2.transpose(-2, -1), offs).type_as(x_RD)


class JoyAIMoE(MoE):
    """torchtitan's MoE; on CPU without EP/TP the dispatch runs through compat.moe_forward_cpu."""

    @dataclass(kw_only=True, slots=True)
    class Config(MoE.Config):
        pass

    def forward(self, x_BLD):
        if compat.moe_cpu_fast_path_applies(self, x_BLD):
            return compat.moe_forward_cpu(self, x_BLD)
        return super().forward(x_BLD)


# ---- blocks --------------------------------------------------------------------------------------


class JoyAIBlock(DeepSeekV3TransformerBlock):
    @dataclass(kw_only=True, slots=True)
    class Config(DeepSeekV3TransformerBlock.Config):
        pass

    def forward(self, x, attention_masks=None, positions=None, cache: LayerCache | None = None,
                at: CacheSlots | None = None):
        x = x + self.attention(self.attention_norm(x), attention_masks, positions, cache, at)
        ffn = self.moe if self.moe_enabled else self.feed_forward
        return x + ffn(self.ffn_norm(x))


class DenseMTPBlock(MTPTransformerBlock):
    """h' = eh_proj([enorm(emb(t_{i+1})); hnorm(h_i)]), then one MLA block with a dense MLP.
    Returns (pre-norm hidden, fed back when drafting recursively; mtp_norm of it, for the shared lm_head).
    The norm runs inside this forward so FSDP2, which wraps the block as one unit, has its weight gathered."""

    @dataclass(kw_only=True, slots=True)
    class Config(MTPTransformerBlock.Config):
        pass

    def forward(self, next_embed, prev_hidden, attention_masks=None, positions=None, cache=None, at=None):
        h = self.eh_proj(torch.cat([self.enorm(next_embed), self.hnorm(prev_hidden)], dim=-1))
        h = h + self.attention(self.attention_norm(h), attention_masks, positions, cache, at)
        h = h + self.feed_forward(self.ffn_norm(h))
        return h, self.mtp_norm(h)


# ---- config translation --------------------------------------------------------------------------


def _retype(cfg, new_config_cls, **changes):
    """Rebuild a torchtitan config dataclass as a subclass config (so build() makes our module)."""
    values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    values.update(changes)
    return new_config_cls(**values)


def _set_norm_eps(cfg, eps: float):
    if isinstance(cfg, RMSNorm.Config):
        cfg.eps = eps
    if dataclasses.is_dataclass(cfg):
        for f in dataclasses.fields(cfg):
            _set_norm_eps(getattr(cfg, f.name), eps)
    elif isinstance(cfg, list):
        for item in cfg:
            _set_norm_eps(item, eps)


def resolve_attention_backend(cfg: JoyAIConfig, device: torch.device | str | None = None) -> str:
    if cfg.attention != "auto":
        return cfg.attention
    return "flex" if torch.device(device or "cpu").type == "cuda" else "sdpa"


def torchtitan_config(cfg: JoyAIConfig, attention_backend: str = "sdpa") -> DeepSeekV3Model.Config:
    """The torchtitan DeepSeekV3Model.Config for a JoyAIConfig (our module classes swapped in)."""
    std = cfg.init_std
    linear_init = {"weight": partial(nn.init.trunc_normal_, std=std), "bias": nn.init.zeros_}
    norm_init = {"weight": nn.init.ones_}

    def depth_init(layer_id):
        return {"weight": partial(nn.init.trunc_normal_, std=depth_scaled_std(std, layer_id)), "bias": nn.init.zeros_}

    def experts_init(layer_id):
        deep = partial(nn.init.trunc_normal_, std=depth_scaled_std(std, layer_id))
        return {"w1_EFD": partial(nn.init.trunc_normal_, std=std), "w2_EDF": deep, "w3_EFD": deep}

    rope = ComplexRoPE.Config(dim=cfg.qk_rope_head_dim, max_seq_len=cfg.max_seq_len, theta=cfg.rope_theta)
    layers = build_mla_moe_layers(
        n_layers=cfg.n_layers, n_dense_layers=cfg.n_dense_layers, dim=cfg.dim, n_heads=cfg.n_heads,
        q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_nope_head_dim=cfg.qk_nope_head_dim,
        qk_rope_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim, mscale=1.0,
        dense_hidden_dim=cfg.dense_hidden_dim, moe_hidden_dim=cfg.moe_hidden_dim, num_experts=cfg.num_experts,
        num_shared_experts=max(cfg.num_shared_experts, 1), router_top_k=cfg.top_k, router_score_func="sigmoid",
        router_route_scale=cfg.route_scale, router_route_norm=True, attn_backend="flex",
        moe_comm_backend="standard", non_blocking_capacity_factor=None, linear_init=linear_init,
        norm_init=norm_init, depth_init=depth_init, depth_experts_init=experts_init, rope=rope,
    )
    for i, layer in enumerate(layers):
        layer.attention = _retype(layer.attention, MLAttention.Config, backend=attention_backend)
        if layer.moe is not None:
            moe = layer.moe
            moe.load_balance_coeff = cfg.bias_update_rate or 1e-3  # keeps the bias buffer; rate used: update_router_bias
            moe.router = _retype(moe.router, JoyAIRouter.Config)
            moe.routed_experts.inner_experts = _retype(moe.routed_experts.inner_experts, JoyAIExperts.Config)
            if cfg.num_shared_experts == 0:
                moe.shared_experts = None
            layer.moe = _retype(moe, JoyAIMoE.Config)
        layers[i] = _retype(layer, JoyAIBlock.Config)

    mtp_layers = []
    if cfg.num_mtp_layers:
        last = cfg.n_layers  # MTP sits after the last layer (also its HF index); depth-scaled init like one
        attn = dataclasses.replace(layers[0].attention)
        attn.wo = dataclasses.replace(attn.wo, param_init=depth_init(last))
        mtp_layers.append(DenseMTPBlock.Config(
            attention=attn,
            feed_forward=make_ffn_config(dim=cfg.dim, hidden_dim=cfg.dense_hidden_dim, w1_param_init=linear_init,
                                         w2w3_param_init=depth_init(last)),
            moe=None,
            attention_norm=RMSNorm.Config(normalized_shape=cfg.dim, param_init=norm_init),
            ffn_norm=RMSNorm.Config(normalized_shape=cfg.dim, param_init=norm_init),
            enorm=RMSNorm.Config(normalized_shape=cfg.dim, param_init=norm_init),
            hnorm=RMSNorm.Config(normalized_shape=cfg.dim, param_init=norm_init),
            eh_proj=Linear.Config(in_features=2 * cfg.dim, out_features=cfg.dim, param_init=linear_init),
            mtp_norm=RMSNorm.Config(normalized_shape=cfg.dim, param_init=norm_init),
        ))
    s = cfg.dim**-0.5
    tt = JoyAIFlash.Config(
        vocab_size=cfg.vocab_size, dim=cfg.dim,
        tok_embeddings=Embedding.Config(num_embeddings=cfg.vocab_size, embedding_dim=cfg.dim,
                                        param_init={"weight": partial(nn.init.normal_, std=1.0)}),
        norm=RMSNorm.Config(normalized_shape=cfg.dim, param_init=norm_init),
        lm_head=Linear.Config(in_features=cfg.dim, out_features=cfg.vocab_size,
                              param_init={"weight": partial(nn.init.trunc_normal_, std=s, a=-3 * s, b=3 * s)}),
        layers=layers, mtp_layers=mtp_layers, arch=cfg,
    )
    _set_norm_eps(tt, cfg.norm_eps)
    return tt


# ---- the model -----------------------------------------------------------------------------------


class JoyAIFlash(DeepSeekV3Model):
    """JoyAIFlash(JoyAIConfig). Builds on the current default device (use torch.device("meta") to count
    parameters without allocating); real devices get torchtitan's parameter init."""

    @dataclass(kw_only=True, slots=True)
    class Config(DeepSeekV3Model.Config):
        arch: JoyAIConfig = field(default_factory=JoyAIConfig)

    def __init__(self, config: JoyAIConfig | Config, *, device: torch.device | str | None = None):
        if isinstance(config, JoyAIConfig):
            config.validate()
            config = torchtitan_config(config, resolve_attention_backend(config, device))
        super().__init__(config)
        self.arch: JoyAIConfig = config.arch
        self.bias_update_rate = self.arch.bias_update_rate
        cpu_kernels.use_onednn_linears(self)
        if not any(p.is_meta for p in self.parameters()):
            self.init_states()

    # -- helpers
    @property
    def moe_layers(self) -> list[MoE]:
        return [b.moe for b in self.layers.values() if b.moe_enabled]

    @property
    def mtp(self) -> DenseMTPBlock | None:
        return self.mtp_layers[0] if self.mtp_layers is not None else None

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from main-model hidden states (ModelOutput.hidden / forward_cached's output)."""
        return self.lm_head(self.norm(h))

    def mtp_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits from pre-norm MTP hidden states (mtp_forward_cached's output)."""
        return self.lm_head(self.mtp.mtp_norm(h))

    def _masks(self, positions, batch, seqlen, device):
        """torchtitan's block mask for the flex path (causal, per document when positions are given)."""
        first = self.layers["0"].attention
        if first.backend != "flex":
            return None
        if positions is None:
            positions = torch.arange(seqlen, device=device).unsqueeze(0).expand(batch, -1)
        return self.get_attention_masks(positions)

    # -- forward
    def forward(self, tokens, positions=None, cache: KVCache | None = None, start_pos: int = 0, mtp: bool = True,
                mtp_trunk_grad: bool = True):
        """tokens (B, L). positions (B, L) only for packed documents (restart at 0 per document).
        With a cache: writes positions start_pos..start_pos+L-1 of cache rows 0..B-1 and attends to
        everything before; no MTP (forward_cached places each row on its own).
        mtp_trunk_grad=False: the MTP layer reads the trunk's hidden states as constants, so an MTP loss
        trains the MTP layer (and the shared embedding and head) but not the trunk's layers (post-training)."""
        bsz, seqlen = tokens.shape
        if cache is not None:
            if positions is not None:
                raise ValueError("positions (packed documents) is a training input; drop it when using a cache")
            h = self.forward_cached(tokens, cache, start_pos)
            return ModelOutput(self.logits(h), None, h)
        masks = self._masks(positions, bsz, seqlen, tokens.device)
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, masks, positions)
        logits = self.logits(h)
        mtp_logits = None
        if mtp and self.mtp is not None:
            mtp_logits = self._mtp_train_logits(tokens, h if mtp_trunk_grad else h.detach(), positions)
        return ModelOutput(logits, mtp_logits, h)

    def forward_cached(self, tokens: torch.Tensor, cache: KVCache, starts: int | list[int],
                       slots: list[int] | None = None) -> torch.Tensor:
        """The main model on tokens (B, L) with a KV cache; returns hidden states (B, L, D) (logits:
        `self.logits(h)`, ideally of only the positions you use). Row b is written to cache row slots[b]
        (default b) at positions starts[b]..starts[b]+L-1 and attends to that row's cache up to each of
        its positions, so the rows of a continuous batch can each sit at their own position."""
        at = cache.place(starts, tokens.shape[1], tokens.shape[0], slots, tokens.device)
        h = self.tok_embeddings(tokens)
        for layer, layer_cache in zip(self.layers.values(), cache.layers):
            h = layer(h, None, None, layer_cache, at)
        return h

    def mtp_forward_cached(self, hidden: torch.Tensor, tokens: torch.Tensor, cache: KVCache,
                           starts: int | list[int], slots: list[int] | None = None) -> torch.Tensor:
        """The MTP layer on pairs (hidden[b, t], tokens[b, t]) (main hidden state at position p, the token
        at p+1) at positions starts[b]+t of its own cache rows slots[b]; returns its pre-norm hidden states
        (B, L, D), the input of the next recursive step (logits: `self.mtp_logits(h)`)."""
        if self.mtp is None:
            raise ValueError("this model has no MTP layer (num_mtp_layers=0); drafting needs one")
        at = cache.place(starts, tokens.shape[1], tokens.shape[0], slots, tokens.device)
        h, _ = self.mtp(self.tok_embeddings(tokens), hidden, None, None, cache.mtp, at)
        return h

    def _mtp_train_logits(self, tokens, h, positions):
        bsz, seqlen = tokens.shape
        out = h.new_zeros(bsz, seqlen, self.arch.vocab_size)
        if seqlen < 2:
            return out
        prev_h, next_tok = h[:, :-1], tokens[:, 1:]
        mtp_pos = None
        if positions is not None:
            mtp_pos = positions[:, :-1]
            same_doc = (positions[:, 1:] == positions[:, :-1] + 1).unsqueeze(-1)
            prev_h = prev_h * same_doc.to(prev_h.dtype)  # no hidden state across a document boundary
        masks = self._masks(mtp_pos, bsz, seqlen - 1, tokens.device)
        _, m_normed = self.mtp(self.tok_embeddings(next_tok), prev_h, masks, mtp_pos)
        return torch.cat([out[:, :1], self.lm_head(m_normed)], dim=1)

    # -- inference
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> KVCache:
        p = next(self.parameters())
        dtype, device = dtype or p.dtype, device or p.device
        if max_len > self.arch.max_seq_len:
            raise ValueError(f"max_len={max_len} exceeds the model's max_seq_len={self.arch.max_seq_len}; "
                             f"lower max_len or raise max_seq_len in the model config")

        def one():
            return LayerCache(torch.zeros(batch, max_len, self.arch.kv_lora_rank, dtype=dtype, device=device),
                              torch.zeros(batch, max_len, self.arch.qk_rope_head_dim, dtype=dtype, device=device))

        return KVCache([one() for _ in self.layers], one() if self.mtp is not None else None, max_len)

    @torch.no_grad()
    def draft(self, hidden, tokens, k: int, cache: KVCache | None = None, start_pos: int = 0,
              temperature: float = 0.0, generator: torch.Generator | None = None) -> DraftOutput:
        """Draft k tokens (k = 1..3) with the MTP layer applied recursively.

        hidden (B, L, D): main-model hidden states (ModelOutput.hidden) at positions start_pos..start_pos+L-1;
        tokens (B, L): the token that FOLLOWS each of those positions (the last one is usually just sampled).
        The MTP cache is written at start_pos..start_pos+L-1 (+ the recursive steps, which later calls
        overwrite). Without a cache, start_pos must be 0 and hidden/tokens must hold the whole prefix.
        Greedy when temperature == 0, else sampled from softmax(logits / temperature)."""
        if self.mtp is None:
            raise ValueError("this model has no MTP layer (num_mtp_layers=0); drafting needs one")
        if not 1 <= k <= 8:
            raise ValueError(f"k={k}: draft between 1 and 3 tokens (the paper sees little gain above 3)")
        bsz, length = tokens.shape
        if cache is None:
            if start_pos:
                raise ValueError("without a cache, pass the whole prefix with start_pos=0")
            cache = self.new_cache(bsz, length + k, dtype=hidden.dtype, device=hidden.device)
        cache.check(start_pos, length + k - 1, bsz)
        h = self.mtp_forward_cached(hidden, tokens, cache, start_pos)[:, -1:]
        drafts, all_logits = [], []
        pos = start_pos + length
        for step in range(k):
            logits = self.mtp_logits(h)[:, -1].float()
            nxt = sample_tokens(logits, temperature, generator=generator).unsqueeze(1)
            drafts.append(nxt)
            all_logits.append(logits)
            if step + 1 < k:
                h = self.mtp_forward_cached(h, nxt, cache, pos)
                pos += 1
        return DraftOutput(torch.cat(drafts, 1), torch.stack(all_logits, 1), h)

    # -- aux-loss-free balancing
    def expert_load(self) -> torch.Tensor:
        """(n_moe_layers, num_experts) tokens routed to each expert since the last update_router_bias()."""
        loads = [m.tokens_per_expert_E for m in self.moe_layers]
        loads = [t.to_local() if isinstance(t, DTensor) else t for t in loads]
        return torch.stack(loads).detach().clone() if loads else torch.zeros(0, self.arch.num_experts)

    @torch.no_grad()
    def update_router_bias(self) -> torch.Tensor:
        """Call after each optimizer step: nudge each expert's selection bias toward uniform load
        (bias += rate * sign(mean_load - load), centred), then reset the counts. Sums the counts over
        all ranks first when torch.distributed is initialised. Returns the load it used."""
        load = self.expert_load()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and load.numel():
            torch.distributed.all_reduce(load)
        for i, moe in enumerate(self.moe_layers):
            if self.bias_update_rate > 0:
                delta = self.bias_update_rate * torch.sign(load[i].mean() - load[i])
                bias = moe.expert_bias_E
                bias = bias.to_local() if isinstance(bias, DTensor) else bias
                bias.add_((delta - delta.mean()).to(bias.device))
            counts = moe.tokens_per_expert_E
            (counts.to_local() if isinstance(counts, DTensor) else counts).zero_()
        return load


def count_params(cfg: JoyAIConfig) -> dict[str, int]:
    """Parameter counts from a model built on the meta device (no memory allocated)."""
    with torch.device("meta"):
        model = JoyAIFlash(cfg)
    total = body = embeddings = mtp = 0
    for name, p in model.named_parameters():
        n = p.numel()
        if name.startswith("mtp_layers."):
            mtp += n
            continue
        total += n
        if name in ("tok_embeddings.weight", "lm_head.weight"):
            embeddings += n
    routed = sum(m.routed_experts.inner_experts.w1_EFD.numel() * 3 for m in model.moe_layers)
    active_routed = routed * cfg.top_k // cfg.num_experts
    body = total - embeddings - routed + active_routed
    return {
        "total_params": total,
        "active_params": body,
        "active_params_with_embeddings": body + embeddings,
        "embedding_params": embeddings,
        "mtp_params": mtp,
    }
