"""`flashops run -f FILE`: run TrainingRuns and TrainingPipelines on this machine, no cluster needed.

    flashops run -f examples/quickstart.yaml                 # pretrain -> sft -> dpo -> rl, then export
    flashops run -f examples/sft.yaml --store file:///data/store --lineage sqlite:////data/lineage.db

Checkpoints go to --store (default: spec.checkpoint.uri, else file://$FLASHOPS_HOME/store), lineage to
--lineage (default: $FLASHOPS_LINEAGE_URL, else SQLite at $FLASHOPS_HOME/lineage.db). A rich progress bar
per stage, then a summary table per stage; a run ending in RL also prints how the policy answers the
held-out RL prompts before and after RL. ModelDeployments in the file are not served (`flashops serve -f`);
one with a promotion gate gets the gate's decision for the model it would serve now.
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
        self.eval_name: str | None = None
        self.stage_name = ""
        self.phases: dict = {}

    def start_stage(self, name: str, total: int) -> None:
        self.stage_name = name
        self.task = self.progress.add_task(name, total=total, info="")

    def phase(self, phase: str, done: int, total: int) -> None:
        """Work before a stage's first step (the RL curriculum's profiling): a bar of its own."""
        key = (self.task, phase)
        if key not in self.phases:
            self.phases[key] = self.progress.add_task(f"{self.stage_name} {phase}".strip(), total=total, info="")
        self.progress.update(self.phases[key], completed=done, total=total)

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

    def eval_task(self, total: int, what: str) -> "_EvalTask":
        """A bar for an eval stage's generations (flashops.cli.eval_commands.run_evaluation's progress)."""
        return _EvalTask(self.progress, self.progress.add_task(self.eval_name or "eval", total=total, info=""))


class _EvalTask:
    def __init__(self, progress, task):
        self.progress, self.task = progress, task

    def tick(self) -> None:
        self.progress.advance(self.task)

    def describe(self, suite: str, mode: str, k: int, tasks: int) -> None:
        self.progress.update(self.task, info=f"{suite} {mode} " + (f"acceptance k={k}" if k else "answers"))

    def close(self) -> None:
        pass


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

def _eval_tables(evaluations: list[tuple[str, str, dict]], console) -> None:
    """Before/after per eval stage: this evaluation against the pipeline's previous eval stage that ran one of
    the same suites."""
    from flashops.cli.eval_commands import print_comparison

    for i, (pipeline, stage, result) in enumerate(evaluations):
        names = {s["name"] for s in result["suites"]}
        before = next(((st, r) for p, st, r in reversed(evaluations[:i])
                       if p == pipeline and names & {s["name"] for s in r["suites"]}), (None, None))
        print_comparison(stage, before[0], before[1], result, console)


def run(
    file: Path = typer.Option(..., "-f", "--file", help="YAML with TrainingRun / TrainingPipeline objects"),
    store: str = typer.Option(None, "--store", help="checkpoint store URI (file:///dir or s3://bucket/prefix)"),
    lineage: str = typer.Option(None, "--lineage", help="sqlite:///..., postgresql+psycopg://... or http(s)://..."),
    log_dir: Path = typer.Option(None, "--log-dir", help="metrics.jsonl per run here (default $FLASHOPS_HOME/logs)"),
    export: bool = typer.Option(True, "--export/--no-export", help="export the final model for serving (a run's, or a pipeline's last stage's)"),
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
    lin = _open_lineage_or_exit(lineage)
    try:
        _check_stores_or_exit(jobs, store)
        results, model_uris, evaluations = [], [], []
        bar = _Progress(console)
        with bar.progress:
            for obj in jobs:
                if isinstance(obj, TrainingPipeline):
                    from flashops.cli.eval_commands import stage_evaluator
                    from flashops.trainers.runner import run_pipeline

                    st = open_store(store or obj.spec.stages[0].spec.checkpoint.uri)

                    def on_stage(i, run, _p=obj):
                        if _p.spec.stages[i].is_eval:
                            bar.eval_name = f"{_p.name}/{_p.spec.stages[i].name}"
                        else:
                            bar.start_stage(f"{_p.name}/{_p.spec.stages[i].name}", run.spec.training.steps)

                    evaluate_stage = stage_evaluator(lin, progress=bar.eval_task)

                    def evaluate(job, checkpoint, _p=obj, _e=evaluate_stage):
                        result = _e(job, checkpoint)
                        evaluations.append((_p.name, job.stage, result))
                        return result

                    res, model_uri = run_pipeline(obj, st, lin, on_stage=on_stage, on_step=bar.step,
                                                  on_progress=bar.phase, log_root=log_root, export=export,
                                                  evaluate=evaluate)
                    results += res
                    model_uris += [model_uri] if model_uri else []
                else:
                    from flashops.trainers.runner import run_training

                    st = open_store(store or obj.spec.checkpoint.uri)
                    bar.start_stage(obj.name, obj.spec.training.steps)
                    result = run_training(obj, st, lin, on_step=bar.step, log_dir=Path(log_root) / obj.name,
                                          on_progress=bar.phase)
                    results.append(result)
                    if export:  # the same rule as the trainer pod's: a standalone run exports its final model
                        from flashops.trainers.runner import export_finished_run

                        model_uri = export_finished_run(obj, result.checkpoint_uri, st, lin)
                        model_uris += [model_uri] if model_uri else []
    except (TrainerError, StoreError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    except SpecError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    except ValueError as e:  # a suite or model an eval stage cannot use (SuiteError, EvalError, Unresolved)
        from flashops.api.evaluation import SuiteError
        from flashops.cli.eval_commands import Unresolved
        from flashops.serving.evaluation import EvalError

        if not isinstance(e, (SuiteError, EvalError, Unresolved)):
            raise
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    _summary_table(results, console)
    if results and results[-1].stage == "rl":
        _rl_comparison(results[-1], console)
    _eval_tables(evaluations, console)
    for uri in model_uris:
        console.print(f"model exported for serving: {uri}   (flashops serve --model {uri})")
    for o in skipped:
        _promotion_preview(o, lin, console, file)
    home = str(flashops_home())
    console.print(f"lineage: {lineage or os.environ.get('FLASHOPS_LINEAGE_URL') or home + '/lineage.db'}   "
                  f"metrics: {log_root}")


def _promotion_preview(deployment, lin, console, file: Path) -> None:
    """A ModelDeployment is not served by `flashops run`; with a promotion gate (or mtpTokens: auto), say what
    `flashops serve -f` would decide for the model its source resolves to now (flashops.api.promotion)."""
    spec = deployment.spec
    if spec.promotion is None and spec.speculative.mtp_tokens != "auto":
        console.print(f"skipped {deployment.kind} {deployment.name}: serve it with `flashops serve -f {file}`")
        return
    from flashops.api.references import UnresolvedReference, resolve_reference
    from flashops.cli.serve_commands import GateBlocked, apply_gate

    try:
        candidate = resolve_reference(spec.source, lineage=lin).model_uri
    except (UnresolvedReference, LookupError) as e:
        console.print(f"{deployment.kind} {deployment.name}: nothing to serve yet ({e})")
        return
    if not candidate:
        console.print(f"{deployment.kind} {deployment.name}: {spec.source} has no serving export yet")
        return
    said: list[str] = []
    try:
        served, k = apply_gate(deployment, candidate, lineage=lin, say=said.append)
        verdict = f"`flashops serve -f {file}` would serve {served}" + (f" with mtpTokens {k}" if k is not None else "")
    except GateBlocked as e:
        verdict = str(e)
    console.print(f"{deployment.kind} {deployment.name}:", markup=False)
    for line in said + [verdict]:
        console.print(f"  {line}", markup=False, highlight=False)


def _open_lineage_or_exit(target: str | None):
    """The lineage store, or exit 2 now (before any compute) when --lineage cannot be used."""
    from flashops.api.lineage import LineageError, open_lineage

    try:
        return open_lineage(target)
    except LineageError as e:
        typer.echo(f"error: --lineage {target or '(default)'}: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    except OSError as e:  # a SQLite path whose directory cannot be created or written
        typer.echo(f"error: --lineage {target or '(default)'}: {e.strerror or e}: use a writable path "
                   "(sqlite:////writable/dir/lineage.db), postgresql+psycopg://USER@HOST/DB or http(s)://HOST:PORT",
                   err=True)
        raise typer.Exit(EXIT_USAGE)


def _check_stores_or_exit(jobs, store: str | None) -> None:
    """Every checkpoint store the jobs will write must take a write now, not after training (exit 2)."""
    from flashops.api.spec import TrainingPipeline
    from flashops.storage import StoreError, open_store

    uris = {store or (o.spec.stages[0].spec.checkpoint.uri if isinstance(o, TrainingPipeline) else o.spec.checkpoint.uri)
            for o in jobs}
    for uri in sorted(uris, key=str):
        try:
            open_store(uri).check_writable()
        except StoreError as e:
            typer.echo(f"error: checkpoint store: {e}", err=True)
            raise typer.Exit(EXIT_USAGE)


def register(app: typer.Typer) -> None:
    app.command("run")(run)
