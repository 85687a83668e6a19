"""`flashops run -f FILE`: run TrainingRuns and TrainingPipelines on this machine, no cluster needed.

    flashops run -f examples/quickstart.yaml                 # pretrain -> sft -> dpo -> rl, then export
    flashops run -f examples/sft.yaml --store file:///data/store --lineage sqlite:////data/lineage.db

Checkpoints go to --store (default: spec.checkpoint.uri, else file://$FLASHOPS_HOME/store), lineage to
--lineage (default: $FLASHOPS_LINEAGE_URL, else SQLite at $FLASHOPS_HOME/lineage.db). A rich progress bar
per stage, then a summary table per stage; a run ending in RL also prints how the policy answers the
held-out RL prompts before and after RL. ModelDeployments in the file are skipped (use `flashops serve`).
Exit codes: 0 done, 2 bad spec / data / usage, 1 a failure while training.
"""
from __future__ import annotations

from pathlib import Path

import typer

EXIT_USAGE = 2


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


class _Progress:
    """One rich progress bar per stage (steps, ETA, the latest loss / reward)."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=False,
        )
        self.task = None

    def start_stage(self, name: str, total: int) -> None:
        self.task = self.progress.add_task(name, total=total, info="")

    def step(self, row: dict) -> None:
        if self.task is None:
            return
        bits = [f"loss {row['loss']:.3f}"] if isinstance(row.get("loss"), float) else []
        for key, label in (("reward", "reward"), ("mtp_loss", "mtp"), ("reward_accuracy", "acc"), ("lr", "lr")):
            if isinstance(row.get(key), (int, float)):
                bits.append(f"{label} {row[key]:.3g}")
        if isinstance(row.get("tokens_per_s"), float):
            bits.append(f"{row['tokens_per_s']:.0f} tok/s")
        self.progress.update(self.task, completed=row["step"], info="  ".join(bits))


def _summary_table(results, console) -> None:
    from rich.table import Table

    table = Table(title="flashops run: summary", show_lines=False)
    for col in ("stage", "run", "steps", "final loss", "reward / acc", "time", "checkpoint"):
        table.add_column(col, overflow="fold")
    for r in results:
        m = r.metrics
        extra = m.get("reward") if r.stage == "rl" else m.get("reward_accuracy")
        table.add_row(r.stage, r.run, str(r.steps), _fmt(m.get("loss")), _fmt(extra, 3),
                      f"{r.seconds:.0f}s" + (f" (resumed at {r.resumed_from})" if r.resumed_from else ""),
                      r.checkpoint_uri or "-")
    console.print(table)


def _rl_comparison(result, console) -> None:
    from rich.table import Table

    before, after = result.metrics.get("eval_before"), result.metrics.get("eval_after")
    if not before or not after:
        return
    table = Table(title=f"RL tasks, {before['prompts']} held-out prompts: before vs after RL ({result.run})")
    table.add_column("metric")
    table.add_column("before RL", justify="right")
    table.add_column("after RL", justify="right")
    table.add_row("greedy accuracy", f"{before['greedy_accuracy']:.3f}", f"{after['greedy_accuracy']:.3f}")
    table.add_row("sampled mean reward", f"{before['sampled_reward']:.3f}", f"{after['sampled_reward']:.3f}")
    for d in before["per_domain_greedy"]:
        table.add_row(f"  {d} (greedy)", f"{before['per_domain_greedy'][d]:.3f}", f"{after['per_domain_greedy'].get(d, 0):.3f}")
    console.print(table)
    for b, a in zip(before.get("examples", []), after.get("examples", [])):
        console.print(f"  {b['question']!r} expected {b['expected']!r}: before {b['answer']!r} -> after {a['answer']!r}")
    # sampled reward is what RL optimises (at the training temperature); greedy accuracy is reported beside it,
    # each with its own direction, so a rise in one never hides a fall in the other
    def moved(name, key):
        b, a = before[key], after[key]
        word = "rose" if a > b else "fell" if a < b else "stayed"
        return f"{name} {word} ({b:.3f} -> {a:.3f})"

    console.print(f"After RL: {moved('sampled reward (what RL optimises)', 'sampled_reward')}; "
                  f"{moved('greedy accuracy', 'greedy_accuracy')}.")

def run(
    file: Path = typer.Option(..., "-f", "--file", help="YAML with TrainingRun / TrainingPipeline objects"),
    store: str = typer.Option(None, "--store", help="checkpoint store URI (file:///dir or s3://bucket/prefix)"),
    lineage: str = typer.Option(None, "--lineage", help="sqlite:///..., postgresql+psycopg://... or http(s)://..."),
    log_dir: Path = typer.Option(None, "--log-dir", help="metrics.jsonl per run here (default $FLASHOPS_HOME/logs)"),
    export: bool = typer.Option(True, "--export/--no-export", help="export a pipeline's final model for serving"),
) -> None:
    """Train locally: TrainingRuns and whole TrainingPipelines, with checkpoints and lineage.

    Examples:

        flashops run -f examples/quickstart.yaml

        flashops run -f examples/sft.yaml --store s3://flashops/checkpoints --lineage sqlite:////data/lineage.db
    """
    from rich.console import Console

    from flashops.api.spec import SpecError, TrainingPipeline, TrainingRun, load_file

    console = Console()
    try:
        objs = load_file(str(file))
    except SpecError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    jobs = [o for o in objs if isinstance(o, (TrainingRun, TrainingPipeline))]
    skipped = [o for o in objs if o not in jobs]
    if not jobs:
        typer.echo(f"error: {file} has no TrainingRun or TrainingPipeline to run", err=True)
        raise typer.Exit(EXIT_USAGE)

    import os

    from flashops.storage import StoreError, open_store
    from flashops.storage.settings import flashops_home
    from flashops.trainers.errors import TrainerError

    log_root = log_dir or flashops_home() / "logs"
    try:
        from flashops.api.lineage import open_lineage

        lin = open_lineage(lineage)
        results, model_uris = [], []
        bar = _Progress(console)
        with bar.progress:
            for obj in jobs:
                if isinstance(obj, TrainingPipeline):
                    from flashops.trainers.runner import run_pipeline

                    st = open_store(store or obj.spec.stages[0].spec.checkpoint.uri)

                    def on_stage(i, run, _p=obj):
                        bar.start_stage(f"{_p.name}/{_p.spec.stages[i].name}", run.spec.training.steps)

                    res, model_uri = run_pipeline(obj, st, lin, on_stage=on_stage, on_step=bar.step,
                                                  log_root=log_root, export=export)
                    results += res
                    model_uris += [model_uri] if model_uri else []
                else:
                    from flashops.trainers.runner import run_training

                    st = open_store(store or obj.spec.checkpoint.uri)
                    bar.start_stage(obj.name, obj.spec.training.steps)
                    results.append(run_training(obj, st, lin, on_step=bar.step, log_dir=Path(log_root) / obj.name))
    except (TrainerError, StoreError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    except SpecError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    _summary_table(results, console)
    if results and results[-1].stage == "rl":
        _rl_comparison(results[-1], console)
    for uri in model_uris:
        console.print(f"model exported for serving: {uri}   (flashops serve --model {uri})")
    for o in skipped:
        console.print(f"skipped {o.kind} {o.name}: serve it with `flashops serve -f {file}`")
    home = os.environ.get("FLASHOPS_HOME") or str(flashops_home())
    console.print(f"lineage: {lineage or os.environ.get('FLASHOPS_LINEAGE_URL') or home + '/lineage.db'}   "
                  f"metrics: {log_root}")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
