"""Lineage recorded directly in SQL (SQLite or PostgreSQL): the service layer behind the HTTP API and
the embedded default of `flashops run`.

    from flashops.api.lineage import open_lineage
    lin = open_lineage("sqlite:////tmp/lineage.db")          # migrates to head on open
    ds = lin.upsert_dataset("builtin:pretrain-text")
    run = lin.start_run("quickstart-pretrain", "TrainingRun", "pretrain", spec, spec_hash,
                        consumed=[ds], pipeline="quickstart")
    ck = lin.add_checkpoint(run, "file:///.../step-200", 200, "sha256:...", {"loss": 2.1})
    lin.finish_run(run, "succeeded", {"loss": 2.1})
    lin.resolve("quickstart")["uri"]                         # the pipeline's final checkpoint (or model)
    ev = lin.add_evaluation(ck, {"suites": [...], "wall_s": 3.2})   # `flashops eval`'s result, once complete
    lin.evaluations(ck)                                      # newest first

Every write is one transaction (the artifact and its edges land together or not at all) and idempotent
(natural keys: URI for datasets/checkpoints/models, name+spec_hash+k8s uid for runs, namespace+name+uid+
model for open deployments), so the trainer and the operator may retry any call.
"""
from __future__ import annotations

import functools
import hashlib
import inspect
import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

from sqlalchemy import bindparam, case, create_engine, event, func, insert, null, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from flashops.api.lineage import migrate, queries
from flashops.api.lineage import validate as V
from flashops.api.lineage.errors import (Conflict, DatabaseError, InvalidInput, LineageError, NotFound,
                                          Unavailable)
from flashops.api.lineage.models import (Checkpoint, Dataset, Deployment, Edge, Evaluation, Model, Node, Run, RunMetrics,
                                         utcnow)

T = TypeVar("T")
WRITE_OPS = ("upsert_dataset", "start_run", "finish_run", "add_checkpoint", "add_model", "add_deployment",
             "close_deployment", "record_metrics", "add_evaluation")
MAX_METRIC_ROWS = 10_000  # per call: a trainer reports every few steps, so one call is never near it
URI_SCHEMES = ("s3://", "file://", "builtin:", "gs://", "hf://", "http://", "https://")


def default_sqlite_url() -> str:
    from flashops.api.home import flashops_home

    return f"sqlite:///{flashops_home() / 'lineage.db'}"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[1] if "///" in url else ""
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        else:  # in memory: one shared connection, or every session sees an empty database
            engine = create_engine("sqlite://", connect_args={"check_same_thread": False}, poolclass=StaticPool)

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")  # `flashops lineage serve` reads while `flashops run` writes
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    if url.startswith("postgresql"):
        return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)
    raise InvalidInput(f"database url {url!r}: use sqlite:///PATH or postgresql+psycopg://USER@HOST:PORT/DB")


# SQLSTATE classes a retry can cure: connection (08), resources (53), shutdown/cancel/statement timeout (57),
# deadlock and serialization (40001, 40P01), lock timeout (55P03). Everything else is permanent.
_TRANSIENT_CLASSES = ("08", "53", "57")
_TRANSIENT_STATES = ("40001", "40P01", "55P03")
_SQLITE_TRANSIENT = ("database is locked", "database is busy", "unable to open database", "disk i/o error")


def database_error(e: Exception) -> LineageError:
    err = _classify(e)
    err.from_database = True
    return err


def _classify(e: Exception) -> LineageError:
    """The one place that decides whether a database failure is worth a retry: only connection loss and
    timeouts are Unavailable (503, temporary). A value the database cannot hold (class 22 data exception,
    class 54 program limit, e.g. an index row too large) is InvalidInput (422, permanent): retrying the
    same request can never succeed. Anything else is DatabaseError (500, permanent)."""
    if isinstance(e, PoolTimeout):
        return Unavailable(f"lineage database busy: no connection free ({e})")
    orig = getattr(e, "orig", None)
    message = str(orig or e).strip().splitlines()[0] if str(orig or e).strip() else type(e).__name__
    state = getattr(orig, "sqlstate", None) or ""
    if isinstance(e, DBAPIError) and e.connection_invalidated:
        return Unavailable(f"lineage database connection lost: {message}")
    if state[:2] in _TRANSIENT_CLASSES or state in _TRANSIENT_STATES:
        return Unavailable(f"lineage database error (retry): {message}")
    if not state and isinstance(e, OperationalError):
        # psycopg sets no SQLSTATE when it cannot connect or lost the connection; SQLite never sets one
        sqlite = type(orig).__module__.startswith("sqlite3")
        if not sqlite or message.lower().startswith(_SQLITE_TRANSIENT):
            return Unavailable(f"lineage database error (retry): {message}")
    if state[:2] in ("22", "54") or (not state and e.__class__.__name__ == "DataError"):
        return InvalidInput(f"the database cannot store this value ({message}): send a smaller or simpler value")
    return DatabaseError(f"lineage database error: {message}")


