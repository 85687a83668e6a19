"""`flashops lineage ...`: trace what produced a checkpoint, model or deployment, and serve the lineage API.

    flashops lineage show quickstart-chat                    # a node and its neighbours
    flashops lineage graph quickstart-chat --up --depth 10   # deployment -> model -> ... -> datasets
    flashops lineage graph builtin:pretrain-text --down --format mermaid
    flashops lineage resolve quickstart                      # the checkpoint/model a name stands for
    flashops lineage diff quickstart-pretrain quickstart-sft
    flashops lineage serve --db postgresql+psycopg://postgres@127.0.0.1:5432/test --port 8080

IDs are lineage:<n> (or n), a URI, or a run, deployment, pipeline or model name. The database is the
embedded SQLite in $FLASHOPS_HOME unless --lineage (or $FLASHOPS_LINEAGE_URL) names another:
sqlite:///..., postgresql+psycopg://..., or http(s)://... (token from $FLASHOPS_LINEAGE_TOKEN).
"""
from __future__ import annotations

import json
from typing import Optional

import typer

EXIT_USAGE = 2
EXIT_FAILED = 1

lineage_app = typer.Typer(help="Trace checkpoints, models and deployments back to their data; serve the lineage API.\n\n"
                          "Example:\n\n    flashops lineage graph quickstart-chat --up --depth 20",
                          no_args_is_help=True)

TargetOpt = typer.Option(None, "--lineage", "-l", envvar="FLASHOPS_LINEAGE_URL",
                         help="sqlite:///..., postgresql+psycopg://... or http(s)://...; default: SQLite in $FLASHOPS_HOME")


def _fail(e: Exception) -> typer.Exit:
    from flashops.api.lineage import InvalidInput, NotFound

    typer.echo(f"lineage: {e}", err=True)
    return typer.Exit(EXIT_USAGE if isinstance(e, (InvalidInput, NotFound)) else EXIT_FAILED)


def _open(target: Optional[str]):
    from flashops.api.lineage import LineageError, open_lineage

    try:
        return open_lineage(target)
    except LineageError as e:
        raise _fail(e) from None


def _run(target: Optional[str], fn):
    from flashops.api.lineage import LineageError

    lin = _open(target)
    try:
        return fn(lin)
    except LineageError as e:
        raise _fail(e) from None
    finally:
        lin.close()


@lineage_app.command("show")
def show(ref: str = typer.Argument(..., help="lineage:<id>, a URI, or a run/deployment/pipeline/model name"),
         target: Optional[str] = TargetOpt,
         as_json: bool = typer.Option(False, "--json", help="print the raw answer")) -> None:
    """A node with every recorded field and its direct neighbours.

    Example:

        flashops lineage show quickstart-rl
    """
    from flashops.api.lineage.render import describe

    got = _run(target, lambda lin: lin.node(ref))
    if as_json:
        typer.echo(json.dumps(got, indent=2))
        return
    node = got["node"]
    typer.echo(describe(node))
    for key, value in node.items():
        if key in ("id", "ref", "type", "label") or value in (None, {}, "") or (key == "result" and node["type"] == "evaluation"):
            continue
        typer.echo(f"  {key}: {json.dumps(value) if isinstance(value, (dict, list)) else value}")
    if node["type"] == "evaluation":
        from flashops.api.lineage.render import evaluation_lines

        for line in evaluation_lines(node.get("result") or {}):
            typer.echo(f"  {line}")
    for title, arrow, items in (("upstream", "<-", got["upstream"]), ("downstream", "->", got["downstream"])):
        if items:
            typer.echo(f"{title}:")
            for item in items:
                typer.echo(f"  {arrow} {item['edge']}: {describe(item['node'])}")


@lineage_app.command("graph")
def graph(ref: str = typer.Argument(..., help="lineage:<id>, a URI, or a run/deployment/pipeline/model name"),
          up: bool = typer.Option(True, "--up/--down", help="ancestors (what produced it) or descendants"),
          depth: int = typer.Option(10, "--depth", "-d", help="hops to follow (1..100)"),
          fmt: str = typer.Option("tree", "--format", "-o", help="tree, mermaid or dot"),
          limit: int = typer.Option(1000, "--limit", help="at most this many edges"),
          target: Optional[str] = TargetOpt) -> None:
    """Ancestors (--up, the default) or descendants (--down) to a depth, as a tree, Mermaid or DOT.

    Examples:

        flashops lineage graph quickstart-chat --up --depth 20

        flashops lineage graph builtin:pretrain-text --down --format mermaid > lineage.mmd
    """
    from flashops.api.lineage.render import FORMATS, render

    if fmt not in FORMATS:
        typer.echo(f"--format {fmt!r}: use one of {', '.join(FORMATS)}", err=True)
        raise typer.Exit(EXIT_USAGE)
    if not 1 <= depth <= 100:
        typer.echo(f"--depth {depth}: use 1..100", err=True)
        raise typer.Exit(EXIT_USAGE)
    walk = _run(target, lambda lin: (lin.ancestors if up else lin.descendants)(ref, depth=depth, limit=limit))
    typer.echo(render(walk, fmt))


