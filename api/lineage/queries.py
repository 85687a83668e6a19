"""Read queries over the lineage graph, shared by the direct-SQL store and the HTTP API.

Walking the graph is one recursive CTE over `edges` (not one query per hop); node details are then
fetched with one query per artifact type present. Every answer is plain JSON-ready dicts.
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, literal, select
from sqlalchemy.orm import Session

from flashops.api.lineage import validate as V
from flashops.api.lineage.errors import InvalidInput, NotFound
from flashops.api.lineage.models import (NODE_TYPES, Checkpoint, Dataset, Deployment, Edge, Evaluation, Model, Node,
                                         Run, RunMetrics)

DETAIL = {"dataset": Dataset, "run": Run, "checkpoint": Checkpoint, "model": Model, "deployment": Deployment,
          "evaluation": Evaluation}
MAX_DEPTH = 100
MAX_LIMIT = 10_000
_CHUNK = 500


# ---------------------------------------------------------------------- node dicts


def _ts(v: datetime | None) -> str | None:
    if v is None:
        return None
    if v.tzinfo is None:  # SQLite hands back naive datetimes; they were written in UTC
        v = v.replace(tzinfo=timezone.utc)
    return v.isoformat()


def _ref(i: int | None) -> str | None:
    return None if i is None else f"lineage:{i}"


def _details(type_: str, row: Any) -> dict:
    if type_ == "dataset":
        return {"uri": row.uri, "content_hash": row.content_hash or None, "version": row.version or None}
    if type_ == "run":
        return {"name": row.name, "kind": row.kind, "stage": row.stage, "pipeline": row.pipeline,
                "status": row.status, "spec_hash": row.spec_hash, "spec": row.spec, "metrics": row.metrics,
                "started_at": _ts(row.started_at), "finished_at": _ts(row.finished_at), "k8s_ref": row.k8s_ref}
    if type_ == "checkpoint":
        return {"uri": row.uri, "step": row.step, "manifest_hash": row.manifest_hash or None,
                "metrics": row.metrics, "run_id": row.run_id}
    if type_ == "model":
        return {"uri": row.uri, "name": row.name, "version": row.version, "quantization": row.quantization,
                "manifest_hash": row.manifest_hash or None, "checkpoint_id": row.checkpoint_id}
    if type_ == "evaluation":
        return {"target_id": row.target_id, "name": row.name or None, "result": row.result}
    return {"name": row.name, "namespace": row.namespace or None, "model_id": row.model_id,
            "traffic_percent": row.traffic_percent, "k8s_ref": row.k8s_ref,
            "started_at": _ts(row.started_at), "ended_at": _ts(row.ended_at)}


def nodes(s: Session, ids: list[int]) -> dict[int, dict]:
    """id -> node dict for every id that exists (one query for the nodes, one per type present)."""
    out: dict[int, dict] = {}
    ids = list(dict.fromkeys(ids))
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i:i + _CHUNK]
        by_type: dict[str, list[int]] = {}
        for n in s.execute(select(Node.id, Node.type, Node.label, Node.created_at).where(Node.id.in_(chunk))):
            out[n.id] = {"id": n.id, "ref": _ref(n.id), "type": n.type, "label": n.label,
                         "created_at": _ts(n.created_at)}
            by_type.setdefault(n.type, []).append(n.id)
        for type_, tids in by_type.items():
            table = DETAIL[type_]
            for row in s.scalars(select(table).where(table.node_id.in_(tids))):
                out[row.node_id].update(_details(type_, row))
    return out


def node(s: Session, node_id: int) -> dict:
    found = nodes(s, [node_id]).get(node_id)
    if found is None:
        raise NotFound(f"lineage:{node_id} does not exist")
    return found


# ---------------------------------------------------------------------- finding what a user means


def find(s: Session, ref: Any) -> int:
    """An id ("42", "lineage:42"), a URI (dataset, checkpoint, model), or a name: a run (newest), a
    deployment (newest), a pipeline (its final artifact), a model name (newest version)."""
    if V.is_id(ref):
        nid = V.node_id("id", ref)
        if s.scalar(select(Node.id).where(Node.id == nid)) is None:
            raise NotFound(f"lineage:{nid} does not exist")
        return nid
    ref = V.text("ref", ref, 2048)
    if "://" in ref or ref.startswith("builtin:"):
        for table in (Checkpoint, Model, Dataset):
            found = s.scalar(select(table.node_id).where(table.uri == ref).order_by(table.node_id.desc()).limit(1))
            if found is not None:
                return found
        raise NotFound(f"no dataset, checkpoint or model has uri {ref}")
    for table in (Run, Deployment):
        found = s.scalar(select(table.node_id).where(table.name == ref).order_by(table.node_id.desc()).limit(1))
        if found is not None:
            return found
    if s.scalar(select(Run.node_id).where(Run.pipeline == ref).limit(1)) is not None:
        return resolve(s, ref)["id"]
    found = s.scalar(select(Model.node_id).where(Model.name == ref).order_by(Model.node_id.desc()).limit(1))
    if found is not None:
        return found
    raise NotFound(f"nothing named {ref!r}: no run, deployment, pipeline or model has that name "
                   "(ids look like lineage:42; list runs with GET /v1/nodes?type=run)")


def _final_checkpoint(s: Session, run_id: int) -> int | None:
    return s.scalar(select(Checkpoint.node_id).where(Checkpoint.run_id == run_id)
                    .order_by(Checkpoint.step.desc().nulls_last(), Checkpoint.node_id.desc()).limit(1))


def _servable(s: Session, checkpoint_id: int) -> dict:
    ck = node(s, checkpoint_id)
    mid = s.scalar(select(Model.node_id).where(Model.checkpoint_id == checkpoint_id)
                   .order_by(Model.node_id.desc()).limit(1))
    model = node(s, mid) if mid is not None else None
    return {**(model or ck), "checkpoint": ck, "model": model}


def resolve(s: Session, ref: Any) -> dict:
    """See SqlLineage.resolve."""
    if V.is_id(ref) or (isinstance(ref, str) and "://" in ref):
        nid = find(s, ref)
        n = node(s, nid)
        if n["type"] == "checkpoint":
            return _servable(s, nid)
        if n["type"] == "model":
            ck = node(s, n["checkpoint_id"]) if n["checkpoint_id"] else None
            return {**n, "checkpoint": ck, "model": n}
        if n["type"] == "deployment":
            return resolve(s, n["model_id"])
        if n["type"] == "evaluation":  # what was evaluated
            return resolve(s, n["target_id"])
        if n["type"] == "run":
            return _run_artifact(s, nid, n["name"])
        return {**n, "checkpoint": None, "model": None}
    name = V.text("ref", ref, 253)
    run_id = s.scalar(select(Run.node_id).where(Run.name == name).order_by(Run.node_id.desc()).limit(1))
    if run_id is not None:
        return _run_artifact(s, run_id, name)
    runs = s.execute(select(Run.node_id, Run.status).where(Run.pipeline == name)
                     .order_by(Run.started_at.desc(), Run.node_id.desc())).all()
    if runs:
        # the last stage = the newest succeeded run of the pipeline that saved a checkpoint
        for rid, status in runs:
            ck = _final_checkpoint(s, rid) if status == "succeeded" else None
            if ck is not None:
                return _servable(s, ck)
        raise NotFound(f"pipeline {name!r} has no succeeded run with a checkpoint yet "
                       f"({len(runs)} run(s) recorded): wait for it to finish")
    dep = s.scalar(select(Deployment.model_id).where(Deployment.name == name)
                   .order_by(Deployment.node_id.desc()).limit(1))
    if dep is not None:
        return resolve(s, dep)
    raise NotFound(f"nothing to resolve for {name!r}: no run, pipeline or deployment has that name")


def _run_artifact(s: Session, run_id: int, name: str) -> dict:
    ck = _final_checkpoint(s, run_id)
    if ck is None:
        raise NotFound(f"run {name!r} (lineage:{run_id}) has no checkpoint yet: wait for its first save")
    return _servable(s, ck)


def evaluations(s: Session, target: int, limit: int = 200) -> list[dict]:
    """See SqlLineage.evaluations: the target's evaluations and, for a model, its checkpoint's; newest first."""
    kind = s.scalar(select(Node.type).where(Node.id == target))
    if kind not in ("checkpoint", "model"):
        raise InvalidInput(f"lineage:{target} is {'a ' + kind if kind else 'missing'}: evaluations are of checkpoints "
                           "and models")
    targets = [target]
    if kind == "model":
        ck = s.scalar(select(Model.checkpoint_id).where(Model.node_id == target))
        targets += [ck] if ck is not None else []
    ids = list(s.scalars(select(Evaluation.node_id).where(Evaluation.target_id.in_(targets))
                         .order_by(Evaluation.node_id.desc()).limit(_limit(limit))))
    found = nodes(s, ids)
    return [found[i] for i in ids]


# ---------------------------------------------------------------------- graph queries


def node_with_neighbours(s: Session, node_id: int, limit: int = 100) -> dict:
    limit = _limit(limit)
    up = s.execute(select(Edge.src_id, Edge.type).where(Edge.dst_id == node_id).order_by(Edge.id).limit(limit)).all()
    down = s.execute(select(Edge.dst_id, Edge.type).where(Edge.src_id == node_id).order_by(Edge.id).limit(limit)).all()
    found = nodes(s, [node_id, *(r[0] for r in up), *(r[0] for r in down)])
    if node_id not in found:
        raise NotFound(f"lineage:{node_id} does not exist")
    return {"node": found[node_id],
            "upstream": [{"edge": t, "node": found[i]} for i, t in up],
            "downstream": [{"edge": t, "node": found[i]} for i, t in down]}


def walk(s: Session, root: int, direction: str, depth: int = 10, limit: int = 1000) -> dict:
    """Ancestors (direction "up") or descendants ("down") of root to `depth` hops, as nodes (each with the
    hop count it was first reached at) and the edges between them. One recursive CTE."""
    if direction not in ("up", "down"):
        raise InvalidInput(f"direction: {direction!r} is not one of up, down")
    depth = V.optional_int("depth", depth, 1, MAX_DEPTH)
    limit = _limit(limit)
    near, far = (Edge.dst_id, Edge.src_id) if direction == "up" else (Edge.src_id, Edge.dst_id)
    hop = select(Edge.src_id.label("src"), Edge.dst_id.label("dst"), Edge.type.label("type"),
                 literal(1).label("depth")).where(near == root).cte("walk", recursive=True)
    w_far = hop.c.src if direction == "up" else hop.c.dst
    hop = hop.union(select(Edge.src_id, Edge.dst_id, Edge.type, hop.c.depth + 1)
                    .where(near == w_far, hop.c.depth < depth))
    rows = s.execute(select(hop.c.src, hop.c.dst, hop.c.type, func.min(hop.c.depth).label("depth"))
                     .group_by(hop.c.src, hop.c.dst, hop.c.type)
                     .order_by(func.min(hop.c.depth), hop.c.src, hop.c.dst).limit(limit + 1)).all()
    truncated = len(rows) > limit
    rows = rows[:limit]
    reached: dict[int, int] = {root: 0}
    for r in rows:
        other = r.src if direction == "up" else r.dst
        reached[other] = min(reached.get(other, r.depth), r.depth)
    found = nodes(s, list(reached))
    if root not in found:
        raise NotFound(f"lineage:{root} does not exist")
    return {"root": found[root], "direction": direction, "depth": depth, "truncated": truncated,
            "nodes": [{**found[i], "depth": d} for i, d in sorted(reached.items(), key=lambda kv: (kv[1], kv[0]))
                      if i != root],
            "edges": [{"src": r.src, "dst": r.dst, "type": r.type} for r in rows]}


def grouped(s: Session, root: int, direction: str) -> dict:
    """Every ancestor (or descendant) grouped by type: provenance of a deployment, what derives from a dataset."""
    w = walk(s, root, direction, MAX_DEPTH, MAX_LIMIT)
    out: dict[str, Any] = {"root": w["root"], "direction": direction, "truncated": w["truncated"]}
    for t in NODE_TYPES:
        out[t + "s"] = [n for n in w["nodes"] if n["type"] == t]
    return out


def list_nodes(s: Session, *, type: str | None = None, name: str | None = None, uri: str | None = None,
               pipeline: str | None = None, status: str | None = None, after: int | None = None,
               limit: int = 50) -> dict:
    """Nodes in id order with filters; page with `after` = the previous page's `next`."""
    limit = _limit(limit)
    q = select(Node.id).order_by(Node.id).limit(limit + 1)
    if type is not None:
        if type not in NODE_TYPES:
            raise InvalidInput(f"type: {type!r} is not one of {', '.join(NODE_TYPES)}")
        q = q.where(Node.type == type)
    if after is not None:
        q = q.where(Node.id > V.optional_int("after", after, 0))
    if name is not None:
        name = V.text("name", name, 253)
        q = q.where(Node.id.in_(select(Run.node_id).where(Run.name == name)
                                .union(select(Deployment.node_id).where(Deployment.name == name),
                                       select(Model.node_id).where(Model.name == name))))
    if uri is not None:
        uri = V.text("uri", uri, 2048)
        q = q.where(Node.id.in_(select(Dataset.node_id).where(Dataset.uri == uri)
                                .union(select(Checkpoint.node_id).where(Checkpoint.uri == uri),
                                       select(Model.node_id).where(Model.uri == uri))))
    if pipeline is not None:
        q = q.where(Node.id.in_(select(Run.node_id).where(Run.pipeline == V.text("pipeline", pipeline, 253))))
    if status is not None:
        q = q.where(Node.id.in_(select(Run.node_id).where(Run.status == V.status(status))))
    ids = list(s.scalars(q))
    more = len(ids) > limit
    ids = ids[:limit]
    found = nodes(s, ids)
    return {"items": [found[i] for i in ids], "next": ids[-1] if more else None}


