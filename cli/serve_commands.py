"""`flashops serve`: run the predictor locally (the same server the InferenceService runs), on 127.0.0.1.

    flashops serve -f examples/deployment.yaml                  # source resolved through lineage
    flashops serve --model file:///home/me/.flashops/store/models/chat/v1 --mtp-tokens 3 --port 8080
    curl 127.0.0.1:8080/openai/v1/chat/completions -d '{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}'
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

EXIT_USAGE = 2


def serve(
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="a YAML file with one ModelDeployment"),
    model: Optional[str] = typer.Option(None, "--model", help="model export URI (overrides the deployment's source)"),
    name: Optional[str] = typer.Option(None, "--name", help="served model name (default: deployment or export name)"),
    quantization: Optional[str] = typer.Option(None, "--quantization", help="none | int4 (default: the deployment's)"),
    mtp_tokens: Optional[int] = typer.Option(None, "--mtp-tokens", help="MTP draft tokens 0-3 (default: the deployment's)"),
    max_concurrency: Optional[int] = typer.Option(None, "--max-concurrency", help="sequences decoded together"),
    host: str = typer.Option("127.0.0.1", "--host", help="bind address; 0.0.0.0 exposes it to the network"),
    port: int = typer.Option(8080, "--port"),
) -> None:
    """Serve a model with KServe's v1/v2 protocols and OpenAI routes under /openai/v1."""
    if file is None and model is None:
        typer.echo("error: give a deployment (-f deployment.yaml) or a model URI (--model s3://.../models/<name>/<v>)",
                   err=True)
        raise typer.Exit(EXIT_USAGE)
    from flashops.serving.loading import LoadError, ServeOptions, load_predictor
    from flashops.storage import StoreError

    overrides = {k: v for k, v in {"quantization": quantization, "mtp_tokens": mtp_tokens,
                                   "max_concurrency": max_concurrency, "name": name}.items() if v is not None}
    try:
        if file is not None:
            from flashops.api.spec import SpecError, load_file

            try:
                objs = [o for o in load_file(file) if o.kind == "ModelDeployment"]
            except SpecError as e:
                typer.echo("\n".join(e.problems), err=True)
                raise typer.Exit(EXIT_USAGE)
            if len(objs) != 1:
                typer.echo(f"error: {file} holds {len(objs)} ModelDeployment objects; serve needs exactly one", err=True)
                raise typer.Exit(EXIT_USAGE)
            options = ServeOptions.from_deployment(objs[0], model_uri=model)
            for key, value in overrides.items():
                setattr(options, key, value)
            options.__post_init__()
        else:
            options = ServeOptions(model_uri=model, **overrides)
        predictor = load_predictor(options)
    except (LoadError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    except StoreError as e:  # unreachable store, missing export, corrupt file: not a usage error
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    from flashops.serving.server import run

    typer.echo(f"serving {predictor.name} on http://{host}:{port}  (OpenAI: /openai/v1, KServe: /v1, /v2)")
    run([predictor], host=host, port=port)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
