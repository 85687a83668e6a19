"""`flashops operator`: run the kopf operator, in a pod or against your kubeconfig.

    flashops operator                          # watches the whole cluster
    flashops operator --namespace ml --runtime trainjob --s3-endpoint http://minio.minio:9000

Every setting also comes from FLASHOPS_* environment variables (see flashops.operator.config).
"""
from __future__ import annotations

from typing import Optional

import typer

EXIT_USAGE = 2


def operator(
    namespace: Optional[str] = typer.Option(None, "--namespace", "-n", help="watch one namespace (default: all)"),
    runtime: Optional[str] = typer.Option(None, help="default Kubeflow runtime: pytorchjob | trainjob"),
    s3_endpoint: Optional[str] = typer.Option(None, help="object store URL given to every pod"),
    lineage_url: Optional[str] = typer.Option(None, help="lineage service URL (default: $FLASHOPS_LINEAGE_URL)"),
    liveness: Optional[str] = typer.Option(None, help="liveness endpoint, e.g. http://0.0.0.0:8080/healthz"),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="log every API call"),
) -> None:
    """Run the flashops operator (reconciles TrainingRun, TrainingPipeline, ModelDeployment).

    Examples:

        flashops operator                                   # against ~/.kube/config or in-cluster

        flashops operator -n team-a --runtime trainjob --s3-endpoint https://minio.minio:9000
    """
    import kopf

    from flashops.operator.config import ConfigError, OperatorConfig
    from flashops.operator.main import run_operator

    try:
        config = OperatorConfig.from_env(namespace=namespace, runtime=runtime, s3_endpoint=s3_endpoint,
                                         lineage_url=lineage_url)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    kopf.configure(verbose=verbose)
    run_operator(config, liveness=liveness)


def register(app: typer.Typer) -> None:
    app.command()(operator)
