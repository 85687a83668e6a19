"""`flashops render -f FILE`: print the child manifests the operator would create, without a cluster.

    flashops render -f examples/quickstart.yaml
    flashops render -f examples/pretrain.yaml --runtime trainjob --s3-endpoint https://s3.example.com
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer

EXIT_USAGE = 2
RENDER_DEFAULT_ENDPOINT = "http://minio:9000"


def render(
    files: List[Path] = typer.Option(..., "--file", "-f", help="YAML file(s) with TrainingRun/TrainingPipeline/ModelDeployment"),
    namespace: str = typer.Option("default", "--namespace", "-n", help="namespace the children go to"),
    runtime: Optional[str] = typer.Option(None, help="pytorchjob | trainjob (default: $FLASHOPS_RUNTIME or pytorchjob)"),
    s3_endpoint: Optional[str] = typer.Option(None, help=f"object store URL (default: $FLASHOPS_S3_ENDPOINT, else {RENDER_DEFAULT_ENDPOINT})"),
    image: Optional[str] = typer.Option(None, help="trainer/predictor image (default: $FLASHOPS_IMAGE)"),
    model_uri: Optional[str] = typer.Option(None, help="model URI for ModelDeployments (default: their spec.source)"),
) -> None:
    """Print the Kubernetes objects the operator creates for these specs (multi-document YAML).

    Examples:

        flashops render -f examples/quickstart.yaml

        flashops render -f examples/rl.yaml --runtime trainjob -n team-a
    """
    import yaml

    from flashops.api.spec import SpecError, load_file
    from flashops.operator.children import InvalidObject
    from flashops.operator.config import ConfigError, OperatorConfig
    from flashops.operator.render import render_objects

    try:
        endpoint = s3_endpoint or os.environ.get("FLASHOPS_S3_ENDPOINT") or RENDER_DEFAULT_ENDPOINT
        config = OperatorConfig.from_env(runtime=runtime, s3_endpoint=endpoint, image=image)
        objects = [o for f in files for o in load_file(f)]
        docs = render_objects(objects, config, namespace=namespace, model_uri=model_uri)
    except SpecError as e:
        for line in e.problems:
            typer.echo(line, err=True)
        raise typer.Exit(EXIT_USAGE)
    except (ConfigError, InvalidObject) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    typer.echo(yaml.safe_dump_all(docs, sort_keys=False), nl=False)


def register(app: typer.Typer) -> None:
    app.command()(render)
