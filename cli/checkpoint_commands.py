"""`flashops checkpoints list|show|verify|gc URI`: look into a checkpoint store (file:// or s3://).

    flashops checkpoints list s3://ckpts/team-a                  # every complete checkpoint
    flashops checkpoints list s3://ckpts/team-a/runs/sft-1       # one run
    flashops checkpoints show s3://ckpts/team-a/runs/sft-1/step-200
    flashops checkpoints verify s3://ckpts/team-a/runs/sft-1/step-200   # re-hash every object
    flashops checkpoints gc s3://ckpts/team-a/runs/sft-1 --keep 3 --pin 100 --dry-run
    flashops checkpoints export s3://ckpts/team-a/runs/sft-1/step-200 --name chat --version v1 [--int4]

S3 endpoint and credentials come from FLASHOPS_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (see
flashops.storage.settings). Exit codes: 0 ok, 1 store error (corrupt, unreachable, ...), 2 bad usage.
No torch is imported (export imports it, in the command).
"""
from __future__ import annotations

import json
import re
from typing import List, Optional

import typer
from rich.console import Console

EXIT_FAIL, EXIT_USAGE = 1, 2
out = Console(soft_wrap=True, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)
_RUN_URI = re.compile(r"^(?P<root>.+?)/runs/(?P<run>[^/]+)/?$")

checkpoints = typer.Typer(name="checkpoints", help="List, show, verify, garbage-collect and export stored checkpoints.\n\n"
                          "Example:\n\n    flashops checkpoints list file://$HOME/.flashops/store",
                          no_args_is_help=True)


def _fail(e: Exception) -> typer.Exit:
    from flashops.storage import StoreConfigError

    err.print(f"error: {e}", markup=False)
    return typer.Exit(EXIT_USAGE if isinstance(e, StoreConfigError) else EXIT_FAIL)


def _store_and_run(uri: str):
    from flashops.storage import open_store

    m = _RUN_URI.match(uri)
    return (open_store(m["root"]), m["run"]) if m else (open_store(uri), None)


def _target(uri: str):
    """(store, URI, is_model) for what show/verify name: an exported model, a checkpoint, or a run (its latest)."""
    from flashops.storage import StoreConfigError, split_checkpoint_uri
    from flashops.storage.store import MODEL_URI

    if MODEL_URI.match(uri) and "/runs/" not in uri:
        return _store_and_run(MODEL_URI.match(uri)["root"])[0], uri, True
    try:
        return _store_and_run(split_checkpoint_uri(uri)[0])[0], uri, False
    except StoreConfigError:
        store, run = _store_and_run(uri)
        ref = store.latest(run) if run else None
        if ref is None:
            raise StoreConfigError(f"{uri!r} is not a checkpoint URI (<store>/runs/<run>/step-<n>) nor a run "
                                   "with a complete checkpoint; see flashops checkpoints list") from None
        return store, ref.uri, False


