"""The lineage HTTP API (FastAPI): the direct-SQL store behind bearer-token auth.

    flashops lineage serve --db postgresql+psycopg://postgres@127.0.0.1:5432/test --port 8080
    curl -H "Authorization: Bearer $TOKEN" 127.0.0.1:8080/v1/resolve?ref=quickstart
    open http://127.0.0.1:8080/docs                      # the OpenAPI docs

Writes (scope `write`): POST /v1/datasets, /v1/runs, /v1/runs/{id}/finish, /v1/runs/{id}/metrics, /v1/checkpoints, /v1/models,
/v1/deployments, /v1/deployments/{id}/close, /v1/evaluations, /v1/events (a batch in one transaction).
Reads (scope `read`): GET /v1/nodes (filters + pagination), /v1/nodes/{id} (with neighbours),
/v1/nodes/{id}/ancestors|descendants?depth=N, /v1/nodes/{id}/provenance|derived, /v1/runs/diff?a=&b=,
/v1/runs/{id}/metrics, /v1/nodes/{id}/evaluations (newest first),
/v1/resolve?ref=, /v1/find?ref=. GET /healthz needs no token. Every error is application/problem+json.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException

from flashops.api.lineage import migrate
from flashops.api.lineage.auth import Tokens, scopes_of
from flashops.api.lineage.errors import Forbidden, LineageError, Unauthorized, Unavailable
from flashops.api.lineage.metrics import CONTENT_TYPE, LineageMetrics, MetricsMiddleware
from flashops.api.lineage.models import NODE_TYPES
from flashops.api.lineage.queries import MAX_DEPTH, MAX_LIMIT
from flashops.api.lineage.store import SqlLineage
from flashops.api.lineage.validate import MAX_ID, RUN_STATUSES

PROBLEM = "application/problem+json"
def NodeId():  # a fresh Param per use: FastAPI binds a Param object to the first name it is used for
    return Path(ge=1, le=MAX_ID, description="a lineage id (the number in lineage:<id>)")
# What the store accepts, said in the schema so the OpenAPI document and the server agree: ids are 1..2^63-1,
# names and URIs are not empty. Lengths are checked in UTF-8 bytes by the store (JSON Schema counts characters).
Id = Annotated[int, Field(ge=1, le=MAX_ID)]
Ref = Union[Id, Annotated[str, Field(min_length=1, max_length=2048)]]  # an id, "lineage:<id>", a URI or a name
_Text = dict(max_length=2048, description="at most 2048 bytes of UTF-8")


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetIn(Body):
    uri: str = Field(min_length=1, **_Text, examples=["s3://data/pretrain/v3"])
    content_hash: str | None = Field(None, max_length=128)
    version: str | None = Field(None, max_length=128)
    derived_from: Ref | None = Field(None, description="the dataset this one was made from (e.g. the rows a "
                                     "prepared token dataset was tokenized from): an id or a dataset URI")


class RunIn(Body):
    name: str = Field(min_length=1, max_length=253, examples=["quickstart-pretrain"])
    kind: str = Field("TrainingRun", min_length=1, max_length=64)
    stage: str = Field(min_length=1, max_length=64, examples=["pretrain"])
    spec: dict[str, Any] = Field(default_factory=dict)
    spec_hash: str = Field(min_length=1, max_length=128)
    k8s_ref: dict[str, Any] | str | None = None
    consumed: list[Union[Id, Annotated[str, Field(min_length=1, max_length=2048)], dict[str, Any]]] = Field(
        default_factory=list, max_length=1000)
    initialized_from: Ref | None = None
    pipeline: str | None = Field(None, max_length=253)


class FinishIn(Body):
    status: str = Field(max_length=16, description=f"one of {', '.join(RUN_STATUSES)}")
    metrics: dict[str, Any] | None = None


class CheckpointIn(Body):
    run_id: Ref
    uri: str = Field(min_length=1, **_Text)
    step: int | None = Field(None, ge=0, le=MAX_ID)
    manifest_hash: str | None = Field(None, max_length=128)
    metrics: dict[str, Any] | None = None


class ModelIn(Body):
    checkpoint_id: Ref | None = None
    uri: str = Field(min_length=1, **_Text)
    name: str = Field(min_length=1, max_length=253)
    version: str = Field(min_length=1, max_length=128)
    quantization: str = Field("none", max_length=32)
    manifest_hash: str | None = Field(None, max_length=128)


class DeploymentIn(Body):
    model_id: Ref = Field(description="a model or checkpoint id, or a model URI")
    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = Field(None, max_length=253)
    k8s_ref: dict[str, Any] | str | None = None
    traffic_percent: int = Field(100, ge=0, le=100)


class EvaluationIn(Body):
    target_id: Ref = Field(description="the evaluated checkpoint or model: an id or its URI")
    result: dict[str, Any] = Field(description="what `flashops eval --json` prints: {suites: [{name, sha256, modes: "
                                   "[{mode, accuracy, mean_tokens, accuracy_per_1k_tokens, acceptance_length, "
                                   "per_domain, tasks}]}], wall_s}")
    name: str | None = Field(None, max_length=253)


class MetricsIn(Body):
    rows: list[dict[str, Any]] = Field(max_length=10_000, examples=[[{"step": 1, "loss": 2.3, "lr": 1e-3}]])


class Event(Body):
    op: Literal["upsert_dataset", "start_run", "finish_run", "add_checkpoint", "add_model", "add_deployment",
                "close_deployment", "record_metrics", "add_evaluation"]
    args: dict[str, Any] = Field(default_factory=dict, description='"$N" stands for the id event N returned')


class EventsIn(Body):
    events: list[Event] = Field(max_length=10_000)


class Created(BaseModel):
    id: int
    ref: str


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str


_PROBLEMS = {code: {"model": Problem, "content": {PROBLEM: {}}, "description": desc} for code, desc in
             [(400, "the body is not parseable JSON"), (401, "no or unknown bearer token"), (403, "the token lacks the scope"),
              (404, "no such node"), (409, "conflicts with what is recorded"), (422, "invalid input"),
              (500, "a database failure that a retry cannot cure"), (503, "database unavailable: retry")]}


def problem(status: int, title: str, detail: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"type": "about:blank", "title": title, "status": status, "detail": detail},
                        status_code=status, media_type=PROBLEM, headers=headers)


def create_app(store: SqlLineage, tokens: Tokens) -> FastAPI:
    app = FastAPI(title="flashops lineage", version="1",
                  description="What produced every checkpoint, model and deployment.", responses=_PROBLEMS)
    metrics = LineageMetrics()
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    bearer = HTTPBearer(auto_error=False, description="a token with scope read and/or write")

    def require(scope: str):
        def check(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
            if creds is None or not creds.credentials:
                raise Unauthorized("no bearer token: send Authorization: Bearer <token> (FLASHOPS_LINEAGE_TOKEN)")
            scopes = scopes_of(tokens, creds.credentials)
            if scopes is None:
                raise Unauthorized("unknown bearer token")
            if scope not in scopes:
                raise Forbidden(f"this token has scope(s) {'+'.join(sorted(scopes))}; this call needs '{scope}'")
        return Depends(check)

    read, write = [require("read")], [require("write")]

    @app.exception_handler(LineageError)
    def _lineage_error(_: Request, e: LineageError):
        if e.from_database:
            metrics.database_error(e.status)
        headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
        return problem(e.status, e.title, str(e), headers)

    @app.exception_handler(RequestValidationError)
    def _invalid(_: Request, e: RequestValidationError):
        # not a value the schema refuses: the body could not be parsed as JSON at all (or was not sent as JSON)
        unparsed = [err for err in e.errors() if err.get("type") == "json_invalid" or (
            tuple(err.get("loc", ())) == ("body",) and isinstance(err.get("input"), (bytes, str)))]
        if unparsed:
            why = (unparsed[0].get("ctx") or {}).get("error") or "not sent as application/json"
            return problem(400, "Malformed body", f"the body is not valid JSON ({why}): "
                                                   "send a JSON object with Content-Type: application/json")
        parts = []
        for err in e.errors()[:10]:
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg')}")
        return problem(422, "Invalid input", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    def _http(_: Request, e: StarletteHTTPException):
        return problem(e.status_code, str(e.detail) if e.status_code != 404 else "Not found",
                       str(e.detail), getattr(e, "headers", None))

    @app.exception_handler(Exception)
    def _bug(_: Request, e: Exception):  # never expected; still a problem document, not a stack trace
        return problem(500, "Internal error", f"{type(e).__name__}: the server logged the details")

    def created(i: int) -> dict:
        return {"id": i, "ref": f"lineage:{i}"}

    # ------------------------------------------------------------------ health

    @app.get("/healthz", tags=["health"], responses={503: _PROBLEMS[503]})
    def healthz() -> dict:
        """Liveness and readiness: the database answers and the schema is at the head revision."""
        try:
            with store.engine.connect() as c:
                c.execute(text("SELECT 1"))
            rev = migrate.current(store.engine)
        except Exception as e:  # noqa: BLE001 - any database failure means not ready
            err = Unavailable(f"database: {type(e).__name__}")
            err.from_database = True
            raise err from None
        return {"status": "ok", "schema": rev}

    @app.get("/metrics", tags=["health"], response_class=Response,
             responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text exposition"}})
    def prometheus_metrics():
        """Prometheus metrics (no token): requests by route and status, latency, database errors."""
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------ writes

    @app.post("/v1/datasets", response_model=Created, dependencies=write, tags=["record"])
    def upsert_dataset(body: DatasetIn):
        return created(store.upsert_dataset(body.uri, body.content_hash, body.version, body.derived_from))

    @app.post("/v1/runs", response_model=Created, dependencies=write, tags=["record"])
    def start_run(body: RunIn):
        return created(store.start_run(**body.model_dump()))

    @app.post("/v1/runs/{run_id}/finish", response_model=Created, dependencies=write, tags=["record"])
    def finish_run(body: FinishIn, run_id: int = NodeId()):
        store.finish_run(run_id, body.status, body.metrics)
        return created(run_id)

    @app.post("/v1/runs/{run_id}/metrics", dependencies=write, tags=["record"])
    def record_metrics(body: MetricsIn, run_id: int = NodeId()) -> dict:
        """Per-step metrics of a run (a step sent again replaces its row)."""
        return {"id": run_id, "rows": store.record_metrics(run_id, body.rows)}

    @app.post("/v1/checkpoints", response_model=Created, dependencies=write, tags=["record"])
    def add_checkpoint(body: CheckpointIn):
        return created(store.add_checkpoint(**body.model_dump()))

    @app.post("/v1/models", response_model=Created, dependencies=write, tags=["record"])
    def add_model(body: ModelIn):
        return created(store.add_model(**body.model_dump()))

    @app.post("/v1/deployments", response_model=Created, dependencies=write, tags=["record"])
    def add_deployment(body: DeploymentIn):
        return created(store.add_deployment(**body.model_dump()))

    @app.post("/v1/deployments/{deployment_id}/close", response_model=Created, dependencies=write, tags=["record"])
    def close_deployment(deployment_id: int = NodeId()):
        store.close_deployment(deployment_id)
        return created(deployment_id)

    @app.post("/v1/evaluations", response_model=Created, dependencies=write, tags=["record"])
    def add_evaluation(body: EvaluationIn):
        """A complete evaluation of a checkpoint or model (the same result again is the same node)."""
        return created(store.add_evaluation(body.target_id, body.result, body.name))

    @app.post("/v1/events", dependencies=write, tags=["record"])
    def record_events(body: EventsIn) -> dict:
        """Many write events in one transaction (all or nothing); "$N" in args = the id event N returned."""
        return {"results": store.record_events([e.model_dump() for e in body.events])}

    # ------------------------------------------------------------------ reads

    def Depth():
        return Query(10, ge=1, le=MAX_DEPTH)

    def Limit():
        return Query(1000, ge=1, le=MAX_LIMIT)

    @app.get("/v1/nodes", dependencies=read, tags=["query"])
    def list_nodes(type: Literal[NODE_TYPES] | None = None,  # type: ignore[valid-type]
                   name: str | None = Query(None, max_length=253), uri: str | None = Query(None, max_length=2048),
                   pipeline: str | None = Query(None, max_length=253),
                   status: str | None = Query(None, max_length=16),
                   after: int | None = Query(None, ge=0, le=MAX_ID, description="the previous page's `next`"),
                   limit: int = Query(50, ge=1, le=MAX_LIMIT)) -> dict:
        return store.list_nodes(type=type, name=name, uri=uri, pipeline=pipeline, status=status, after=after,
                                limit=limit)

    @app.get("/v1/nodes/{node_id}", dependencies=read, tags=["query"])
    def get_node(node_id: int = NodeId(), limit: int = Query(100, ge=1, le=MAX_LIMIT)) -> dict:
        """A node with its upstream and downstream neighbours."""
        return store.node(node_id, limit)

    @app.get("/v1/nodes/{node_id}/ancestors", dependencies=read, tags=["query"])
    def ancestors(node_id: int = NodeId(), depth: int = Depth(), limit: int = Limit()) -> dict:
        return store.ancestors(node_id, depth, limit)

    @app.get("/v1/nodes/{node_id}/descendants", dependencies=read, tags=["query"])
    def descendants(node_id: int = NodeId(), depth: int = Depth(), limit: int = Limit()) -> dict:
        return store.descendants(node_id, depth, limit)

    @app.get("/v1/nodes/{node_id}/provenance", dependencies=read, tags=["query"])
    def provenance(node_id: int = NodeId()) -> dict:
        """What data and which runs produced this deployment (or any node): all ancestors, by type."""
        return store.provenance(node_id)

    @app.get("/v1/nodes/{node_id}/derived", dependencies=read, tags=["query"])
    def derived(node_id: int = NodeId()) -> dict:
        """Which checkpoints, models and deployments derive from this dataset (or any node)."""
        return store.derived(node_id)

    @app.get("/v1/runs/{run_id}/metrics", dependencies=read, tags=["query"])
    def run_metrics(run_id: int = NodeId(), max_points: int = Query(2000, ge=2, le=MAX_LIMIT)) -> dict:
        """A run's curves: steps and one series per metric (every stride-th step past max_points)."""
        return store.run_metrics(run_id, max_points)

    @app.get("/v1/nodes/{node_id}/evaluations", dependencies=read, tags=["query"])
    def evaluations(node_id: int = NodeId()) -> dict:
        """The evaluations of a checkpoint or model (for a model, also its checkpoint's), newest first."""
        return {"items": store.evaluations(node_id)}

    @app.get("/v1/runs/diff", dependencies=read, tags=["query"])
    def diff_runs(a: int = Query(ge=1, le=MAX_ID), b: int = Query(ge=1, le=MAX_ID)) -> dict:
        """The difference between two runs' specs."""
        return store.diff_runs(a, b)

    @app.get("/v1/resolve", dependencies=read, tags=["query"])
    def resolve(ref: str = Query(min_length=1, max_length=2048, examples=["quickstart"])) -> dict:
        """lineage:<id>, a URI, a run/pipeline/deployment name -> the checkpoint or model to use."""
        return store.resolve(ref)

    @app.get("/v1/find", response_model=Created, dependencies=read, tags=["query"])
    def find(ref: str = Query(min_length=1, max_length=2048)):
        """The id of what an id, a URI or a name (run, deployment, pipeline, model) means."""
        return created(store.find(ref))

    from flashops.api.lineage.ui import mount_ui

    mount_ui(app, store, tokens)  # the dashboard under /ui (its own module; same tokens, read scope)
    return app
