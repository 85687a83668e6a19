"""`flashops eval`: evaluate a model or checkpoint on suites, greedy, through the serving engine.

    flashops eval --model quickstart --suite builtin:rl-heldout --suite builtin:chat-smoke
    flashops eval --model file:///root/.flashops/store/models/quickstart/step-15 --suite file:///data/qa.jsonl --json

The model resolves through the one resolver (flashops.api.references: a model or checkpoint URI, a run or
pipeline name, lineage:<id>); a serving export is evaluated when one is known, else the checkpoint. The result
is recorded in lineage as an evaluation node on what was evaluated (only once the whole evaluation is done).
The pipeline's eval stage (`stage: eval`) runs the same code: `stage_evaluator` here locally, this command in
the operator's eval Job. Exit codes: 0 done, 2 bad suite / model reference / option, 1 a failure while decoding.
"""
from __future__ import annotations

import json
import sys
from typing import Any, List, Optional

import typer

EXIT_USAGE = 2


# ------------------------------------------------------------------------------------------ the model


class Unresolved(ValueError):
    pass


def resolve_model(ref: str, lineage) -> dict:
    """{"ref", "model_uri" | None, "checkpoint_uri" | None}: what to evaluate (an export when one is known)."""
    from flashops.api.lineage import LineageError
    from flashops.api.references import UnresolvedReference, resolve_reference

    try:
        art = resolve_reference(ref, lineage=lineage or None)
    except UnresolvedReference as e:
        raise Unresolved(f"--model {ref!r}: {e}") from None
    except LineageError as e:
        raise Unresolved(f"--model {ref!r}: cannot be resolved through lineage ({e}): check --lineage / "
                         "$FLASHOPS_LINEAGE_URL or give a model or checkpoint URI") from None
    # a checkpoint URI is evaluated as named; a name or lineage id means what is served (its export) when known
    exported = art.model_uri and (not art.checkpoint_uri or (art.source == "lineage" and art.checkpoint_uri != ref))
    return {"ref": ref, "model_uri": art.model_uri if exported else None,
            "checkpoint_uri": None if exported else art.checkpoint_uri}


def _load(target: dict):
    from flashops.serving.evaluation import load_for_eval
    from flashops.serving.loading import LoadError
    from flashops.storage import StoreError

    try:
        return load_for_eval(target["model_uri"], target["checkpoint_uri"])
    except (LoadError, StoreError, FileNotFoundError) as e:
        what = target["model_uri"] or target["checkpoint_uri"]
        raise Unresolved(f"--model {target['ref']!r} ({what}): cannot be loaded: {e}") from None


# ------------------------------------------------------------------------------------------ running


def run_evaluation(model_ref: str, suite_uris: list[str], *, max_tokens: int = 64, mtp_tokens: int = 0,
                   max_concurrency: int = 16, lineage=None, record: bool = True, name: str | None = None,
                   progress: Any = True, model_target: dict | None = None, answers_to: str | None = None) -> dict:
    """Resolve, load, evaluate, then (only when every task is done) record in lineage. Returns the result with
    "model", "evaluated" and "lineage_id" (None when not recorded). Raises SuiteError / EvalError / Unresolved
    for bad input, before any decoding. progress: True (a bar on stderr), False, or a factory
    (total, what) -> an object with tick(), describe(suite, mode, k, tasks) and close()."""
    from flashops.serving.evaluation import EvalOptions, evaluate, passes

    options = EvalOptions(max_tokens=max_tokens, mtp_tokens=mtp_tokens, max_concurrency=max_concurrency)
    from flashops.trainers.suites import load_suite

    suites = [load_suite(u) for u in suite_uris]
    target = model_target or resolve_model(model_ref, lineage)
    model, cfg, codec = _load(target)
    evaluated = target["model_uri"] or target["checkpoint_uri"]
    factory = _Bar if progress is True else progress or None
    bar = factory(passes(suites, model, options), evaluated) if factory else None
    answers: list[dict] = []
    try:
        result = evaluate(model, cfg, codec, suites, options, name=name or "eval", answers=answers,
                          on_task=bar.tick if bar else None, on_pass=bar.describe if bar else None)
    finally:
        if bar:
            bar.close()
    if answers_to:
        with open(answers_to, "w") as f:
            f.writelines(json.dumps(a) + "\n" for a in answers)
    result = {"model": model_ref, "evaluated": evaluated, **result}
    result["lineage_id"] = None
    if record and lineage:
        from flashops.api.lineage import NotFound

        try:
            result["lineage_id"] = lineage.add_evaluation(evaluated, {k: v for k, v in result.items()
                                                                     if k != "lineage_id"}, name=name)
        except NotFound as e:
            print(f"note: not recorded in lineage: {e}", file=sys.stderr)
    return result