@lineage_app.command("resolve")
def resolve(ref: str = typer.Argument(..., help="lineage:<id>, a URI, a run/pipeline/deployment name"),
            target: Optional[str] = TargetOpt) -> None:
    """Print the URI of the checkpoint or model a reference stands for (what a ModelDeployment serves).

    Example:

        flashops lineage resolve quickstart
    """
    typer.echo(_run(target, lambda lin: lin.resolve(ref))["uri"])


@lineage_app.command("diff")
def diff(a: str, b: str, target: Optional[str] = TargetOpt) -> None:
    """The differences between two runs' specs.

    Example:

        flashops lineage diff quickstart-sft sft-debug
    """
    got = _run(target, lambda lin: lin.diff_runs(a, b))
    if not got["changes"]:
        typer.echo("same spec")
    for c in got["changes"]:
        typer.echo(f"{c['path']}: {json.dumps(c['a'])} -> {json.dumps(c['b'])}")


@lineage_app.command("serve")
def serve(db: Optional[str] = typer.Option(None, "--db", envvar="FLASHOPS_LINEAGE_DB",
                                           help="sqlite:///PATH or postgresql+psycopg://...; default SQLite in $FLASHOPS_HOME"),
          host: str = typer.Option("127.0.0.1", "--host"),
          port: int = typer.Option(8080, "--port"),
          workers: int = typer.Option(1, "--workers", help="uvicorn worker processes (PostgreSQL; SQLite: keep 1)")) -> None:
    """Start the lineage HTTP API (OpenAPI docs at /docs). Tokens come from FLASHOPS_LINEAGE_TOKENS
    ("tok:read,tok2:read+write"), FLASHOPS_LINEAGE_TOKENS_FILE or FLASHOPS_LINEAGE_TOKEN; with none, one
    read+write token is generated and printed.

    Example:

        flashops lineage serve --db postgresql+psycopg://postgres@127.0.0.1:5432/test --port 8081
    """
    from flashops.api.lineage import LineageError
    from flashops.api.lineage.auth import TokenConfigError
    from flashops.api.lineage.serve import run

    if db is not None and not db.startswith(("sqlite", "postgresql")):
        typer.echo(f"--db {db!r}: use sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB", err=True)
        raise typer.Exit(EXIT_USAGE)
    if not 1 <= workers <= 64:
        typer.echo(f"--workers {workers}: use 1..64", err=True)
        raise typer.Exit(EXIT_USAGE)
    try:
        run(db, host, port, workers, say=lambda m: typer.echo(m, err=True))
    except TokenConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(EXIT_USAGE) from None
    except LineageError as e:
        raise _fail(e) from None


def ui(db: Optional[str] = typer.Option(None, "--db", envvar="FLASHOPS_LINEAGE_DB",
                                        help="sqlite:///PATH or postgresql+psycopg://...; default SQLite in $FLASHOPS_HOME"),
       port: int = typer.Option(8765, "--port", help="port on 127.0.0.1 (0: any free port)"),
       open_browser: bool = typer.Option(True, "--open/--no-open", help="open the browser (else print the link)")) -> None:
    """Open the dashboard (pipelines, runs and their curves, the lineage graph, evaluations, deployments) over
    the local lineage, on 127.0.0.1 only, logged in with a read-only token made for this process.

    Example:

        flashops ui

    On a cluster the lineage API serves the same pages at /ui (flashops lineage serve, or the Helm chart).
    """
    from flashops.api.lineage import LineageError
    from flashops.api.lineage.serve import open_dashboard

    if db is not None and not db.startswith(("sqlite", "postgresql")):
        typer.echo(f"--db {db!r}: use sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB", err=True)
        raise typer.Exit(EXIT_USAGE)
    if not 0 <= port <= 65535:
        typer.echo(f"--port {port}: use 1..65535 (or 0 for any free port)", err=True)
        raise typer.Exit(EXIT_USAGE)
    try:
        open_dashboard(db, port, open_browser, say=lambda m: typer.echo(m, err=True))
    except LineageError as e:
        raise _fail(e) from None
    except (OSError, RuntimeError) as e:  # the port is taken
        typer.echo(f"flashops ui: cannot serve on 127.0.0.1:{port}: {e}; pick another --port", err=True)
        raise typer.Exit(EXIT_FAILED) from None


def register(app: typer.Typer) -> None:
    app.add_typer(lineage_app, name="lineage")
    app.command("ui")(ui)
