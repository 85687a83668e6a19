"""Hugging Face DeepSeek-V3 format: names (MTP is the layer after the last, as in DeepSeek-V3 checkpoints),
config.json and safetensors. The name mapping is torchtitan's DeepSeekV3StateDictAdapter (experts split
per expert, router bias as `e_score_correction_bias`).

    from flashops.model.hf import save_hf, load_hf
    save_hf(model, "out/")        # out/model.safetensors + out/config.json (model_type deepseek_v3)
    model = load_hf("out/")       # transformers' DeepseekV3ForCausalLM loads the same folder (MTP ignored)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from flashops.model.config import JoyAIConfig


def _adapter(model):
    from torchtitan.models.deepseek_v3.state_dict_adapter import DeepSeekV3StateDictAdapter

    return DeepSeekV3StateDictAdapter(model.config, None)


def hf_config_dict(cfg: JoyAIConfig) -> dict:
    """config.json for transformers' DeepseekV3Config, plus our own config under "flashops"."""
    return {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.dense_hidden_dim,
        "moe_intermediate_size": cfg.moe_hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_nextn_predict_layers": cfg.num_mtp_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": cfg.num_shared_experts,
        "n_routed_experts": cfg.num_experts,
        "num_experts_per_tok": cfg.top_k,
        "routed_scaling_factor": cfg.route_scale,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "first_k_dense_replace": cfg.n_dense_layers,
        "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank or None,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "head_dim": cfg.qk_rope_head_dim,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_interleave": True,  # torchtitan's complex RoPE rotates adjacent pairs
        "max_position_embeddings": cfg.max_seq_len,
        "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_id,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "flashops": cfg.to_dict(),
    }


def hf_adapter(cfg: JoyAIConfig):
    """torchtitan's DeepSeekV3StateDictAdapter for a config, built on the meta device (no memory)."""
    from flashops.model.model import JoyAIFlash

    with torch.device("meta"):
        return _adapter(JoyAIFlash(cfg))


def mtp_copies(cfg: JoyAIConfig, name: str) -> list[str]:
    """HF names that also carry flashops tensor `name`: the MTP layer (index n_layers) gets its own copies of
    the embedding and the output head, as DeepSeek-V3 checkpoints ship them and vLLM's DeepSeekMTP loads them
    (`model.layers.{N}.embed_tokens.weight`, `model.layers.{N}.shared_head.head.weight`)."""
    if not cfg.num_mtp_layers:
        return []
    n = cfg.n_layers
    return {"tok_embeddings.weight": [f"model.layers.{n}.embed_tokens.weight"],
            "lm_head.weight": [f"model.layers.{n}.shared_head.head.weight"]}.get(name, [])


def to_hf_tensors(adapter, cfg: JoyAIConfig, name: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
    """One flashops tensor as its HF DeepSeek-V3 tensors (a grouped expert weight: one per expert)."""
    out = adapter.to_hf({name: value})
    for extra in mtp_copies(cfg, name):
        out[extra] = value.clone()  # its own storage: safetensors refuses shared tensors
    return out


def to_hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model in HF names, in memory (the reference the streaming export is tested against)."""
    adapter = _adapter(model)
    out = {}
    for name, value in model.state_dict().items():
        out.update(to_hf_tensors(adapter, model.arch, name, value))
    return {k: v.contiguous() for k, v in out.items()}


def from_hf_state_dict(model, hf_state: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Load HF-named tensors into `model` in place. Extra MTP copies of embed/head in HF files are shared
    with the main model here, so they are ignored."""
    shared = (".embed_tokens.", ".shared_head.head.")
    hf_state = {k: v for k, v in hf_state.items() if not any(s in k for s in shared) or k.startswith("model.embed")}
    state = _adapter(model).from_hf(hf_state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if "tokens_per_expert" not in m]
    if strict and (missing or unexpected):
        raise ValueError(f"HF state dict does not fit this model: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                         f"check that config.json matches the weights")


def save_hf(model, directory: str | Path) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config_dict(model.arch), indent=2))
    return directory


def config_from_hf(data: dict) -> JoyAIConfig:
    if "flashops" in data:
        return JoyAIConfig.from_dict(data["flashops"])
    return JoyAIConfig.from_dict({
        "preset": "hf", "vocab_size": data["vocab_size"], "dim": data["hidden_size"],
        "dense_hidden_dim": data["intermediate_size"], "moe_hidden_dim": data["moe_intermediate_size"],
        "n_layers": data["num_hidden_layers"], "num_mtp_layers": min(data.get("num_nextn_predict_layers", 0), 1),
        "n_heads": data["num_attention_heads"], "num_shared_experts": data.get("n_shared_experts") or 0,
        "num_experts": data["n_routed_experts"], "top_k": data["num_experts_per_tok"],
        "route_scale": float(data.get("routed_scaling_factor", 1.0)), "n_dense_layers": data["first_k_dense_replace"],
        "kv_lora_rank": data["kv_lora_rank"], "q_lora_rank": data.get("q_lora_rank") or 0,
        "qk_nope_head_dim": data["qk_nope_head_dim"], "qk_rope_head_dim": data["qk_rope_head_dim"],
        "v_head_dim": data["v_head_dim"], "norm_eps": float(data["rms_norm_eps"]),
        "rope_theta": float(data["rope_theta"]), "max_seq_len": data["max_position_embeddings"],
    })


def load_hf(directory: str | Path, device: str | torch.device = "cpu"):
    from safetensors.torch import load_file

    from flashops.model.model import JoyAIFlash

    directory = Path(directory)
    cfg = config_from_hf(json.loads((directory / "config.json").read_text()))
    with torch.device(device):
        model = JoyAIFlash(cfg, device=device)
    state = {}
    for f in sorted(directory.glob("*.safetensors")):
        state.update(load_file(str(f), device=str(device)))
    from_hf_state_dict(model, state)
    return model
