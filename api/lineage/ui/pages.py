"""What each dashboard page shows, as plain dicts from one read session (the templates only lay them out).

Every query is bounded (a page of pipelines, the runs of those pipelines, the newest deployments) and
uses the schema's indexes, so a page costs the same with 10 runs or 10,000
(benchmarks/lineage_query.py measures it on PostgreSQL).
"""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from flashops.api.lineage import queries
from flashops.api.lineage.errors import NotFound
from flashops.api.lineage.models import NODE_TYPES, Checkpoint, Deployment, Model, Node, Run, RunMetrics

PAGE = 50
DEPLOYMENTS_PAGE = 100  # open ones first, then the most recently ended
PIPELINES_PAGE = 25  # pipelines per page (each with its stages): the page stays small at any number of runs
STATES = ("running", "succeeded", "failed", "cancelled")

# Curves drawn on a run page, in this order, grouped into charts; any other numeric metric gets its own chart.
CHARTS = (
    ("Loss", ("loss", "mtp_loss")),
    ("Learning rate", ("lr",)),
    ("Tokens per second", ("tokens_per_s",)),
    ("Reward", ("reward",)),
    ("Entropy", ("entropy",)),
    ("Ratio drift (mean |log r|)", ("ratio_drift",)),
    ("Mean ratio", ("ratio_mean",)),
    ("Gradient norm", ("grad_norm",)),
)
_NOT_CURVES = {"total_steps", "step_seconds"}


def _run_rows(s: Session, where) -> list[dict]:
    """Runs (without their spec) with their progress: last reported step, checkpoint count."""
    rows = s.execute(select(*_RUN_COLUMNS).where(where).order_by(Run.started_at, Run.node_id)).all()
    if not rows:
        return []
    # the same filter as a subquery, not a list of hundreds of ids: the database joins on its indexes
    ids = select(Run.node_id).where(where).scalar_subquery()
    last_step = dict(s.execute(select(RunMetrics.run_id, func.max(RunMetrics.step))
                               .where(RunMetrics.run_id.in_(ids)).group_by(RunMetrics.run_id)).all())
    ckpts = dict(s.execute(select(Checkpoint.run_id, func.count()).where(Checkpoint.run_id.in_(ids))
                           .group_by(Checkpoint.run_id)).all())
    return [_run_summary(r, last_step.get(r.node_id), ckpts.get(r.node_id, 0)) for r in rows]


# What a runs table needs, picked out of the JSON in the database: a page costs the same however large a
# run's spec or final metrics are (an RL run's evaluation examples, a 48B spec).
_SUMMARY_KEYS = ("retries", "reason", "message", "step", "total_steps")
_RUN_COLUMNS = (Run.node_id, Run.name, Run.stage, Run.pipeline, Run.status, Run.started_at, Run.finished_at,
                Run.spec["training"]["steps"].label("steps"),
                *(Run.metrics[k].label(f"m_{k}") for k in _SUMMARY_KEYS))


def _run_summary(r: Any, last_step: int | None, checkpoints: int) -> dict:
    metrics = {k: getattr(r, f"m_{k}") for k in _SUMMARY_KEYS}
    total = _int(r.steps) or _int(metrics.get("total_steps"))
    done = last_step if last_step is not None else _int(metrics.get("step"))
    if r.status == "succeeded" and total:
        done = total
    return {"id": r.node_id, "name": r.name, "stage": r.stage, "pipeline": r.pipeline, "status": r.status,
            "started_at": _iso(r.started_at), "finished_at": _iso(r.finished_at),
            "step": done, "steps": total,
            "percent": min(100, round(100 * (done or 0) / total)) if total else None,
            "retries": _int(metrics.get("retries")) or 0, "reason": reason_of(r.status, metrics),
            "checkpoints": checkpoints}