def _human(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


@checkpoints.command("list")
def list_(uri: str = typer.Argument(..., help="store (s3://bucket/prefix, file:///dir) or <store>/runs/<run>"),
          as_json: bool = typer.Option(False, "--json", help="one JSON object per line")) -> None:
    """List complete checkpoints (partial ones are skipped with a warning), oldest first.

    Examples:

        flashops checkpoints list file://$HOME/.flashops/store

        flashops checkpoints list s3://flashops/checkpoints/runs/quickstart-pretrain --json
    """
    from flashops.storage import StoreError

    try:
        store, run = _store_and_run(uri)
        refs = store.list(run)
        models = store.list_models() if run is None else []
    except StoreError as e:
        raise _fail(e)
    if as_json:
        for r in refs:
            out.print(json.dumps({"run": r.run, "step": r.step, "uri": r.uri, "created": r.created,
                                  "manifest_sha256": r.manifest_sha256}), markup=False)
        return
    if not refs and not models:
        out.print(f"no complete checkpoints in {uri}", markup=False)
        return
    for r in refs:
        out.print(f"{r.run:24} step {r.step:<8} {r.created:20}  {r.uri}", markup=False)
    for m in models:
        out.print(f"model {m.name}:{m.version}  {m.uri}", markup=False)


@checkpoints.command()
def show(uri: str = typer.Argument(..., help="<store>/runs/<run>/step-<n> or <store>/models/<name>/<version>")) -> None:
    """Print a checkpoint's (or exported model's) manifest: step, world size, parent, spec hash, objects.

    Example:

        flashops checkpoints show file://$HOME/.flashops/store/runs/quickstart-rl/step-20
    """
    from flashops.storage import StoreError

    try:
        store, uri, is_model = _target(uri)
        doc = store.model_manifest(uri) if is_model else store.read_manifest(uri)
    except StoreError as e:
        raise _fail(e)
    total = sum(o["size"] for o in doc["objects"].values())
    out.print(json.dumps(doc, indent=2, sort_keys=True), markup=False)
    out.print(f"# {len(doc['objects'])} objects, {_human(total)}", markup=False)


@checkpoints.command()
def verify(uri: str = typer.Argument(..., help="<store>/runs/<run>/step-<n>, <store>/runs/<run> (its latest) "
                                              "or <store>/models/<name>/<version>")) -> None:
    """Read every object and check its size and sha256 against the manifest; exit 1 naming a bad object.

    Example:

        flashops checkpoints verify file://$HOME/.flashops/store/runs/quickstart-rl
    """
    from flashops.storage import StoreError

    try:
        store, uri, _ = _target(uri)
        report = store.verify(uri)
    except StoreError as e:
        raise _fail(e)
    out.print(f"OK {report.uri}: {report.objects} objects, {_human(report.total_bytes)}, sha256 verified in "
              f"{report.seconds:.2f}s", markup=False)


@checkpoints.command()
def gc(uri: str = typer.Argument(..., help="<store>/runs/<run>"),
       keep: int = typer.Option(..., "--keep", "-k", min=1, help="newest complete checkpoints to keep"),
       pin: Optional[List[int]] = typer.Option(None, "--pin", help="step to keep as well (repeatable)"),
       dry_run: bool = typer.Option(False, "--dry-run", help="only print what would be deleted")) -> None:
    """Delete old checkpoints of one run: keep the newest K, pinned ones (--pin, or pinned by a resume or a
    deployment), and any save that may still be running.

    Example:

        flashops checkpoints gc file://$HOME/.flashops/store/runs/quickstart-pretrain --keep 1 --dry-run
    """
    from flashops.storage import StoreConfigError, StoreError

    try:
        store, run = _store_and_run(uri)
        if run is None:
            raise StoreConfigError(f"gc works on one run: give <store>/runs/<run>, e.g. {uri.rstrip('/')}/runs/my-run")
        report = store.gc(run, keep, pinned=pin or (), dry_run=dry_run)
    except StoreError as e:
        raise _fail(e)
    verb = "would delete" if dry_run else "deleted"
    for u in report.deleted:
        out.print(f"{verb} {u}", markup=False)
    for u in report.removed_partial:
        out.print(f"{verb} partial {u}", markup=False)
    out.print(f"kept {len(report.kept)}: " + ", ".join(f"step-{r.step}" for r in report.kept), markup=False)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000, '512MiB' -> 536870912, '1000' -> 1000 bytes."""
    m = _SIZE.match(text or "")
    if not m or float(m[1]) <= 0:
        raise typer.BadParameter(f"{text!r} is not a size: use e.g. 5GB, 512MiB or a number of bytes")
    return int(float(m[1]) * _UNITS[(m[2] or "b").lower()])


@checkpoints.command("export")
def export(uri: str = typer.Argument(..., help="<store>/runs/<run>/step-<n>"),
           name: str = typer.Option(..., "--name", help="exported model name: <store>/models/NAME/VERSION"),
           version: Optional[str] = typer.Option(None, "--version", help="default: step-<n> of the checkpoint"),
           int4: bool = typer.Option(False, "--int4", help="also write int4/ with INT4 routed experts (always "
                                     "written when the run trained with QAT, with its group size)"),
           max_file_size: str = typer.Option("5GB", "--max-file-size", help="largest safetensors file (HF "
                                             "convention 5GB); e.g. 2GB, 512MiB")) -> None:
    """Export a checkpoint (an older one too) as a serving model in the same store; prints its URI.

    The export is a Hugging Face DeepSeek-V3 folder (sharded safetensors + index, config.json, MTP layer,
    tokenizer; int4/ in compressed-tensors pack-quantized INT4) that transformers, vLLM, SGLang and
    `flashops serve` load. It is streamed one tensor at a time: memory stays at the largest tensor, not the
    model.

    Example:

        flashops checkpoints export file://$HOME/.flashops/store/runs/sft-1/step-200 --name chat --version v1
    """
    from flashops.storage import StoreError, split_checkpoint_uri

    limit = parse_size(max_file_size)
    try:
        root, _, step = split_checkpoint_uri(uri)
        store = _store_and_run(root)[0]
        store.meta(uri)  # a complete checkpoint, before anything is read
    except StoreError as e:
        raise _fail(e)
    from flashops.trainers.runner import export_model

    err.print(f"exporting {uri} to {store.model_uri(name, version or f'step-{step}')} (streamed, files <= "
              f"{_human(limit)}{', with int4/' if int4 else ''})", markup=False)
    try:
        out.print(export_model(store, None, uri, name, version, int4=int4, max_file_bytes=limit), markup=False)
    except StoreError as e:
        raise _fail(e)


def register(app: typer.Typer) -> None:
    app.add_typer(checkpoints, name="checkpoints")