def is_uri(ref: str) -> bool:
    return ref.startswith(URI_SCHEMES) or "://" in ref


class SqlLineage:
    """The Lineage contract on a SQLAlchemy engine (see flashops.api.lineage for the method list)."""

    def __init__(self, url: str | None = None, *, migrate_on_open: bool = True):
        self.url = url or default_sqlite_url()
        self.engine = make_engine(self.url)
        self._local = threading.local()  # the open batch session of this thread, if any
        if migrate_on_open:
            try:
                migrate.upgrade(self.engine)
            except (OperationalError, PoolTimeout) as e:
                raise Unavailable(f"cannot open the lineage database {self.engine.url!r}: {getattr(e, 'orig', e)}") from None

    def __repr__(self) -> str:
        return f"SqlLineage({self.engine.url!r})"

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------ transactions

    def _write(self, fn: Callable[[Session], T]) -> T:
        """Run fn in one transaction. A unique-key race with another writer is retried once: the second
        attempt finds the row the other writer committed, which is exactly the idempotent answer."""
        batch = getattr(self._local, "session", None)
        if batch is not None:
            return fn(batch)
        for attempt in (0, 1):
            try:
                with Session(self.engine, expire_on_commit=False) as s, s.begin():
                    return fn(s)
            except IntegrityError:
                if attempt:
                    raise
            except (DBAPIError, PoolTimeout) as e:
                raise database_error(e) from None
        raise AssertionError("unreachable")

    @contextmanager
    def batch(self):
        """Every write inside the block lands in ONE transaction (all or nothing); ingestion is much faster."""
        if getattr(self._local, "session", None) is not None:
            yield self
            return
        try:
            with Session(self.engine, expire_on_commit=False) as s, s.begin():
                self._local.session = s
                try:
                    yield self
                finally:
                    self._local.session = None
        except IntegrityError:
            raise _Race("a concurrent writer recorded the same artifact while this batch ran: send the batch "
                        "again (recording is idempotent)") from None
        except (DBAPIError, PoolTimeout) as e:
            if getattr(getattr(e, "orig", None), "sqlstate", None) in ("40P01", "40001"):  # deadlock / serialization
                raise _Race(f"concurrent batches collided ({e.orig}): send the batch again") from None
            raise database_error(e) from None

    def record_events(self, events: list[dict]) -> list[Any]:
        """Apply write events {"op": "start_run", "args": {...}} in one transaction, in order; an argument
        "$N" stands for the id event N returned (so a batch can record a run and its checkpoints).
        Returns each event's result. One bad event rolls the whole batch back; the error names it."""
        if not isinstance(events, list):
            raise InvalidInput("events: expected a list of {op, args}")
        for attempt in range(5):  # a race on a shared artifact (two batches, one dataset): the retry finds it
            try:
                return self._record_events(events)
            except _Race:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def _record_events(self, events: list[dict]) -> list[Any]:
        results: list[Any] = []
        with self.batch():
            for i, ev in enumerate(events):
                op, args = (ev.get("op"), ev.get("args") or {}) if isinstance(ev, dict) else (None, None)
                if op not in WRITE_OPS or not isinstance(args, dict):
                    raise InvalidInput(f"events[{i}]: op {op!r} with args {type(args).__name__}: use op one of "
                                       f"{', '.join(WRITE_OPS)} and args an object")
                method = getattr(self, op)
                try:
                    bound = inspect.signature(method).bind(**{k: _backref(v, results) for k, v in args.items()})
                except TypeError as e:
                    raise InvalidInput(f"events[{i}] ({op}): {e}") from None
                try:
                    results.append(method(*bound.args, **bound.kwargs))
                except (InvalidInput, NotFound, Conflict) as e:
                    raise type(e)(f"events[{i}] ({op}): {e}") from None
        return results

    def read(self, fn: Callable[[Session], T]) -> T:
        """fn(session) in one read session (the dashboard's pages query through it)."""
        return self._read(fn)

    def _read(self, fn: Callable[[Session], T]) -> T:
        try:
            with Session(self.engine) as s:
                return fn(s)
        except (DBAPIError, PoolTimeout) as e:
            raise database_error(e) from None

    # ------------------------------------------------------------------ recording

    def upsert_dataset(self, uri: str, content_hash: str | None = None, version: str | None = None,
                       derived_from: Any = None) -> int:
        """A dataset version; derived_from (an id or a dataset URI) records the edge source -derived_as-> it."""
        uri = V.text("uri", uri, 2048)
        content_hash = V.text("content_hash", content_hash, 128, required=False)
        version = V.text("version", version, 128, required=False)

        def record(s: Session) -> int:
            ds = _dataset(s, uri, content_hash, version)
            if derived_from is not None:
                src = (_node_of_type(s, "derived_from", derived_from, ("dataset",), "a dataset derives from a dataset")
                       if V.is_id(derived_from) else _input_node(s, "derived_from", derived_from))
                if src == ds:
                    raise InvalidInput(f"derived_from: lineage:{src} is the dataset itself")
                _edge(s, src, ds, "derived_as")
            return ds

        return self._write(record)

    def start_run(self, name: str, kind: str, stage: str, spec: dict, spec_hash: str, k8s_ref: Any = None,
                  consumed: Iterable[Any] = (), initialized_from: Any = None, pipeline: str | None = None) -> int:
        name = V.text("name", name, 253)
        kind = V.text("kind", kind, 64)
        stage = V.text("stage", stage, 64)
        spec = V.json_object("spec", spec)
        spec_hash = V.text("spec_hash", spec_hash, 128)
        k8s = _k8s_ref(k8s_ref)
        pipeline = V.text("pipeline", pipeline, 253, required=False) or _pipeline_of(k8s) or None
        consumed = list(consumed or ())

        def record(s: Session) -> int:
            uid = (k8s or {}).get("uid") or ""
            run_id = _x(s, _RUN_BY_KEY, {"name": name, "spec_hash": spec_hash, "uid": uid}).scalar()
            if run_id is None:
                run_id = _new_node(s, "run", name, Run, name=name, kind=kind, stage=stage, pipeline=pipeline,
                                   spec=spec, spec_hash=spec_hash, status="running", started_at=utcnow(),
                                   metrics={}, k8s_ref=k8s, k8s_uid=uid)
            for i, item in enumerate(consumed):
                _edge(s, _input_node(s, f"consumed[{i}]", item), run_id, "consumed")
            if initialized_from is not None:
                _edge(s, _init_node(s, initialized_from), run_id, "initialized_from")
            return run_id

        return self._write(record)

    def finish_run(self, run_id: Any, status: str, metrics: dict | None = None) -> None:
        rid = V.node_id("run_id", run_id)
        status = V.status(status)
        metrics = V.json_object("metrics", metrics)

        def record(s: Session) -> None:
            _require(s, rid, "run", "run_id")
            # status moves forward only (V.STATUS_FROM); the first report of the end wins, a repeat changes nothing
            params = {"rid": rid, "status": status, "now": utcnow(), "allowed": list(V.STATUS_FROM[status])}
            if metrics:  # only then: Core would turn an unused "metrics" key into SET metrics = {}
                params["metrics"] = metrics
            done = _x(s, _FINISH[(status == "running", bool(metrics))], params)
            if done.rowcount == 0:
                current = _x(s, _STATUS_OF, {"rid": rid}).scalar()
                raise Conflict(f"status: run lineage:{rid} is already {current}, so it cannot become {status}: a run's "
                               "status only moves forward (running -> failed -> succeeded or cancelled); record a "
                               "new run to train again")

        self._write(record)

    def add_checkpoint(self, run_id: Any, uri: str, step: int | None, manifest_hash: str | None = None,
                       metrics: dict | None = None) -> int:
        rid = V.node_id("run_id", run_id)
        uri = V.text("uri", uri, 2048)
        step = V.optional_int("step", step, 0)
        manifest_hash = V.text("manifest_hash", manifest_hash, 128, required=False)
        metrics = V.json_object("metrics", metrics)

        def record(s: Session) -> int:
            _require(s, rid, "run", "run_id")
            ck = _x(s, _CKPT_BY_URI, {"uri": uri}).first()
            if ck is not None:
                if ck.run_id not in (None, rid):
                    raise Conflict(f"uri: checkpoint {uri} is already recorded as produced by run lineage:{ck.run_id}, "
                                   f"not lineage:{rid}: every save needs its own URI")
                if ck.run_id is None:  # known until now only as some run's initFrom: adopt it
                    s.execute(update(Checkpoint).where(Checkpoint.node_id == ck.node_id).values(
                        run_id=rid, step=step, manifest_hash=manifest_hash, metrics=metrics))
                _edge(s, rid, ck.node_id, "produced")
                return ck.node_id
            return _new_node(s, "checkpoint", uri, Checkpoint, (rid, "produced"), run_id=rid, uri=uri, step=step,
                             manifest_hash=manifest_hash, metrics=metrics)

        return self._write(record)

    def add_model(self, checkpoint_id: Any, uri: str, name: str, version: str, quantization: str = "none",
                  manifest_hash: str | None = None) -> int:
        cid = None if checkpoint_id is None else V.node_id("checkpoint_id", checkpoint_id)
        uri = V.text("uri", uri, 2048)
        name = V.text("name", name, 253)
        version = V.text("version", str(version) if isinstance(version, int) else version, 128)
        quantization = V.text("quantization", quantization or "none", 32)
        manifest_hash = V.text("manifest_hash", manifest_hash, 128, required=False)

        def record(s: Session) -> int:
            if cid is not None:
                _require(s, cid, "checkpoint", "checkpoint_id")
            m = s.scalar(select(Model).where(Model.uri == uri))
            if m is not None:
                if m.checkpoint_id != cid and cid is not None and m.checkpoint_id is not None:
                    raise Conflict(f"uri: model {uri} is already recorded as exported from lineage:{m.checkpoint_id}, "
                                   f"not lineage:{cid}: export each model version to its own URI")
                if m.checkpoint_id is None and cid is not None:
                    m.checkpoint_id = cid
                    _edge(s, cid, m.node_id, "exported_as")
                return m.node_id
            return _new_node(s, "model", f"{name}:{version}", Model, None if cid is None else (cid, "exported_as"),
                             checkpoint_id=cid, uri=uri, name=name, version=version, quantization=quantization,
                             manifest_hash=manifest_hash)

        return self._write(record)

    def add_deployment(self, model_id: Any, name: str, namespace: str | None = None, k8s_ref: Any = None,
                       traffic_percent: int | None = 100) -> int:
        name = V.text("name", name, 253)
        namespace = V.text("namespace", namespace, 253, required=False)
        k8s = _k8s_ref(k8s_ref)
        traffic = V.optional_int("traffic_percent", 100 if traffic_percent is None else traffic_percent, 0, 100)
        if not (V.is_id(model_id) or isinstance(model_id, str)):
            raise InvalidInput(f"model_id: {model_id!r} is neither a lineage id nor a model URI")

        def record(s: Session) -> int:
            served = _served_node(s, model_id, name)
            uid = (k8s or {}).get("uid") or ""
            d = s.scalar(select(Deployment).where(
                Deployment.namespace == namespace, Deployment.name == name, Deployment.k8s_uid == uid,
                Deployment.model_id == served, Deployment.ended_at.is_(None)))
            if d is not None:
                d.traffic_percent = traffic  # a canary moving 10 -> 100 is the same deployment
                return d.node_id
            return _new_node(s, "deployment", f"{namespace}/{name}" if namespace else name, Deployment,
                             (served, "deployed_as"), model_id=served, name=name, namespace=namespace, k8s_ref=k8s,
                             k8s_uid=uid, traffic_percent=traffic, started_at=utcnow())

        return self._write(record)

    def close_deployment(self, deployment_id: Any) -> None:
        did = V.node_id("deployment_id", deployment_id)

        def record(s: Session) -> None:
            d = _get(s, Deployment, did, "deployment_id")
            if d.ended_at is None:
                d.ended_at = utcnow()

        self._write(record)

    def record_metrics(self, run_id: Any, rows: list[dict]) -> int:
        """Per-step metrics of a run: rows like {"step": 12, "loss": 2.3, "lr": 1e-3}. A step reported again
        (a resumed run redoing it) replaces the earlier row. Returns how many rows were recorded."""
        rid = V.node_id("run_id", run_id)
        clean = metric_rows(rows)

        def record(s: Session) -> int:
            _require(s, rid, "run", "run_id")
            if clean:
                _x(s, _METRICS_UPSERT[s.bind.dialect.name == "postgresql"],
                   [{"run_id": rid, "step": step, "metrics": m} for step, m in clean])
            return len(clean)

        return self._write(record)

    def add_evaluation(self, target_id: Any, result: dict, name: str | None = None) -> int:
        """An evaluation of a checkpoint or model (an id, or its URI): `result` is what `flashops eval --json`
        prints ({"suites": [{"name", "sha256", "modes": [{"mode", "accuracy", ...}]}], "wall_s"}). Call it
        only when the evaluation is complete. The same result for the same target again is the same node."""
        result = V.evaluation_result("result", result)
        name = V.text("name", name, 253, required=False)
        digest = "sha256:" + hashlib.sha256(json.dumps(result, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        if not (V.is_id(target_id) or isinstance(target_id, str)):
            raise InvalidInput(f"target_id: {target_id!r} is neither a lineage id nor a checkpoint or model URI")

        def record(s: Session) -> int:
            target = _evaluated_node(s, target_id)
            found = s.scalar(select(Evaluation.node_id).where(Evaluation.target_id == target,
                                                              Evaluation.result_hash == digest))
            if found is not None:
                return found
            suites = ", ".join(str(x.get("name")) for x in result["suites"])
            label = f"{name or 'eval'} of lineage:{target}: {suites}"
            return _new_node(s, "evaluation", label, Evaluation, (target, "evaluated_as"), target_id=target,
                             name=name, result=result, result_hash=digest)

        return self._write(record)

    # ------------------------------------------------------------------ resolving and queries

    def evaluations(self, target_id: Any) -> list[dict]:
        """The evaluations of a checkpoint or model (an id, a URI or a name `find` knows), newest first; for a
        model, also those of the checkpoint it was exported from (the same weights; the eval stage evaluates
        checkpoints). Each: {"id", "ref", "created_at", "target_id", "name", "result", "label", "type"}."""
        return self._read(lambda s: queries.evaluations(s, queries.find(s, target_id)))

    def run_metrics(self, ref: Any, max_points: int = 2000) -> dict:
        """A run's curves: {"run_id", "steps": [...], "series": {name: [value or None per step]}, "rows",
        "stride"}; over `max_points` steps, every stride-th step (and the last) is returned."""
        return self._read(lambda s: queries.metric_curves(s, queries.find(s, ref), max_points))

    def resolve(self, ref: Any) -> dict:
        """"lineage:<id>", a checkpoint/model URI, a run, pipeline or deployment name -> the artifact to
        train from or serve: a dict with type, id, ref, uri, ..., plus `checkpoint` and `model` (the
        newest model exported from that checkpoint, or None). A run or pipeline gives its final checkpoint;
        when that checkpoint was exported, the top-level fields are the model's."""
        return self._read(lambda s: queries.resolve(s, ref))

    def find(self, ref: Any) -> int:
        """The node id a user means by an id, a URI or a name (run, deployment, pipeline, model)."""
        return self._read(lambda s: queries.find(s, ref))

    def node(self, ref: Any, limit: int = 100) -> dict:
        return self._read(lambda s: queries.node_with_neighbours(s, queries.find(s, ref), limit))

    def list_nodes(self, type: str | None = None, name: str | None = None, uri: str | None = None,
                   pipeline: str | None = None, status: str | None = None, after: int | None = None,
                   limit: int = 50) -> dict:
        return self._read(lambda s: queries.list_nodes(s, type=type, name=name, uri=uri, pipeline=pipeline,
                                                       status=status, after=after, limit=limit))

    def ancestors(self, ref: Any, depth: int = 10, limit: int = 1000) -> dict:
        return self._read(lambda s: queries.walk(s, queries.find(s, ref), "up", depth, limit))

    def descendants(self, ref: Any, depth: int = 10, limit: int = 1000) -> dict:
        return self._read(lambda s: queries.walk(s, queries.find(s, ref), "down", depth, limit))

    def provenance(self, ref: Any) -> dict:
        """What data and which runs produced this deployment (or any artifact): all ancestors by type."""
        return self._read(lambda s: queries.grouped(s, queries.find(s, ref), "up"))

    def derived(self, ref: Any) -> dict:
        """Which checkpoints, models and deployments derive from this dataset (or any artifact)."""
        return self._read(lambda s: queries.grouped(s, queries.find(s, ref), "down"))

    def diff_runs(self, a: Any, b: Any) -> dict:
        return self._read(lambda s: queries.diff_runs(s, queries.find(s, a), queries.find(s, b)))


# ---------------------------------------------------------------------- prebuilt statements
# The write path runs Core statements built once, with bound parameters, on the session's connection:
# building a statement and going through the ORM costs more than the database round trip
# (benchmarks/lineage_query.py measures events per server CPU-second).


def _x(s: Session, stmt: Any, params: dict):
    return s.connection().execute(stmt, params)


_RUN_BY_KEY = select(Run.node_id).where(Run.name == bindparam("name"), Run.spec_hash == bindparam("spec_hash"),
                                        Run.k8s_uid == bindparam("uid"))
_CKPT_BY_URI = select(Checkpoint.node_id, Checkpoint.run_id).where(Checkpoint.uri == bindparam("uri"))
_TYPE_OF = select(Node.type).where(Node.id == bindparam("id"))
_DATASET_BY_KEY = select(Dataset.node_id).where(Dataset.uri == bindparam("uri"),
                                                Dataset.content_hash == bindparam("content_hash"),
                                                Dataset.version == bindparam("version"))
_DATASET_BY_URI = select(Dataset.node_id).where(Dataset.uri == bindparam("uri")).order_by(Dataset.node_id.desc()).limit(1)
# finish_run: (back to running?, new metrics?) -> statement, applied only from an allowed status (V.STATUS_FROM);
# a repeat of the same end keeps the first reported end time
_FINISH = {
    (running, with_metrics): update(Run).where(Run.node_id == bindparam("rid"),
                                               Run.status.in_(bindparam("allowed", expanding=True))).values(
        status=bindparam("status"),
        finished_at=null() if running else case(
            (Run.status == bindparam("status"), func.coalesce(Run.finished_at, bindparam("now", type_=Run.finished_at.type))),
            else_=bindparam("now", type_=Run.finished_at.type)),
        **({"metrics": bindparam("metrics", type_=Run.metrics.type)} if with_metrics else {}))
    for running in (False, True) for with_metrics in (False, True)}
_STATUS_OF = select(Run.status).where(Run.node_id == bindparam("rid"))
_METRICS_UPSERT = {pg: (lambda stmt: stmt.on_conflict_do_update(
    index_elements=["run_id", "step"], set_={"metrics": stmt.excluded.metrics}))(
    (pg_insert if pg else sqlite_insert)(RunMetrics).values(
        run_id=bindparam("run_id"), step=bindparam("step"), metrics=bindparam("metrics", type_=RunMetrics.metrics.type)))
    for pg in (False, True)}
_NEW_NODE = insert(Node).values(type=bindparam("n_type"), label=bindparam("n_label"),
                                created_at=bindparam("n_at", type_=Node.created_at.type)).returning(Node.id)
_NEW_EDGE = insert(Edge).values(src_id=bindparam("e_src"), dst_id=bindparam("e_dst"), type=bindparam("e_type"))
_EDGE_ONCE = {pg: (pg_insert if pg else sqlite_insert)(Edge).values(
    src_id=bindparam("e_src"), dst_id=bindparam("e_dst"), type=bindparam("e_type")).on_conflict_do_nothing()
    for pg in (False, True)}


@functools.lru_cache(maxsize=None)
def _detail_stmt(table: type, fields: tuple[str, ...]):
    cols = table.__table__.c
    return insert(table).values(node_id=bindparam("node_id"),
                                **{k: bindparam(f"f_{k}", type_=cols[k].type) for k in fields})


@functools.lru_cache(maxsize=None)
def _node_stmt_pg(table: type, fields: tuple[str, ...], with_edge: bool):
    n = _NEW_NODE.cte("new_node")
    cols = table.__table__.c
    detail = insert(table).from_select(
        ["node_id", *fields], select(n.c.id, *(bindparam(f"f_{k}", type_=cols[k].type) for k in fields)))
    stmt = select(n.c.id).add_cte(detail.cte("new_detail"))
    if with_edge:
        stmt = stmt.add_cte(insert(Edge).from_select(
            ["src_id", "dst_id", "type"],
            select(bindparam("e_src", type_=Edge.src_id.type), n.c.id, bindparam("e_type", type_=Edge.type.type)))
            .cte("new_edge"))
    return stmt


class _Race(Conflict):
    """A unique key taken by a concurrent transaction; retrying the whole batch resolves it."""


# ---------------------------------------------------------------------- helpers inside one transaction


# The write path uses Core statements, not ORM objects: each database round trip costs, and ingestion
# must keep up with many runs checkpointing at once (benchmarks/lineage_query.py).


def _new_node(s: Session, type_: str, label: str, table: type, edge_from: tuple[int, str] | None = None,
              **fields: Any) -> int:
    """A node, its detail row and (edge_from = (src, edge type)) its incoming edge; the id is remembered as
    that type for the rest of the transaction. PostgreSQL gets all three in ONE statement (data-modifying
    CTEs), which halves ingestion round trips; SQLite (in process, no round trips) takes three."""
    params = {"n_type": type_, "n_label": label[:512], "n_at": utcnow(), **{f"f_{k}": v for k, v in fields.items()}}
    if edge_from is not None:
        params.update(e_src=edge_from[0], e_type=edge_from[1])
    if s.bind.dialect.name == "postgresql":
        nid = _x(s, _node_stmt_pg(table, tuple(fields), edge_from is not None), params).scalar_one()
    else:
        nid = _x(s, _NEW_NODE, params).scalar_one()
        _x(s, _detail_stmt(table, tuple(fields)), {"node_id": nid, **params})
        if edge_from is not None:
            _x(s, _NEW_EDGE, {"e_dst": nid, **params})
    s.info.setdefault("types", {})[nid] = type_
    return nid


def _edge(s: Session, src: int, dst: int, type_: str) -> None:
    """An edge, once: a repeat is ignored."""
    _x(s, _EDGE_ONCE[s.bind.dialect.name == "postgresql"], {"e_src": src, "e_dst": dst, "e_type": type_})


def _require(s: Session, node_id: int, type_: str, field: str) -> None:
    """node_id exists and is a type_ (cached per transaction: a batch checks each run once)."""
    known = s.info.setdefault("types", {})
    actual = known.get(node_id) or _x(s, _TYPE_OF, {"id": node_id}).scalar()
    if actual != type_:
        what = f"is a {actual}, not a {type_}" if actual else "does not exist"
        raise NotFound(f"{field}: lineage:{node_id} {what}: pass the id the {type_} was recorded with")
    known[node_id] = actual


def _get(s: Session, table: type, node_id: int, field: str):
    row = s.get(table, node_id)
    if row is None:
        kind = table.__tablename__[:-1]
        actual = s.scalar(select(Node.type).where(Node.id == node_id))
        what = f"is a {actual}, not a {kind}" if actual else "does not exist"
        raise NotFound(f"{field}: lineage:{node_id} {what}: pass the id the {kind} was recorded with")
    return row


def _dataset(s: Session, uri: str, content_hash: str = "", version: str = "") -> int:
    found = _x(s, _DATASET_BY_KEY, {"uri": uri, "content_hash": content_hash, "version": version}).scalar()
    if found is not None:
        return found
    return _new_node(s, "dataset", uri, Dataset, uri=uri, content_hash=content_hash, version=version)


def _node_of_type(s: Session, field: str, ref: Any, types: tuple[str, ...], rule: str) -> int:
    """The node id `ref`, which must exist and be one of `types` (NotFound names the field, the id and the rule)."""
    nid = V.node_id(field, ref)
    type_ = s.scalar(select(Node.type).where(Node.id == nid))
    if type_ not in types:
        raise NotFound(f"{field}: lineage:{nid} {'is a ' + type_ if type_ else 'does not exist'}: {rule}")
    return nid


def _input_node(s: Session, field: str, item: Any) -> int:
    """A run input: an id (dataset, checkpoint or model, e.g. DPO's reference policy), a dataset URI or
    {"uri", "content_hash", "version"}; unknown URIs are recorded as datasets."""
    if V.is_id(item):
        return _node_of_type(s, field, item, ("dataset", "checkpoint", "model"),
                             "a run consumes datasets, checkpoints or models")
    if isinstance(item, dict):
        return _dataset(s, V.text(f"{field}.uri", item.get("uri"), 2048),
                        V.text(f"{field}.content_hash", item.get("content_hash"), 128, required=False),
                        V.text(f"{field}.version", item.get("version"), 128, required=False))
    uri = V.text(field, item, 2048)
    latest = _x(s, _DATASET_BY_URI, {"uri": uri}).scalar()
    return latest if latest is not None else _dataset(s, uri)


def _init_node(s: Session, ref: Any) -> int:
    """What a run starts from: an id, a checkpoint/model URI (an unknown one is recorded as an external
    checkpoint, so the chain is never cut) or a run/pipeline name."""
    if V.is_id(ref):
        return _node_of_type(s, "initialized_from", ref, ("checkpoint", "model"),
                             "a run starts from a checkpoint or a model")
    ref = V.text("initialized_from", ref, 2048)
    if is_uri(ref):
        for table in (Checkpoint, Model):
            found = s.scalar(select(table.node_id).where(table.uri == ref))
            if found is not None:
                return found
        return _new_node(s, "checkpoint", ref, Checkpoint, run_id=None, uri=ref, step=None, manifest_hash="",
                         metrics={})
    return queries.resolve(s, ref)["checkpoint"]["id"]


def _evaluated_node(s: Session, ref: Any) -> int:
    """What an evaluation is of: a checkpoint or model id, or a recorded checkpoint/model URI."""
    if V.is_id(ref):
        return _node_of_type(s, "target_id", ref, ("checkpoint", "model"),
                             "an evaluation is of a checkpoint or a model")
    uri = V.text("target_id", ref, 2048)
    for table in (Checkpoint, Model):
        found = s.scalar(select(table.node_id).where(table.uri == uri))
        if found is not None:
            return found
    raise NotFound(f"target_id: no checkpoint or model is recorded at {uri}: record it first (a run's checkpoint, "
                   "an export) or pass its lineage id")


def _served_node(s: Session, model_ref: Any, deployment_name: str) -> int:
    """What a deployment serves: a model or checkpoint id, or a URI (an unknown one becomes an external model)."""
    if V.is_id(model_ref):
        return _node_of_type(s, "model_id", model_ref, ("model", "checkpoint"),
                             "a deployment serves a model or a checkpoint")
    uri = V.text("model_id", model_ref, 2048)
    if not is_uri(uri):
        return queries.resolve(s, uri)["id"]
    for table in (Model, Checkpoint):
        found = s.scalar(select(table.node_id).where(table.uri == uri))
        if found is not None:
            return found
    return _new_node(s, "model", f"{deployment_name}:external", Model, checkpoint_id=None, uri=uri,
                     name=deployment_name, version="external", quantization="none", manifest_hash="")


def metric_rows(rows: Any) -> list[tuple[int, dict]]:
    """[(step, {name: number})] from a trainer's rows; the field names say which row and which key is wrong."""
    if not isinstance(rows, (list, tuple)):
        raise InvalidInput(f"rows: expected a list of {{step, name: value}} objects, got {type(rows).__name__}")
    if len(rows) > MAX_METRIC_ROWS:
        raise InvalidInput(f"rows: {len(rows)} rows in one call; send at most {MAX_METRIC_ROWS} per call")
    out: dict[int, dict] = {}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise InvalidInput(f"rows[{i}]: expected an object like {{\"step\": 1, \"loss\": 2.3}}")
        step = V.optional_int(f"rows[{i}].step", row.get("step"), 0)
        if step is None:
            raise InvalidInput(f"rows[{i}].step: missing: every row names the step it was measured at")
        values = {}
        for k, v in row.items():
            if k == "step":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) and v not in (None, "nan", "inf", "-inf"):
                raise InvalidInput(f"rows[{i}].{k}: {v!r} is not a number: curves hold numbers (or null)")
            values[V.text(f"rows[{i}] key", k, 64)] = v
        out[step] = V.json_object(f"rows[{i}]", values)
    return sorted(out.items())


def _backref(value: Any, results: list[Any]) -> Any:
    if isinstance(value, str) and value.startswith("$") and V.is_ascii_number(value[1:]):
        i = int(value[1:])
        if i >= len(results):
            raise InvalidInput(f"{value}: refers to event {i}, but only {len(results)} came before it")
        return results[i]
    if isinstance(value, list):
        return [_backref(v, results) for v in value]
    return value


def _k8s_ref(ref: Any) -> dict | None:
    if ref is None or ref == "":
        return None
    if isinstance(ref, str):
        return {"ref": V.text("k8s_ref", ref, 1024)}
    ref = V.json_object("k8s_ref", ref)
    uid = ref.get("uid")
    if uid is not None:
        V.text("k8s_ref.uid", uid, 128)
    return ref


def _pipeline_of(k8s: dict | None) -> str:
    if not k8s:
        return ""
    labels = k8s.get("labels") or (k8s.get("metadata") or {}).get("labels") or {}
    value = k8s.get("pipeline") or (labels.get("flashops.dev/pipeline") if isinstance(labels, dict) else None)
    return value if isinstance(value, str) else ""
