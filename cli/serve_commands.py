"""`flashops serve`: run the predictor locally (the same server the InferenceService runs), on 127.0.0.1.

    flashops serve -f examples/deployment.yaml                  # source resolved through lineage
    flashops serve --model file:///home/me/.flashops/store/models/chat/v1 --mtp-tokens 3 --port 8080
    curl 127.0.0.1:8080/openai/v1/chat/completions -d '{"model": "chat", "messages": [{"role": "user", "content": "hi"}]}'
"""
from __future__ import annotations

import errno
import os
import socket
import uuid
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
    port: int = typer.Option(8080, "--port", help="TCP port 1..65535; it must be free"),
    ignore_gate: bool = typer.Option(False, "--ignore-gate", help="serve the new model even when the deployment's "
                                     "spec.promotion gate blocks it (the decision is still printed)"),
) -> None:
    """Serve a model with KServe's v1/v2 protocols and OpenAI routes under /openai/v1 (127.0.0.1 by default).

    With -f, a deployment's spec.promotion gate is applied to the model its source resolves to, from the
    evaluations recorded in lineage (flashops eval, eval stages): a model that fails it is not served; the
    model the previous `flashops serve -f` of this deployment served is, and the numbers say why.
    speculative.mtpTokens: auto picks k from the served model's recorded MTP acceptance lengths.

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
    from flashops.serving.server import bind
    from flashops.storage import StoreError

    # the port first: a bad or busy port is known in a millisecond, before the model loads or lineage is touched
    try:
        sock = bind(host, port)
    except ValueError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    except OSError as e:
        typer.echo(f"error: cannot listen on {host}:{port}: {e.strerror or e}"
                   + (" (another process is using it: stop it, or pick another --port)" if e.errno == errno.EADDRINUSE
                      else ": pick another --host/--port"), err=True)
        raise typer.Exit(EXIT_USAGE)

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
            if objs[0].spec.runtime == "vllm":  # the same spec on a cluster runs vLLM through KServe (docs/serving.md)
                typer.echo("note: runtime vllm runs on a cluster (KServe + vLLM on GPUs); locally the same export is "
                           "served by the flashops runtime, at the same /openai/v1 URLs", err=True)
            options = ServeOptions.from_deployment(objs[0], model_uri=model)
            for key, value in overrides.items():
                setattr(options, key, value)
            spec = objs[0].spec
            if spec.promotion is not None or spec.speculative.mtp_tokens == "auto":
                try:
                    options.model_uri, k = apply_gate(objs[0], options.model_uri, ignore_gate=ignore_gate)
                except GateBlocked as e:
                    sock.close()
                    typer.echo(f"error: {e}", err=True)
                    raise typer.Exit(1)
                if k is not None and mtp_tokens is None:
                    options.mtp_tokens = k
            if spec.canary_traffic_percent is not None and spec.canary_traffic_percent < 100:
                typer.echo(f"note: canaryTrafficPercent {spec.canary_traffic_percent} splits traffic on a cluster "
                           "(KServe); locally the model above serves every request")
            options.__post_init__()
        else:
            options = ServeOptions(model_uri=model, **overrides)
        predictor = load_predictor(options)
    except (LoadError, ValueError) as e:
        sock.close()
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE)
    except StoreError as e:  # unreachable store, missing export, corrupt file: not a usage error
        sock.close()
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    from flashops.serving.server import run

    # recorded only once the port is ours and the model is loaded, and under this process's own identity, so
    # closing it below can never end the deployment record of another `flashops serve` of the same deployment
    deployment_id = _record_deployment(objs[0], options.model_uri) if file is not None else None
    typer.echo(f"serving {predictor.name} on http://{host}:{port}  (OpenAI: /openai/v1, KServe: /v1, /v2)")
    try:
        run([predictor], host=host, port=port, sock=sock)
    finally:
        sock.close()
        if deployment_id is not None:
            _close_deployment(deployment_id)


class GateBlocked(RuntimeError):
    """The deployment's promotion gate blocks the new model and nothing was served before to fall back on."""


