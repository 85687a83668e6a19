"""`flashops data prepare|show|verify`: tokenize a dataset once into token shards, look at one, check one.

    flashops data prepare --input s3://raw/c4/ --output s3://prep/c4-v1                 # pretrain text rows
    flashops data prepare -f examples/sft.yaml --output file:///data/prep/chat-v1      # the run's data.uri and stage
    flashops data prepare --input 's3://raw/c4/part-*.parquet' --output s3://prep/c4-v1 --worker 0 --workers 4
    flashops data prepare --input s3://raw/c4/ --output s3://prep/c4-v1 --workers 4 --finalize
    flashops data prepare --input s3://raw/c4/ --output s3://prep/c4-v1 --workers 8 --render-job prepare-c4 | kubectl apply -f -
    flashops data show s3://prep/c4-v1
    flashops data verify s3://prep/c4-v1

A run trains on the result with `data: {uri: s3://prep/c4-v1}`. The dataset is recorded in lineage
(--lineage, default $FLASHOPS_LINEAGE_URL, else SQLite in $FLASHOPS_HOME) as a version derived from its
source. Exit codes: 0 done, 2 bad input or usage (nothing written that looks complete), 1 a store failure.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

EXIT_FAIL, EXIT_USAGE = 1, 2
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

data = typer.Typer(name="data", no_args_is_help=True,
                   help="Prepare (tokenize once), show and verify datasets of token shards.\n\n"
                   "Example:\n\n    flashops data prepare --input s3://raw/c4/ --output s3://prep/c4-v1")


def _error(message: str, code: int) -> typer.Exit:
    err.print(f"error: {message}", markup=False)
    return typer.Exit(code)


def _from_spec(file: Path) -> tuple[str, str, str]:
    """(data.uri, stage, data.format) of the one TrainingRun in a spec file."""
    from flashops.api.spec import SpecError, TrainingRun, load_file

    try:
        runs = [o for o in load_file(str(file)) if isinstance(o, TrainingRun)]
    except SpecError as e:
        raise _error(str(e), EXIT_USAGE)
    if len(runs) != 1 or runs[0].spec.data is None or runs[0].spec.data.uri.startswith("builtin:"):
        raise _error(f"{file}: give a file with one TrainingRun whose spec.data.uri is user data (s3://..., "
                     "file://...); or use --input URI --stage STAGE", EXIT_USAGE)
    spec = runs[0].spec
    return spec.data.uri, spec.stage, spec.data.format


@data.command()
def prepare(
    file: Optional[Path] = typer.Option(None, "-f", "--file", help="a TrainingRun spec: prepare its data.uri for its stage"),
    input_uri: Optional[str] = typer.Option(None, "--input", help="rows: one object, a prefix (s3://b/corpus/) or a "
                                            "glob (file:///data/*.parquet)"),
    output: str = typer.Option(..., "--output", help="where the prepared dataset goes (s3://... or file:///...)"),
    stage: Optional[str] = typer.Option(None, "--stage", help="pretrain (text rows) or sft (messages rows); "
                                        "default: the spec's, else pretrain"),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="a tokenizers JSON file (default: the "
                                             "model's; training refuses data from another tokenizer)"),
    fmt: str = typer.Option("auto", "--format", help="auto, jsonl or parquet"),
    shard_tokens: int = typer.Option(1 << 24, "--shard-tokens", help="tokens per output shard"),
    worker: Optional[int] = typer.Option(None, "--worker", envvar="JOB_COMPLETION_INDEX",
                                         help="this worker's index (with --workers): takes source shards worker, "
                                         "worker + workers, ... (default in an Indexed Job: its completion index)"),
    workers: int = typer.Option(1, "--workers", help="how many workers share the source shards"),
    finalize: bool = typer.Option(False, "--finalize", help="after the workers: write the manifest (and lineage)"),
    finalize_when_done: bool = typer.Option(False, "--finalize-when-done", help="worker 0 waits for the others, "
                                            "then writes the manifest (one Job, no separate finalize step)"),
    render_job: Optional[str] = typer.Option(None, "--render-job", help="print a Kubernetes Indexed Job of this "
                                             "name running --workers pods (kubectl apply -f -), prepare nothing"),
    namespace: str = typer.Option("default", "--namespace", help="the rendered Job's namespace"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a prepared dataset at --output"),
    version: Optional[str] = typer.Option(None, "--version", help="lineage version (default: the manifest "
                                          "hash's first 12 digits)"),
    lineage: Optional[str] = typer.Option(None, "--lineage", help="sqlite:///..., postgresql+psycopg://... or "
                                          "http(s)://...; 'off' records nothing"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Tokenize rows once into packed token shards + document index + manifest (written last).

    Examples:

        flashops data prepare --input s3://raw/c4/ --output s3://prep/c4-v1

        flashops data prepare -f examples/sft.yaml --output file:///data/prep/chat-v1
    """
    from flashops.trainers.errors import DataError
    from flashops.trainers.prepare import prepare as run_prepare

    if (file is None) == (input_uri is None):
        raise _error("give exactly one of -f SPEC (a TrainingRun with data.uri) or --input URI", EXIT_USAGE)
    if file is not None:
        input_uri, spec_stage, spec_fmt = _from_spec(file)
        stage, fmt = stage or spec_stage, spec_fmt if fmt == "auto" else fmt
    if fmt not in ("auto", "jsonl", "parquet"):
        raise _error(f"--format {fmt!r}: use auto, jsonl or parquet", EXIT_USAGE)
    if render_job:
        _render(render_job, input_uri, output, workers, stage or "pretrain", shard_tokens, namespace)
        return
    lin = None
    finalizes = worker is None or finalize or (finalize_when_done and worker == 0)
    if finalizes and lineage != "off":
        from flashops.api.lineage import open_lineage

        lin = open_lineage(lineage)
    try:
        result = run_prepare(input_uri, output, stage or "pretrain", fmt=fmt,
                             tokenizer=str(tokenizer) if tokenizer else None, shard_tokens=shard_tokens,
                             worker=None if finalize else worker, workers=workers, finalize_only=finalize,
                             overwrite=overwrite, lineage=lin, version=version,
                             finalize_when_done=finalize_when_done)
    except DataError as e:
        raise _error(str(e), EXIT_USAGE)
    if as_json:
        out.print(json.dumps(result.to_dict()), markup=False)
        return
    what = "prepared" if result.manifest_sha256 else f"worker {worker}/{workers} tokenized its shards of"
    out.print(f"{what} {result.uri}: {result.tokens:,} tokens, {result.documents:,} documents, {result.shards} "
              f"shard(s) from {result.sources} source shard(s) in {result.seconds:.1f}s "
              f"({result.tokens_per_s:,.0f} tokens/s)", markup=False)
    if result.manifest_sha256:
        out.print(f"manifest sha256 {result.manifest_sha256}  version {result.version}"
                  + (f"  lineage:{result.lineage_id}" if result.lineage_id else ""), markup=False)
        out.print(f"train on it with  data: {{uri: {result.uri}}}", markup=False)


