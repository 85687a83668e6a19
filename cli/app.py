"""The `flashops` CLI. Each subsystem owns its command group in its own package; this module only
wires them together. Group modules import no torch at import time (`flashops validate` must start
fast), so heavy imports happen inside the commands.

    flashops validate -f examples/quickstart.yaml
    flashops run -f examples/quickstart.yaml
    flashops --help
"""
from __future__ import annotations

import typer

from flashops.cli import spec_commands

app = typer.Typer(
    name="flashops",
    help="Kubernetes-native MLOps for JoyAI-LLM Flash MoE models: validate, run, render, serve, trace.\n\n"
    "Start here:  flashops validate -f examples/quickstart.yaml  then  flashops run -f examples/quickstart.yaml",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

spec_commands.register(app)


def _register_optional_groups() -> None:
    """Command groups that later subsystems provide; each module exposes `register(app)`."""
    import importlib

    for module in (
        "flashops.cli.model_commands",
        "flashops.cli.run_commands",
        "flashops.cli.render_commands",
        "flashops.cli.serve_commands",
        "flashops.cli.lineage_commands",
        "flashops.cli.checkpoint_commands",
        "flashops.cli.data_commands",
        "flashops.cli.operator_commands",
        "flashops.cli.plan_commands",
        "flashops.cli.eval_commands",
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue
        mod.register(app)


_register_optional_groups()