def apply_gate(deployment, candidate: str, *, ignore_gate: bool = False, lineage=None,
               say=typer.echo) -> tuple[str, int | None]:
    """(the model to serve, the k of mtpTokens: auto or None): spec.promotion decided by flashops.api.promotion.decide
    (the operator's decision too) from the evaluations recorded in lineage; the current model is the one the newest
    `flashops serve -f` of this deployment served. Says what it serves and why."""
    from flashops.api.promotion import choose_mtp_tokens, decide, deployment_mode, recorded_evaluations

    spec = deployment.spec
    mode = deployment_mode(spec.thinking)
    if lineage is None:
        try:
            from flashops.api.lineage import open_lineage

            lineage = open_lineage()
        except Exception as e:  # noqa: BLE001 - no lineage: nothing is recorded, the gate cannot pass
            lineage = None
            why = f"lineage cannot be opened ({e})"
    serve = candidate
    if spec.promotion is not None:
        if lineage is None:
            if not ignore_gate:
                raise GateBlocked(f"spec.promotion of {deployment.name} reads recorded evaluations, but {why}: check "
                                  "$FLASHOPS_LINEAGE_URL, or pass --ignore-gate to serve it ungated")
            current, decision = None, None
        else:
            current = served_before(lineage, deployment)
            compare = current if spec.promotion.compare_to == "current" and current and current != candidate else None
            decision = decide(spec.promotion, recorded_evaluations(lineage, candidate),
                              recorded_evaluations(lineage, compare) if compare else None, candidate=candidate,
                              current=current, mode=mode, mtp_tokens=spec.speculative.mtp_tokens)
            say(decision.message)
        if decision is not None and not decision.passed:
            if ignore_gate:
                say(f"serving {candidate} anyway (--ignore-gate)")
            elif current:
                serve = current
                say(f"serving the current model {current} instead (the last one `flashops serve -f` served as "
                    f"{deployment.name})")
            else:
                raise GateBlocked(f"nothing to serve: {candidate} is blocked by spec.promotion and no model was served "
                                  f"as {deployment.name} before; record a passing evaluation (flashops eval --model "
                                  f"{candidate} --suite SUITE), change the gate, or pass --ignore-gate")
    k = None
    if spec.speculative.mtp_tokens == "auto":
        choice = choose_mtp_tokens(recorded_evaluations(lineage, serve) if lineage is not None else [], mode=mode)
        k = choice.k
        say(choice.message)
    return serve, k


def served_before(lineage, deployment) -> str | None:
    """The model the newest deployment record of this name (and namespace) served: the gate's current model."""
    newest, after = None, None
    while True:
        page = lineage.list_nodes(type="deployment", name=deployment.name, after=after, limit=500)
        for node in page.get("items") or []:
            if (node.get("namespace") or None) == (deployment.metadata.namespace or None):
                newest = node
        after = page.get("next")
        if not after:
            break
    if newest is None or newest.get("model_id") is None:
        return None
    try:
        return (lineage.node(newest["model_id"], limit=1).get("node") or {}).get("uri")
    except LookupError:
        return None


def process_identity() -> dict:
    """What tells this serving process's deployment record apart from any other's (the uid is part of the
    lineage key of an open deployment, as a Kubernetes uid is for the operator's)."""
    return {"uid": f"local-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}", "kind": "flashops serve",
            "host": socket.gethostname(), "pid": os.getpid()}


def _record_deployment(deployment, model_uri: str):
    """Local serving is a deployment too: record what it serves, so `flashops lineage graph` can trace
    it back to its data. Lineage being unavailable never stops serving; it is said once."""
    try:
        from flashops.api.lineage import open_lineage

        did = open_lineage().add_deployment(model_uri, deployment.metadata.name, deployment.metadata.namespace,
                                            process_identity(), deployment.spec.canary_traffic_percent or 100)
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
