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
    """Serve a model with KServe's v1/v2 protocols and OpenAI routes under /openai/v1 (127.0.0.1 by default).

    Examples:
        flashops serve -f examples/quickstart.yaml          # the ModelDeployment in the file; source via lineage
        flashops serve --model file:///root/.flashops/store/models/quickstart/step-20 --mtp-tokens 3
        curl 127.0.0.1:8080/openai/v1/chat/completions -H 'content-type: application/json' \\
             -d '{"model": "quickstart-chat", "messages": [{"role": "user", "content": "What is 2 + 3?"}]}'
    """
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

    deployment_id = _record_deployment(objs[0], options.model_uri) if file is not None else None
    typer.echo(f"serving {predictor.name} on http://{host}:{port}  (OpenAI: /openai/v1, KServe: /v1, /v2)")
    try:
        run([predictor], host=host, port=port)
    finally:
        if deployment_id is not None:
            _close_deployment(deployment_id)


def _record_deployment(deployment, model_uri: str):
    """Local serving is a deployment too: record what it serves, so `flashops lineage graph` can trace
    it back to its data. Lineage being unavailable never stops serving; it is said once."""
    try:
        from flashops.api.lineage import open_lineage

        did = open_lineage().add_deployment(model_uri, deployment.metadata.name, deployment.metadata.namespace,
                                            None, deployment.spec.canary_traffic_percent or 100)
        typer.echo(f"lineage: deployment {deployment.metadata.name} recorded as lineage:{did}")
        return did
    except Exception as e:  # noqa: BLE001 - any lineage failure is reported, serving goes on
        typer.echo(f"warning: lineage not recorded for deployment {deployment.metadata.name}: {e}", err=True)
        return None


def _close_deployment(deployment_id) -> None:
    try:
        from flashops.api.lineage import open_lineage

        open_lineage().close_deployment(deployment_id)
    except Exception as e:  # noqa: BLE001
        typer.echo(f"warning: lineage deployment lineage:{deployment_id} not closed: {e}", err=True)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