def reason_of(status: str, metrics: dict) -> str:
    """Why a run is in its state, from what the trainer or the operator recorded when it ended."""
    said = metrics.get("reason") or ""
    message = metrics.get("message") or ""
    if said or message:
        return f"{said}: {message}" if said and message else str(said or message)
    if status == "failed":
        step = metrics.get("step")
        return f"failed at step {step}" if step is not None else "failed"
    if status == "cancelled":
        return "cancelled (its object was deleted)"
    return ""


def _iso(v: datetime | None) -> str | None:
    if v is None:
        return None
    return (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).isoformat()  # SQLite hands back naive UTC


def _int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def pipelines(s: Session, before: datetime | None = None) -> dict:
    """A page of pipelines, newest activity first (`before`: the previous page's `older`), with their stages,
    and the newest runs outside pipelines."""
    last = func.max(Run.started_at)
    q = select(Run.pipeline, last.label("last")).where(Run.pipeline.is_not(None)).group_by(Run.pipeline)
    if before is not None:
        q = q.having(last < before)
    found = s.execute(q.order_by(last.desc(), Run.pipeline).limit(PIPELINES_PAGE + 1)).all()
    older = _iso(found[PIPELINES_PAGE - 1][1]) if len(found) > PIPELINES_PAGE else None
    names = [p for p, _ in found[:PIPELINES_PAGE]]
    by_pipeline: dict[str, list[dict]] = {n: [] for n in names}
    for run in _run_rows(s, Run.pipeline.in_(names)) if names else []:
        by_pipeline[run["pipeline"]].append(run)
    standalone_ids = [] if before is not None else list(s.scalars(
        select(Run.node_id).where(Run.pipeline.is_(None))
        .order_by(Run.started_at.desc(), Run.node_id.desc()).limit(PIPELINES_PAGE)))
    standalone = _run_rows(s, Run.node_id.in_(standalone_ids)) if standalone_ids else []
    standalone.reverse()  # newest first, like the pipelines
    total_runs = s.scalar(select(func.count()).select_from(Run))
    return {"pipelines": [pipeline_summary(n, by_pipeline[n]) for n in names], "standalone": standalone,
            "total_runs": total_runs, "older": older, "before": _iso(before), "live": any(r["status"] == "running" for n in names for r in by_pipeline[n])
            or any(r["status"] == "running" for r in standalone)}


def pipeline_summary(name: str, runs: list[dict]) -> dict:
    """A pipeline's stages: the newest run per stage name, in the order the stages started."""
    latest: dict[str, dict] = {}
    for r in runs:  # oldest first, so the newest run of a stage wins
        latest[r["stage"] + ":" + r["name"]] = r
    stages = sorted(latest.values(), key=lambda r: (r["started_at"] or "", r["id"]))
    counts = {st: sum(1 for r in stages if r["status"] == st) for st in STATES}
    state = ("failed" if counts["failed"] else "running" if counts["running"] else
             "cancelled" if counts["cancelled"] else "succeeded")
    return {"name": name, "stages": stages, "runs": len(runs), "state": state, "counts": counts,
            "retries": sum(r["retries"] for r in stages)}


def pipeline(s: Session, name: str) -> dict | None:
    runs = _run_rows(s, Run.pipeline == name)
    if not runs:
        return None
    out = pipeline_summary(name, runs)
    out["history"] = list(reversed(runs))
    try:
        final = queries.resolve(s, name)
    except NotFound:  # a pipeline still running has no final artifact yet
        final = None
    out["final"] = final
    if final is not None:
        out["deployments"] = _deployment_rows(s, Deployment.model_id == final["id"])
    else:
        out["deployments"] = []
    return out


