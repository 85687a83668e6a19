"""`flashops plan -f SPEC`: will each training run fit on its GPUs? Per-rank bytes before anything is scheduled.

    flashops plan -f examples/pretrain-48b.yaml --gpu-memory 80GiB          # the spec's world size
    flashops plan -f examples/pretrain-48b.yaml --gpus 64 --gpu-memory 80GiB --json

The model is built on the meta device and parallelized with the trainer's real FSDP2 + expert-parallel code
on a fake process group of the run's world size (no GPU, no network; flashops.trainers.plan). Exit codes:
0 every run fits (or no GPU memory was given), 1 a run does not fit (the fix is printed), 2 bad usage.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

EXIT_NO_FIT, EXIT_USAGE = 1, 2
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)


def plan(
    files: List[Path] = typer.Option(..., "--file", "-f", help="YAML file(s) with TrainingRuns or TrainingPipelines"),
    gpus: Optional[int] = typer.Option(None, "--gpus", min=1, help="world size (overrides nodes x procsPerNode)"),
    gpu_memory: Optional[str] = typer.Option(None, "--gpu-memory", help="memory of one GPU, e.g. 80GiB "
                                             "(default: the spec's resources.gpuMemory)"),
    as_json: bool = typer.Option(False, "--json", help="one JSON object: {runs: [{name, world_size, "
                                 "per_rank_bytes: {params, grads, optimizer, activations, total}, fits, fix}]}"),
    arithmetic_only: bool = typer.Option(False, "--arithmetic-only", help="skip the sharded meta model: the "
                                         "torch-free arithmetic only (what validate and the operator use)"),
) -> None:
    """Per-rank parameter, gradient, optimizer and activation memory of every training run, and whether it
    fits; when it does not, the change that makes it fit.

    Example:
        flashops plan -f examples/pretrain-48b.yaml --gpus 8 --gpu-memory 80GiB
    """
    from flashops.api.plan import parse_bytes
    from flashops.api.spec import SpecError, load_file

    try:
        memory = parse_bytes(gpu_memory) if gpu_memory is not None else None
    except ValueError as e:
        err.print(f"--gpu-memory: {e}", markup=False)
        raise typer.Exit(EXIT_USAGE)
    objects = []
    for f in files:
        try:
            objects += load_file(f)
        except SpecError as e:
            for line in e.problems:
                err.print(line, markup=False)
            raise typer.Exit(EXIT_USAGE)
    from flashops.trainers.errors import SpecValueError
    from flashops.trainers.plan import plan_file, runs_of

    if not runs_of(objects):
        err.print(f"no TrainingRun or TrainingPipeline in {', '.join(map(str, files))}: nothing to plan", markup=False)
        raise typer.Exit(EXIT_USAGE)
    try:
        plans = plan_file(objects, gpus, memory, shard=not arithmetic_only)
    except (SpecValueError, ValueError) as e:
        err.print(f"error: {e}", markup=False)
        raise typer.Exit(EXIT_USAGE)
    if as_json:
        out.print(json.dumps({"runs": [p.to_dict() for p in plans]}, indent=2), markup=False)
    else:
        for p in plans:
            out.print(p.summary(), markup=False)
            for note in p.notes:
                out.print(f"  note: {note}", markup=False)
    if any(p.fits is False for p in plans):
        raise typer.Exit(EXIT_NO_FIT)


def register(app: typer.Typer) -> None:
    app.command()(plan)
