"""The lineage schema (SQLAlchemy 2). One id space for every artifact, so `lineage:<id>` is unambiguous
and one edges table carries the whole graph (a recursive CTE walks it).

    nodes        id, type (dataset|run|checkpoint|model|deployment|evaluation), label, created_at
    datasets     node_id, uri, content_hash, version                    key: (uri, content_hash, version)
    runs         node_id, name, kind, stage, pipeline, spec, spec_hash, status, timestamps, metrics, k8s_ref
                                                                        key: (name, spec_hash, k8s_uid)
    checkpoints  node_id, run_id, uri, step, manifest_hash, metrics    key: uri
    models       node_id, checkpoint_id, uri, name, version, quantization, manifest_hash   key: uri
    deployments  node_id, model_id, name, namespace, k8s_ref, traffic_percent, started_at, ended_at
                                                      key: (namespace, name, k8s_uid, model_id) while open
    evaluations  node_id, target_id, name, result (suites[].modes[]...), result_hash
                                                                        key: (target_id, result_hash)
    edges        src_id -> dst_id, type (consumed|produced|initialized_from|exported_as|deployed_as|evaluated_as)
    run_metrics  run_id, step, metrics (that step's numbers: loss, lr, reward, ...)   key: (run_id, step)

Edges point downstream (the way data flows): dataset -consumed-> run, checkpoint -initialized_from-> run,
run -produced-> checkpoint, checkpoint -exported_as-> model, model|checkpoint -deployed_as-> deployment,
checkpoint|model -evaluated_as-> evaluation (`flashops eval` and the pipeline's eval stage),
dataset -derived_as-> dataset (rows -> their prepared token shards; no schema change: edges.type is free text).
Changing this file means a new revision in migrations/versions/.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, DateTime, ForeignKey, Index, Integer, MetaData, String,
                        UniqueConstraint, text)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NODE_TYPES = ("dataset", "run", "checkpoint", "model", "deployment", "evaluation")
EDGE_TYPES = ("consumed", "produced", "initialized_from", "exported_as", "deployed_as", "derived_as", "evaluated_as")

# SQLite only autoincrements an INTEGER PRIMARY KEY; PostgreSQL gets 64-bit ids.
Id = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")

NAMING = {"ix": "ix_%(table_name)s_%(column_0_N_name)s", "uq": "uq_%(table_name)s_%(column_0_N_name)s",
          "fk": "fk_%(table_name)s_%(column_0_name)s", "pk": "pk_%(table_name)s"}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _node_fk() -> Mapped[int]:
    return mapped_column(Id, ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True)


class Node(Base):
    __tablename__ = "nodes"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    type: Mapped[str] = mapped_column(String(16), index=True)
    label: Mapped[str] = mapped_column(String(512), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Dataset(Base):
    __tablename__ = "datasets"
    node_id: Mapped[int] = _node_fk()
    uri: Mapped[str] = mapped_column(String(2048))
    content_hash: Mapped[str] = mapped_column(String(128), default="")
    version: Mapped[str] = mapped_column(String(128), default="")
    __table_args__ = (UniqueConstraint("uri", "content_hash", "version"),)


class Run(Base):
    __tablename__ = "runs"
    node_id: Mapped[int] = _node_fk()
    name: Mapped[str] = mapped_column(String(253), index=True)
    kind: Mapped[str] = mapped_column(String(64))
    stage: Mapped[str] = mapped_column(String(64))
    pipeline: Mapped[str | None] = mapped_column(String(253), index=True, nullable=True)
    spec: Mapped[dict] = mapped_column(Json)
    spec_hash: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16), default="running")
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    metrics: Mapped[dict] = mapped_column(Json, default=dict)
    k8s_ref: Mapped[dict | None] = mapped_column(Json, nullable=True)
    k8s_uid: Mapped[str] = mapped_column(String(128), default="")
    __table_args__ = (UniqueConstraint("name", "spec_hash", "k8s_uid"),)


class Checkpoint(Base):
    __tablename__ = "checkpoints"
    node_id: Mapped[int] = _node_fk()
    run_id: Mapped[int | None] = mapped_column(Id, ForeignKey("nodes.id"), index=True, nullable=True)
    uri: Mapped[str] = mapped_column(String(2048), unique=True)
    step: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    manifest_hash: Mapped[str] = mapped_column(String(128), default="")
    metrics: Mapped[dict] = mapped_column(Json, default=dict)


class Model(Base):
    __tablename__ = "models"
    node_id: Mapped[int] = _node_fk()
    checkpoint_id: Mapped[int | None] = mapped_column(Id, ForeignKey("nodes.id"), index=True, nullable=True)
    uri: Mapped[str] = mapped_column(String(2048), unique=True)
    name: Mapped[str] = mapped_column(String(253), index=True)
    version: Mapped[str] = mapped_column(String(128))
    quantization: Mapped[str] = mapped_column(String(32), default="none")
    manifest_hash: Mapped[str] = mapped_column(String(128), default="")


class Deployment(Base):
    __tablename__ = "deployments"
    node_id: Mapped[int] = _node_fk()
    model_id: Mapped[int] = mapped_column(Id, ForeignKey("nodes.id"), index=True)
    name: Mapped[str] = mapped_column(String(253), index=True)
    namespace: Mapped[str] = mapped_column(String(253), default="")
    k8s_ref: Mapped[dict | None] = mapped_column(Json, nullable=True)
    k8s_uid: Mapped[str] = mapped_column(String(128), default="")
    traffic_percent: Mapped[int] = mapped_column(Integer, default=100)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    __table_args__ = (
        # one open deployment per (namespace, name, uid, model): the idempotency key while it serves
        Index("uq_deployments_open", "namespace", "name", "k8s_uid", "model_id", unique=True,
              sqlite_where=text("ended_at IS NULL"), postgresql_where=text("ended_at IS NULL")),
    )


class Evaluation(Base):
    """One evaluation of a checkpoint or model: the result `flashops eval` prints as JSON
    ({"suites": [{"name", "sha256", "modes": [{"mode", "accuracy", ...}]}], "wall_s"}), recorded only once
    complete. result_hash (sha256 of the canonical result) makes a repeated write the same node."""
    __tablename__ = "evaluations"
    node_id: Mapped[int] = _node_fk()
    target_id: Mapped[int] = mapped_column(Id, ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(253), default="")
    result: Mapped[dict] = mapped_column(Json)
    result_hash: Mapped[str] = mapped_column(String(128))
    __table_args__ = (UniqueConstraint("target_id", "result_hash"),)


class Edge(Base):
    __tablename__ = "edges"
    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    src_id: Mapped[int] = mapped_column(Id, ForeignKey("nodes.id", ondelete="CASCADE"))
    dst_id: Mapped[int] = mapped_column(Id, ForeignKey("nodes.id", ondelete="CASCADE"), index=True)
    type: Mapped[str] = mapped_column(String(32))
    __table_args__ = (UniqueConstraint("src_id", "dst_id", "type"),)


class RunMetrics(Base):
    """A run's per-step metrics (not a node: curves are data about a run, not artifacts)."""
    __tablename__ = "run_metrics"
    run_id: Mapped[int] = mapped_column(Id, ForeignKey("nodes.id", ondelete="CASCADE"), primary_key=True)
    step: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    metrics: Mapped[dict] = mapped_column(Json)