def run(s: Session, run_id: int) -> dict | None:
    found = queries.nodes(s, [run_id]).get(run_id)
    if found is None or found["type"] != "run":
        return None
    row = s.execute(select(*_RUN_COLUMNS).where(Run.node_id == run_id)).one()
    last = s.scalar(select(func.max(RunMetrics.step)).where(RunMetrics.run_id == run_id))
    ckpts = list(s.execute(select(Checkpoint.node_id, Checkpoint.uri, Checkpoint.step, Checkpoint.manifest_hash,
                                  Checkpoint.metrics).where(Checkpoint.run_id == run_id)
                           .order_by(Checkpoint.step.desc().nulls_last(), Checkpoint.node_id.desc())))
    exported = dict(s.execute(select(Model.checkpoint_id, Model.node_id)
                              .where(Model.checkpoint_id.in_([c.node_id for c in ckpts]))).all()) if ckpts else {}
    curves = queries.metric_curves(s, run_id, 2000)
    return {"node": found, "summary": _run_summary(row, last, len(ckpts)),
            "checkpoints": [{"id": c.node_id, "uri": c.uri, "step": c.step, "manifest_hash": c.manifest_hash or None,
                             "verification": verification(c.manifest_hash), "loss": (c.metrics or {}).get("loss"),
                             "model_id": exported.get(c.node_id)} for c in ckpts],
            "curves": curves, "charts": charts(curves), "final_metrics": _scalars(found.get("metrics") or {})}


def verification(manifest_hash: str | None) -> dict:
    """A checkpoint's recorded verification: the store writes the manifest (every file's sha256) last, so a
    recorded manifest hash means the save completed and can be verified byte for byte."""
    if manifest_hash:
        return {"state": "verified", "text": f"complete, manifest {manifest_hash[:19]}"}
    return {"state": "unverified", "text": "no manifest recorded (external or incomplete)"}


def charts(curves: dict) -> list[dict]:
    """Which series go in which chart: the known groups in a fixed order, then one chart per other metric."""
    present = {k for k, v in curves["series"].items() if any(x is not None for x in v)} - _NOT_CURVES
    out, used = [], set()
    for title, names in CHARTS:
        have = [n for n in names if n in present]
        if have:
            out.append({"title": title, "series": have})
            used.update(have)
    for name in sorted(present - used):
        out.append({"title": name.replace("_", " "), "series": [name]})
    return out


