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
    offline: bool = typer.Option(False, "--offline", help="skip checks that read data or stores (file://, s3://)"),
) -> None:
    """Check job specs without a cluster or any compute: one line per object; exit 2 if any object is bad. The
    same checks as the operator's admission and the trainer's (model overrides, seqLen against the model's
    context), plus the data: builtin corpus names, and (unless --offline) that file:// and s3:// data exist
    and have the stage's keys.

    Example:
        flashops validate -f examples/*.yaml
        flashops validate --offline -f my-run.yaml        # no data or store access
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
        problems = [p for o in objs for p in data_problems(o, f.name, offline)]
        problems = problems or [p for o in objs for p in memory_problems(o, f.name)]  # overrides: load_file
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


def _training_specs(obj) -> list[tuple[str, object]]:
    if obj.kind == "TrainingRun":
        return [("spec", obj.spec)]
    if obj.kind == "TrainingPipeline":
        return [(f"spec.stages[{i}].spec", s.spec) for i, s in enumerate(obj.spec.stages) if not s.is_eval]
    return []


def data_problems(obj, source: str, offline: bool) -> list[str]:
    """The data each training spec names, opened as `flashops run` opens it (the same checks: the builtin
    corpus exists and fits the stage; a file:// or s3:// dataset exists and has the stage's keys). Offline:
    builtin corpora only, no file or network access."""
    from flashops.trainers.corpora import DEFAULT_DATA, open_dataset
    from flashops.trainers.errors import TrainerError

    problems = []
    for path, spec in _training_specs(obj):
        uri = spec.data.uri if spec.data else DEFAULT_DATA[spec.stage]
        if offline and not uri.startswith("builtin:"):
            continue
        try:
            open_dataset(uri, spec.stage, spec.training.seed, spec.data.format if spec.data else "auto",
                         spec.stage_params)
        except TrainerError as e:
            problems.append(f"{source}: {obj.kind}/{obj.name}: {path}.{e}")
    return problems


def memory_problems(obj, source: str) -> list[str]:
    """Runs whose spec names a GPU memory (resources.gpuMemory) and do not fit it per rank: the torch-free
    arithmetic of `flashops plan` (flashops.api.plan.fit_problem), with the fix."""
    from flashops.api.plan import fit_problem

    if obj.kind == "TrainingRun":
        specs = [("spec", obj.spec)]
    elif obj.kind == "TrainingPipeline":
        specs = [(f"spec.stages[{i}].spec", s.spec) for i, s in enumerate(obj.spec.stages) if not s.is_eval]
    else:
        return []
    problems = []
    for path, spec in specs:
        problem = fit_problem(obj.name, spec)
        if problem:
            problems.append(f"{source}: {obj.kind}/{obj.name}: {path}.{problem}")
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