def diff_runs(s: Session, a: int, b: int) -> dict:
    """The difference between two runs' specs: one entry per changed leaf, with a dotted path."""
    found = nodes(s, [a, b])
    for i in (a, b):
        if found.get(i, {}).get("type") != "run":
            raise InvalidInput(f"lineage:{i} is {'a ' + found[i]['type'] if i in found else 'missing'}, not a run: "
                               "diff compares two runs")
    changes: list[dict] = []
    _diff(found[a]["spec"], found[b]["spec"], "", changes)
    short = {k: v for k, v in found[a].items() if k not in ("spec", "metrics")}
    short_b = {k: v for k, v in found[b].items() if k not in ("spec", "metrics")}
    return {"a": short, "b": short_b, "same_spec": found[a]["spec_hash"] == found[b]["spec_hash"] and not changes,
            "changes": changes}


_MISSING = object()


def _diff(x: Any, y: Any, path: str, out: list[dict]) -> None:
    if isinstance(x, dict) and isinstance(y, dict):
        for k in sorted(set(x) | set(y)):
            _diff(x.get(k, _MISSING), y.get(k, _MISSING), f"{path}.{k}" if path else k, out)
    elif x != y:
        out.append({"path": path or ".", "a": None if x is _MISSING else x, "b": None if y is _MISSING else y,
                    "change": "added" if x is _MISSING else "removed" if y is _MISSING else "changed"})