def _scalars(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


def _deployment_rows(s: Session, where, limit: int = PAGE) -> list[dict]:
    deps = s.execute(select(Deployment.node_id, Deployment.name, Deployment.namespace, Deployment.model_id,
                            Deployment.traffic_percent, Deployment.started_at, Deployment.ended_at,
                            Deployment.k8s_ref).where(where)
                     .order_by(Deployment.ended_at.is_not(None), Deployment.started_at.desc(),
                               Deployment.node_id.desc()).limit(limit)).all()
    served = queries.nodes(s, [d.model_id for d in deps])
    out = []
    for d in deps:
        model = served.get(d.model_id, {})
        ck_id = model.get("checkpoint_id") if model.get("type") == "model" else model.get("id")
        out.append({"id": d.node_id, "name": d.name, "namespace": d.namespace or None, "model": model,
                    "checkpoint_id": ck_id, "traffic_percent": d.traffic_percent,
                    "canary": d.traffic_percent is not None and d.traffic_percent < 100,
                    "started_at": _iso(d.started_at), "ended_at": _iso(d.ended_at),
                    "gate": gate_of(d.k8s_ref)})
    return out


def gate_of(k8s_ref: Any) -> dict | None:
    """A promotion gate's verdict where one was recorded with the deployment (the Evaluation and promotion
    feature records it; until then there is none)."""
    if not isinstance(k8s_ref, dict):
        return None
    gate = k8s_ref.get("promotion") or k8s_ref.get("gate")
    if not isinstance(gate, dict):
        return None
    passed = gate.get("passed")
    return {"verdict": "passed" if passed is True else "blocked" if passed is False else str(gate.get("verdict", "?")),
            "detail": str(gate.get("message") or gate.get("detail") or "")}


def deployments(s: Session) -> dict:
    rows = _deployment_rows(s, Deployment.node_id.is_not(None), limit=DEPLOYMENTS_PAGE)
    open_by_name: dict[str, int] = {}
    for d in rows:
        if d["ended_at"] is None:
            open_by_name[d["name"]] = open_by_name.get(d["name"], 0) + 1
    for d in rows:  # two models serving under one name at once: the smaller share is the canary
        d["canary"] = d["canary"] or (d["ended_at"] is None and open_by_name.get(d["name"], 0) > 1
                                      and (d["traffic_percent"] or 0) < 100)
    return {"serving": [d for d in rows if d["ended_at"] is None], "ended": [d for d in rows if d["ended_at"]],
            "limit": DEPLOYMENTS_PAGE if len(rows) == DEPLOYMENTS_PAGE else None}


def evaluations(s: Session) -> dict:
    """Evaluation records (`flashops eval`, the pipeline's eval stage): evaluation nodes attached to a checkpoint
    or model, with suites[].modes[].{mode, accuracy, mean_tokens, ...}; the newest 200, labelled by what they
    evaluated."""
    if "evaluation" not in NODE_TYPES:
        return {"supported": False, "rows": [], "points": []}
    ids = list(s.scalars(select(Node.id).where(Node.type == "evaluation").order_by(Node.id.desc()).limit(200)))
    found = queries.nodes(s, ids)
    targets = queries.nodes(s, [n["target_id"] for n in found.values() if n.get("target_id")])
    records = []
    for i in ids:
        rec = dict(found[i])
        target = targets.get(rec.get("target_id"))
        if target:  # "quickstart-rl step-15", what a person recognises the evaluated artifact by
            step = f" step-{target['step']}" if target.get("step") is not None else ""
            rec["label"] = f"{target['label'].rsplit('/runs/', 1)[-1].split('/step-')[0]}{step}" \
                if target["type"] == "checkpoint" else target["label"]
        records.append(rec)
    return evaluation_table(records)


def evaluation_table(records: list[dict]) -> dict:
    """Side-by-side rows (one per evaluated artifact, suite and mode) and the token-efficiency points
    (accuracy against mean generated tokens, per mode)."""
    rows, points = [], []
    for rec in records:
        result = rec.get("result") or rec.get("metrics") or rec
        for suite in result.get("suites") or []:
            for mode in suite.get("modes") or []:
                row = {"id": rec.get("id"), "label": rec.get("label") or rec.get("ref"), "suite": suite.get("name"),
                       "mode": mode.get("mode"), "accuracy": mode.get("accuracy"),
                       "mean_tokens": mode.get("mean_tokens"),
                       "accuracy_per_1k_tokens": mode.get("accuracy_per_1k_tokens"),
                       "acceptance_length": _acceptance(mode.get("acceptance_length"))}
                rows.append(row)
                if isinstance(row["accuracy"], (int, float)) and isinstance(row["mean_tokens"], (int, float)):
                    points.append({"mode": row["mode"], "x": row["mean_tokens"], "y": row["accuracy"],
                                   "label": f"{row['label']} {row['suite']}"})
    return {"supported": True, "rows": rows, "points": points}


def _acceptance(v):
    """{"1": 1.8, "2": 2.3, "3": 2.5} -> "k=1 1.80 · k=2 2.30 · k=3 2.50" (a number stays a number)."""
    if not isinstance(v, dict):
        return v
    parts = [f"k={k} {x:.2f}" for k, x in sorted(v.items()) if isinstance(x, (int, float))]
    return " · ".join(parts) or None


def graph(s: Session, node_id: int, direction: str, depth: int) -> dict:
    """The walk `flashops lineage graph` prints (same query, same defaults), plus its text tree."""
    from flashops.api.lineage.render import tree

    walk = queries.walk(s, node_id, direction, depth, 1000)
    return {"walk": walk, "tree": tree(walk)}
