"""`flashops model info NAME [--json]`: a preset's architecture and parameter counts, counted on the meta
device (no memory allocated), cross-checked against the closed-form count in the config.

    flashops model info joyai-flash-48b-a3b --json
    flashops model info joyai-flash-debug --set vocab_size=2048
"""
from __future__ import annotations

import json
from typing import List

import typer

EXIT_USAGE = 2
model_app = typer.Typer(help="The JoyAI-Flash model family: presets and parameter counts.\n\n"
                         "Example:\n\n    flashops model info joyai-flash-48b-a3b --json", no_args_is_help=True)


def _parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        if "=" not in pair:
            typer.echo(f"--set {pair!r}: use FIELD=VALUE, e.g. --set vocab_size=2048", err=True)
            raise typer.Exit(EXIT_USAGE)
        key, raw = pair.split("=", 1)
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    return overrides


@model_app.command("info")
def info(
    name: str = typer.Argument(..., help="preset name, e.g. joyai-flash-48b-a3b"),
    as_json: bool = typer.Option(False, "--json", help="print JSON (total_params, active_params, ...)"),
    overrides: List[str] = typer.Option([], "--set", help="override a config field: FIELD=VALUE"),
) -> None:
    """Total and active parameters per token (without and with embeddings) of a preset.

    Examples:

        flashops model info joyai-flash-48b-a3b --json

        flashops model info joyai-flash-debug --set n_layers=8
    """
    from flashops.model.config import ConfigError, get_config

    try:
        cfg = get_config(name, _parse_overrides(overrides))
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    from flashops.model.model import count_params  # torch only now

    counts = count_params(cfg)
    closed_form = cfg.param_counts()
    if counts != closed_form:  # two independent counts; disagreeing means the config formula is stale
        typer.echo(f"warning: meta-device count {counts} differs from the config's formula {closed_form}", err=True)
    if as_json:
        typer.echo(json.dumps({"name": name, **counts, "config": cfg.to_dict()}, indent=2))
        return
    c = cfg
    typer.echo(f"{name}")
    typer.echo(f"  layers {c.n_layers} ({c.n_dense_layers} dense, {c.n_moe_layers} MoE) + {c.num_mtp_layers} dense MTP, "
               f"hidden {c.dim}, vocab {c.vocab_size}")
    typer.echo(f"  MLA: {c.n_heads} heads, q_lora {c.q_lora_rank}, kv_lora {c.kv_lora_rank}, "
               f"qk {c.qk_nope_head_dim}+{c.qk_rope_head_dim}, v {c.v_head_dim}")
    typer.echo(f"  MoE: {c.num_experts} routed (top-{c.top_k}) + {c.num_shared_experts} shared, width {c.moe_hidden_dim}, "
               f"route scale {c.route_scale}")
    for key, label in (("total_params", "total"), ("active_params", "active / token (no embeddings)"),
                       ("active_params_with_embeddings", "active / token (with embeddings)"),
                       ("embedding_params", "embeddings (untied)"), ("mtp_params", "MTP layer (not in total)")):
        typer.echo(f"  {label:34s} {counts[key]:>15,d}  ({counts[key] / 1e9:.3f}B)")


def register(app: typer.Typer) -> None:
    app.add_typer(model_app, name="model")