def metric_curves(s: Session, run_id: int, max_points: int = 2000) -> dict:
    """A run's per-step metrics as aligned series (one value or None per step), at most ~max_points steps:
    past that, every stride-th row and the last one (a curve keeps its shape and its end)."""
    max_points = V.optional_int("max_points", max_points, 2, MAX_LIMIT)
    kind = s.scalar(select(Node.type).where(Node.id == run_id))
    if kind != "run":
        raise InvalidInput(f"lineage:{run_id} is {'a ' + kind if kind else 'missing'}, not a run: curves belong to runs")
    rows = s.scalar(select(func.count()).select_from(RunMetrics).where(RunMetrics.run_id == run_id)) or 0
    stride = max(1, -(-rows // max_points))
    q = select(RunMetrics.step, RunMetrics.metrics).where(RunMetrics.run_id == run_id)
    if stride > 1:
        numbered = select(RunMetrics.step, RunMetrics.metrics,
                          func.row_number().over(order_by=RunMetrics.step).label("n")).where(
            RunMetrics.run_id == run_id).subquery()
        q = select(numbered.c.step, numbered.c.metrics).where((numbered.c.n % stride == 0) | (numbered.c.n == rows))
    picked = s.execute(q.order_by("step")).all()
    names: dict[str, None] = {}
    for _, m in picked:
        names.update(dict.fromkeys(m))
    series = {k: [_number(m.get(k)) for _, m in picked] for k in names}
    return {"run_id": run_id, "steps": [st for st, _ in picked], "series": series, "rows": rows, "stride": stride}


def _number(v: Any) -> float | None:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None  # "nan" strings: a gap


def _limit(limit: Any) -> int:
    return V.optional_int("limit", limit, 1, MAX_LIMIT)