class _Bar:
    """A progress bar on stderr (generations done / to do), so --json on stdout stays clean."""

    def __init__(self, total: int, what: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]eval[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=False)
        self.progress.start()
        self.task = self.progress.add_task(what.rsplit("/", 2)[-2] if "/" in what else what, total=total)

    def tick(self) -> None:
        self.progress.advance(self.task)

    def describe(self, suite: str, mode: str, k: int, tasks: int) -> None:
        self.progress.update(self.task, description=f"{suite} {mode} " + (f"k={k}" if k else "answers"))

    def close(self) -> None:
        self.progress.stop()


def print_result(result: dict, console=None) -> None:
    """One table per suite: per mode accuracy, tokens, accuracy per 1k tokens, acceptance k=1..3, wall time;
    then per-domain accuracy."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for suite in result["suites"]:
        table = Table(title=f"{suite['name']} ({suite['tasks']} tasks, {suite['sha256'][:19]}) on {result['evaluated']}")
        for col in ("mode", "tasks", "accuracy", "mean tokens", "acc / 1k tokens", "accept k=1", "k=2", "k=3", "wall"):
            table.add_column(col, justify="left" if col == "mode" else "right")
        for m in suite["modes"]:
            acc = m.get("acceptance_length") or {}
            table.add_row(m["mode"], str(m["tasks"]), f"{m['accuracy']:.3f}", f"{m['mean_tokens']:.1f}",
                          _f(m.get("accuracy_per_1k_tokens"), ".2f"), *(_f(acc.get(str(k)), ".2f") for k in (1, 2, 3)),
                          f"{m['wall_s']:.1f}s")
        console.print(table)
        for m in suite["modes"]:
            console.print(f"  {m['mode']} per domain: " + ", ".join(f"{d} {v:.3f}" for d, v in m["per_domain"].items()))
    console.print(f"wall time {result['wall_s']:.1f}s" + (f"; recorded as lineage:{result['lineage_id']}"
                                                           if result.get("lineage_id") else ""))


def _f(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


# ------------------------------------------------------------------------------------------ the command


def eval_command(
    model: str = typer.Option(..., "--model", help="model or checkpoint URI, a run or pipeline name, or lineage:<id>"),
    suite: List[str] = typer.Option(..., "--suite", help="builtin:rl-heldout, builtin:chat-smoke, file:///x.jsonl or "
                                    "s3://bucket/x.jsonl; repeat for several"),
    max_tokens: int = typer.Option(64, "--max-tokens", help="generated tokens per task at most (1..32768)"),
    mtp_tokens: int = typer.Option(0, "--mtp-tokens", help="speculative depth of the answering pass, 0..3 (as the "
                                   "deployment serves); acceptance at k=1..3 is measured either way"),
    concurrency: int = typer.Option(16, "--concurrency", help="tasks decoded together (the engine's slots)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON (the shape lineage records)"),
    answers: Optional[str] = typer.Option(None, "--answers", help="write every task's answer to this JSONL file"),
    lineage: Optional[str] = typer.Option(None, "--lineage", help="sqlite:///..., postgresql+psycopg://... or "
                                          "http(s)://... (default $FLASHOPS_LINEAGE_URL, else $FLASHOPS_HOME)"),
    record: bool = typer.Option(True, "--record/--no-record", help="record the evaluation in lineage when complete"),
    name: Optional[str] = typer.Option(None, "--name", help="a name for the recorded evaluation (e.g. the stage)"),
) -> None:
    """Evaluate a model on suites: accuracy, tokens, accuracy per 1k tokens, per domain, MTP acceptance k=1..3.

    Greedy decoding through the serving engine: the answers are the ones `flashops serve` gives.
    A suite is JSONL, one task per line: {"prompt", "answer", "match": exact|number|regex|contains,
    "domain", "thinking": true|false|null}; thinking null runs both modes.

    Examples:

        flashops eval --model quickstart --suite builtin:rl-heldout --suite builtin:chat-smoke

        flashops eval --model file:///root/.flashops/store/runs/quickstart-sft/step-80 --suite file:///data/qa.jsonl --json
    """
    from flashops.api.evaluation import SuiteError
    from flashops.serving.evaluation import EvalError

    lin = _lineage_or_exit(lineage)
    try:
        result = run_evaluation(model, list(suite), max_tokens=max_tokens, mtp_tokens=mtp_tokens, lineage=lin,
                                max_concurrency=concurrency, record=record, name=name, answers_to=answers)
    except (SuiteError, EvalError, Unresolved) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    finally:
        if lin:
            lin.close()
    if as_json:
        typer.echo(json.dumps(result))
    else:
        print_result(result)


def stage_evaluator(lineage, progress: Any = True):
    """The local eval stage (flashops.trainers.runner.LocalBackend's `evaluate`): evaluate the previous stage's
    checkpoint itself and record the result in lineage on it, named after the stage."""
    def evaluate(job, checkpoint: str) -> dict:
        p = job.spec.eval
        target = None if not checkpoint or "://" not in checkpoint else {
            "ref": checkpoint, "model_uri": None, "checkpoint_uri": checkpoint}
        return run_evaluation(checkpoint, p.suites, max_tokens=p.max_tokens, mtp_tokens=p.mtp_tokens,
                              max_concurrency=p.max_concurrency, lineage=lineage, name=job.stage,
                              progress=progress, model_target=target)

    return evaluate


def comparison_rows(before: dict | None, after: dict) -> list[tuple]:
    """(suite, mode, metric, before, after) for every suite and mode of `after`; before None when the earlier
    evaluation did not run that suite (or there is none)."""
    from flashops.api.evaluation import mode_figures

    rows = []
    for suite in after["suites"]:
        for m in suite["modes"]:
            old = mode_figures(before, suite["name"], m["mode"]) if before else None
            acc = m.get("acceptance_length") or {}
            old_acc = (old or {}).get("acceptance_length") or {}
            for label, key, new_v, old_v in (
                    ("accuracy", "accuracy", m["accuracy"], (old or {}).get("accuracy")),
                    ("mean tokens", "mean_tokens", m["mean_tokens"], (old or {}).get("mean_tokens")),
                    ("accuracy / 1k tokens", "accuracy_per_1k_tokens", m.get("accuracy_per_1k_tokens"),
                     (old or {}).get("accuracy_per_1k_tokens")),
                    *((f"acceptance k={k}", None, acc.get(str(k)), old_acc.get(str(k))) for k in (1, 2, 3))):
                rows.append((suite["name"], m["mode"], label, old_v, new_v))
    return rows


def print_comparison(stage: str, before_stage: str | None, before: dict | None, after: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"eval stage {stage}" + (f" (before: eval stage {before_stage})" if before_stage
                                                  else " (no earlier eval)"), caption=after["evaluated"])
    for col in ("suite", "mode", "metric", "before", "after"):
        table.add_column(col, justify="right" if col in ("before", "after") else "left")
    for suite, mode, metric, old, new in comparison_rows(before, after):
        table.add_row(suite, mode, metric, _f(old, ".3f"), _f(new, ".3f"))
    console.print(table)


def _lineage_or_exit(target: str | None):
    from flashops.api.lineage import LineageError, NullLineage, open_lineage

    try:
        return open_lineage(target)
    except (LineageError, OSError) as e:
        if target:
            typer.echo(f"error: --lineage {target}: {e}", err=True)
            raise typer.Exit(EXIT_USAGE)
        return NullLineage()  # the default cannot be opened: evaluate URIs anyway, record nothing


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
