"""JoyAI-Flash architecture configs and presets: the ONE validator of a spec's `model:` block. No torch here:
the spec loader (so `flashops validate`, the operator's admission of an object and the trainer's spec file),
the trainer's preflight and `flashops model info` all call `get_config`; flashops.model re-exports it.

    from flashops.api.architecture import get_config
    cfg = get_config("joyai-flash-debug", {"vocab_size": 2048})       # or {"vocabSize": 2048}: both spellings
    cfg.param_counts()   # {'total_params': ..., 'active_params': ..., ...}

    flashops model info joyai-flash-48b-a3b --json     # the same figures, counted on the meta device

Override names: a JoyAIConfig field in snake_case (`n_layers`) or its camelCase spelling (`nLayers`, as
everywhere else in a YAML spec). Anything else is refused, with a hint naming a field that is accepted.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, Literal



# Fields a run may set differently from the checkpoint it starts from (initFrom): how it computes (the attention
# kernel), how it trains (the router-bias rate; the init of weights the checkpoint then overwrites) and free-form
# notes. Every other field shapes the weights, and a difference there is refused.
RUN_TIME_FIELDS = frozenset({"attention", "extra", "bias_update_rate", "init_std"})


class ConfigError(ValueError):
    """A bad model config value. Names the field, the value and how to fix it."""

    def __init__(self, field: str, value: Any, fix: str):
        self.field, self.value, self.fix = field, value, fix
        super().__init__(f"model config field '{field}' = {value!r}: {fix}")


@dataclass
class JoyAIConfig:
    """The architecture (DeepSeek-V3 family with JoyAI-Flash's choices). Defaults are the paper's 48B-A3B."""

    preset: str = "joyai-flash-48b-a3b"
    vocab_size: int = 129_280
    dim: int = 2048
    n_layers: int = 40
    n_dense_layers: int = 1  # the first layers use a dense SwiGLU FFN, the rest are MoE
    dense_hidden_dim: int = 7168
    norm_eps: float = 1e-6
    # MLA attention
    n_heads: int = 32
    q_lora_rank: int = 1536  # 0 = plain wq projection (no query compression)
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    rope_theta: float = 3.2e7
    max_seq_len: int = 131_072
    # "auto": SDPA on CPU (torchtitan's flex attention runs unfused there), torchtitan's flex on GPU
    attention: Literal["auto", "sdpa", "flex"] = "auto"
    # MoE
    num_experts: int = 256
    top_k: int = 8
    num_shared_experts: int = 1
    moe_hidden_dim: int = 768
    route_scale: float = 2.5
    bias_update_rate: float = 1e-3  # aux-loss-free balancing: bias step per update_router_bias()
    # dense MTP: 0 or 1 layer (the paper uses one; drafting applies it recursively)
    num_mtp_layers: int = 1
    # QAT (routed experts only)
    qat_group_size: int = 64
    # init / special tokens
    init_std: float = 0.02
    bos_id: int = 0
    eos_id: int = 1
    extra: dict = field(default_factory=dict)  # free-form notes carried into exports

    # ---- derived -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "JoyAIConfig":
        return _apply_overrides(cls(), data, where="from_dict")

    # ---- validation ----------------------------------------------------------------------------
    def validate(self) -> "JoyAIConfig":
        def need(ok: bool, name: str, fix: str) -> None:
            if not ok:
                raise ConfigError(name, getattr(self, name), fix)

        for name in ("vocab_size", "dim", "n_layers", "n_heads", "kv_lora_rank", "qk_nope_head_dim",
                     "qk_rope_head_dim", "v_head_dim", "num_experts", "top_k", "moe_hidden_dim",
                     "dense_hidden_dim", "max_seq_len", "qat_group_size"):
            need(getattr(self, name) > 0, name, "must be a positive integer")
        need(self.q_lora_rank >= 0, "q_lora_rank", "use 0 for no query compression, or a positive rank")
        need(0 <= self.n_dense_layers <= self.n_layers, "n_dense_layers",
             f"must be between 0 and n_layers ({self.n_layers})")
        need(self.top_k <= self.num_experts, "top_k",
             f"top_k cannot exceed num_experts ({self.num_experts}); lower top_k or add experts")
        need(self.num_shared_experts >= 0, "num_shared_experts", "must be 0 or more")
        need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "RoPE rotates pairs: use an even size")
        need(self.num_mtp_layers in (0, 1), "num_mtp_layers",
             "JoyAI-Flash has one dense MTP layer (applied recursively to draft k tokens); use 0 or 1")
        need(self.attention in ("auto", "sdpa", "flex"), "attention", "use 'auto', 'sdpa' or 'flex'")
        need(self.route_scale > 0, "route_scale", "must be positive (the paper uses 2.5)")
        need(self.bias_update_rate >= 0, "bias_update_rate", "use 0 to freeze the router bias, else e.g. 1e-3")
        need(self.norm_eps > 0, "norm_eps", "must be positive (the paper uses 1e-6)")
        need(0 <= self.bos_id < self.vocab_size, "bos_id", f"must be a token id below vocab_size ({self.vocab_size})")
        need(0 <= self.eos_id < self.vocab_size, "eos_id", f"must be a token id below vocab_size ({self.vocab_size})")
        for name, width in (("dim", self.dim), ("moe_hidden_dim", self.moe_hidden_dim)):
            if width % self.qat_group_size:
                raise ConfigError("qat_group_size", self.qat_group_size,
                                  f"INT4 groups run along the expert weights' input dims; it must divide "
                                  f"{name} ({width}), e.g. {_largest_divisor(width, self.qat_group_size)}")
        return self

    # ---- parameter counts (closed form; model info cross-checks them on the meta device) --------
    def param_counts(self) -> dict[str, int]:
        d = self.dim
        attn = (
            (d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * self.n_heads * self.qk_head_dim)
            if self.q_lora_rank else d * self.n_heads * self.qk_head_dim
        )
        attn += d * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        attn += self.kv_lora_rank * self.n_heads * (self.qk_nope_head_dim + self.v_head_dim)
        attn += self.n_heads * self.v_head_dim * d
        norms = 2 * d
        dense_ffn = 3 * d * self.dense_hidden_dim
        expert = 3 * d * self.moe_hidden_dim
        shared = expert * self.num_shared_experts
        gate = d * self.num_experts
        dense_layer = attn + norms + dense_ffn
        moe_layer_total = attn + norms + gate + shared + expert * self.num_experts
        moe_layer_active = attn + norms + gate + shared + expert * self.top_k
        embeddings = 2 * self.vocab_size * d  # untied embedding and lm_head
        body_total = self.n_dense_layers * dense_layer + self.n_moe_layers * moe_layer_total + d
        body_active = self.n_dense_layers * dense_layer + self.n_moe_layers * moe_layer_active + d
        mtp = self.num_mtp_layers * (3 * d + 2 * d * d + dense_layer)  # enorm/hnorm/norm, eh_proj, block
        return {
            "total_params": body_total + embeddings,
            "active_params": body_active,
            "active_params_with_embeddings": body_active + embeddings,
            "embedding_params": embeddings,
            "mtp_params": mtp,
        }


def _largest_divisor(n: int, at_most: int) -> int:
    return max(g for g in range(1, at_most + 1) if n % g == 0)


PRESETS: dict[str, JoyAIConfig] = {
    # Used by every test in the suite: a few million parameters, fwd+bwd of 8 x 128 well under 1 s on CPU.
    "joyai-flash-debug": JoyAIConfig(
        preset="joyai-flash-debug", vocab_size=4096, dim=128, n_layers=4, n_dense_layers=1,
        dense_hidden_dim=384, n_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
        qk_rope_head_dim=16, v_head_dim=32, rope_theta=10_000.0, max_seq_len=2048, num_experts=8,
        top_k=2, num_shared_experts=1, moe_hidden_dim=128, qat_group_size=64,
    ),
    # CPU runs that learn something: ~150M total, ~40M active.
    "joyai-flash-small": JoyAIConfig(
        preset="joyai-flash-small", vocab_size=4096, dim=512, n_layers=10, n_dense_layers=1,
        dense_hidden_dim=1536, n_heads=8, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, rope_theta=1e6, max_seq_len=4096, num_experts=32,
        top_k=4, num_shared_experts=1, moe_hidden_dim=256, qat_group_size=64,
    ),
    # The paper's configuration (arXiv 2604.03044): 48.9B total, ~2.75B active without embeddings.
    "joyai-flash-48b-a3b": JoyAIConfig(preset="joyai-flash-48b-a3b"),
}
MODEL_PRESETS = tuple(PRESETS)
# The committed tokenizer's size (model/assets/tokenizer.json; tests/model pins the two together), so a spec's
# vocab_size is checked without loading it.
TOKENIZER_VOCAB_SIZE = 2048
FIELDS = tuple(f.name for f in dataclasses.fields(JoyAIConfig))


def camel(name: str) -> str:
    """n_layers -> nLayers: the spelling a field has in YAML (pydantic's to_camel, without importing it)."""
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


OVERRIDE_NAMES: dict[str, str] = {**{camel(f): f for f in FIELDS}, **{f: f for f in FIELDS}}  # spelling -> field


def override_field(key: str, value: Any = None, where: str = "overrides") -> str:
    """The JoyAIConfig field an override key names (snake_case or camelCase); ConfigError with a valid hint else."""
    field_name = OVERRIDE_NAMES.get(key)
    if field_name is not None:
        return field_name
    snake_input = "_" in key or key.islower()

    def norm(name: str) -> str:  # compare spellings, not styles: numLayers ~ n_layers, topk ~ top_k
        return name.lower().replace("_", "").replace("num", "n")

    by_norm = {norm(f): f for f in FIELDS}
    close = difflib.get_close_matches(norm(key), by_norm, n=1, cutoff=0.7)
    if close:
        target = by_norm[close[0]]
        hint = f"did you mean '{target}'?" if snake_input else f"did you mean '{target}' ('{camel(target)}')?"
    else:
        hint = f"known fields: {', '.join(FIELDS)} (or their camelCase spellings)"
    raise ConfigError(key, value, f"unknown field ({where}); {hint}")


def _apply_overrides(cfg: JoyAIConfig, overrides: dict | None, where: str) -> JoyAIConfig:
    changes = {}
    for key, value in (overrides or {}).items():
        key_py = override_field(key.replace("-", "_"), value, where)
        if key_py in changes:
            raise ConfigError(key, value, f"'{key_py}' is overridden twice (snake_case and camelCase); keep one")
        default = getattr(cfg, key_py)
        if isinstance(default, bool) or default is None or isinstance(default, (str, dict)):
            ok = isinstance(value, type(default)) if default is not None else True
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        else:
            ok = True
        if not ok:
            raise ConfigError(key, value, f"expected a {type(default).__name__} like {default!r}")
        changes[key_py] = value
    try:
        return dataclasses.replace(cfg, **changes).validate()
    except ConfigError as e:  # name the field the way the user spelled it (topK stays topK)
        spelled = next((k for k in overrides or {} if OVERRIDE_NAMES.get(k.replace("-", "_")) == e.field), e.field)
        if spelled == e.field:
            raise
        raise ConfigError(spelled, e.value, e.fix) from None


def get_config(preset: str, overrides: dict | None = None) -> JoyAIConfig:
    """The preset's config with `overrides` (field -> value) applied and validated."""
    if preset not in PRESETS:
        close = difflib.get_close_matches(preset, PRESETS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError("preset", preset, f"use one of {', '.join(PRESETS)}{hint}")
    return _apply_overrides(PRESETS[preset], overrides, where=preset)