def _render(name: str, input_uri: str, output: str, workers: int, stage: str, shard_tokens: int,
            namespace: str) -> None:
    import yaml

    from flashops.operator.children import InvalidObject
    from flashops.operator.config import OperatorConfig
    from flashops.operator.data_jobs import prepare_job

    try:
        job = prepare_job(name, input_uri, output, workers, OperatorConfig.from_env(), stage=stage,
                          namespace=namespace, shard_tokens=shard_tokens if shard_tokens != 1 << 24 else None)
    except InvalidObject as e:
        raise _error(str(e), EXIT_USAGE)
    out.print(yaml.safe_dump(job, sort_keys=False), markup=False, end="")


def _open(uri: str):
    from flashops.storage import StoreError
    from flashops.storage.datasets import open_token_dataset

    try:
        return open_token_dataset(uri, check=False)
    except StoreError as e:
        raise _error(str(e), EXIT_FAIL)


@data.command()
def show(uri: str = typer.Argument(..., help="a prepared dataset (s3://... or file:///...)")) -> None:
    """Print a prepared dataset's manifest (stage, tokenizer sha256, tokens, shards).

    Example:

        flashops data show s3://prep/c4-v1
    """
    ds = _open(uri)
    doc = dict(ds.manifest.fields)
    doc["manifest_sha256"] = ds.manifest_sha256
    doc["objects"] = len(ds.manifest.objects)
    doc["bytes"] = ds.manifest.total_bytes
    doc["shards"] = [s["name"] for s in doc["shards"]]
    out.print(json.dumps(doc, indent=2, sort_keys=True), markup=False)


@data.command()
def verify(uri: str = typer.Argument(..., help="a prepared dataset (s3://... or file:///...)")) -> None:
    """Re-hash every shard against the manifest; exit 1 naming the first bad one.

    Example:

        flashops data verify s3://prep/c4-v1
    """
    from flashops.storage import StoreError

    ds = _open(uri)
    try:
        ds.check_objects()
        n = ds.verify()
    except StoreError as e:
        raise _error(str(e), EXIT_FAIL)
    out.print(f"ok: {len(ds.manifest.objects)} objects, {n:,} bytes match {uri}/manifest.json", markup=False)


def register(app: typer.Typer) -> None:
    app.add_typer(data, name="data")
