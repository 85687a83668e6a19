"""`flashops validate`, `flashops crds`, `flashops version`: the spec-level commands."""
from __future__ import annotations

from pathlib import Path
from typing import List

import typer
from rich.console import Console

EXIT_USAGE = 2
out = Console()
err = Console(stderr=True)


def validate(
    files: List[Path] = typer.Option([], "--file", "-f", help="YAML file(s); multi-document files are fine"),
    more: List[Path] = typer.Argument(None, help="more files (so `-f examples/*.yaml` works)", show_default=False),
) -> None:
    """Check job specs without a cluster: one line per object; exit 2 if any object is bad.

    Example:
        flashops validate -f examples/*.yaml
    """
    from flashops.api.spec import SpecError, load_file

    files = [*files, *(more or [])]
    if not files:
        err.print("no files given: use flashops validate -f FILE [FILE...]")
        raise typer.Exit(EXIT_USAGE)
    failed = False
    for f in files:
        try:
            objs = load_file(f)
        except SpecError as e:
            failed = True
            for line in e.problems:
                err.print(line, markup=False, highlight=False, soft_wrap=True)
            continue
        problems = [p for o in objs for p in model_config_problems(o, f.name)]
        if problems:
            failed = True
            for line in problems:
                err.print(line, markup=False, highlight=False, soft_wrap=True)
            continue
        for o in objs:
            extra = f" stage={o.spec.stage}" if o.kind == "TrainingRun" else (
                f" stages={'->'.join(s.name for s in o.spec.stages)}" if o.kind == "TrainingPipeline" else f" source={o.spec.source}")
            out.print(f"{f.name}: {o.kind}/{o.name}: OK{extra}", markup=False, highlight=False, soft_wrap=True)
    if failed:
        raise typer.Exit(EXIT_USAGE)


def model_config_problems(obj, source: str) -> list[str]:
    """Checks that need the model's config (torch-free): preset overrides that don't fit the architecture."""
    from flashops.model.config import ConfigError, get_config

    if obj.kind == "TrainingRun":
        specs = [("spec", obj.spec)]
    elif obj.kind == "TrainingPipeline":
        specs = [(f"spec.stages[{i}].spec", s.spec) for i, s in enumerate(obj.spec.stages)]
    else:
        return []
    problems = []
    for path, spec in specs:
        try:
            get_config(spec.model.preset, spec.model.overrides)
        except ConfigError as e:
            problems.append(f"{source}: {obj.kind}/{obj.name}: {path}.model.overrides.{e.field}: {e.value!r}: {e.fix}")
        except ValueError as e:
            problems.append(f"{source}: {obj.kind}/{obj.name}: {path}.model: {e}")
    return problems


def crds() -> None:
    """Print the CustomResourceDefinitions generated from the spec models.

    Example:
        flashops crds | kubectl apply -f -
    """
    from flashops.api.crds import crds_yaml

    typer.echo(crds_yaml(), nl=False)


def version() -> None:
    """Print the flashops version and the API group/version it serves.

    Example:

        flashops version
    """
    from importlib.metadata import version as v

    from flashops.api.spec import API_GROUP_VERSION

    typer.echo(f"flashops {v('flashops')} ({API_GROUP_VERSION})")


def register(app: typer.Typer) -> None:
    app.command()(validate)
    app.command()(crds)
    app.command()(version)
