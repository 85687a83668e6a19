"""initial lineage schema: nodes, the five artifact tables, typed edges

Revision ID: 0001
Revises:
Create Date: 2026-11-23

Written out in full (not create_all) so later revisions have a fixed starting point.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: Union[str, Sequence[str], None] = None
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")
TS = sa.DateTime(timezone=True)


def _node_id(table: str) -> list:
    return [sa.Column("node_id", ID, nullable=False),
            sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name=f"fk_{table}_node_id", ondelete="CASCADE"),
            sa.PrimaryKeyConstraint("node_id", name=f"pk_{table}")]


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("type", sa.String(16), nullable=False),
        sa.Column("label", sa.String(512), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_nodes"),
    )
    op.create_index("ix_nodes_type", "nodes", ["type"])
    op.create_index("ix_nodes_label", "nodes", ["label"])

    op.create_table(
        "datasets", *_node_id("datasets"),
        sa.Column("uri", sa.String(2048), nullable=False),
        sa.Column("content_hash", sa.String(128), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.UniqueConstraint("uri", "content_hash", "version", name="uq_datasets_uri_content_hash_version"),
    )
    op.create_table(
        "runs", *_node_id("runs"),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("kind", sa.String(64), nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("pipeline", sa.String(253), nullable=True),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("spec_hash", sa.String(128), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("metrics", JSON, nullable=False),
        sa.Column("k8s_ref", JSON, nullable=True),
        sa.Column("k8s_uid", sa.String(128), nullable=False),
        sa.UniqueConstraint("name", "spec_hash", "k8s_uid", name="uq_runs_name_spec_hash_k8s_uid"),
    )
    op.create_index("ix_runs_name", "runs", ["name"])
    op.create_index("ix_runs_pipeline", "runs", ["pipeline"])

    op.create_table(
        "checkpoints", *_node_id("checkpoints"),
        sa.Column("run_id", ID, nullable=True),
        sa.Column("uri", sa.String(2048), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=True),
        sa.Column("manifest_hash", sa.String(128), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["nodes.id"], name="fk_checkpoints_run_id"),
        sa.UniqueConstraint("uri", name="uq_checkpoints_uri"),
    )
    op.create_index("ix_checkpoints_run_id", "checkpoints", ["run_id"])

    op.create_table(
        "models", *_node_id("models"),
        sa.Column("checkpoint_id", ID, nullable=True),
        sa.Column("uri", sa.String(2048), nullable=False),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("version", sa.String(128), nullable=False),
        sa.Column("quantization", sa.String(32), nullable=False),
        sa.Column("manifest_hash", sa.String(128), nullable=False),
        sa.ForeignKeyConstraint(["checkpoint_id"], ["nodes.id"], name="fk_models_checkpoint_id"),
        sa.UniqueConstraint("uri", name="uq_models_uri"),
    )
    op.create_index("ix_models_checkpoint_id", "models", ["checkpoint_id"])
    op.create_index("ix_models_name", "models", ["name"])

    op.create_table(
        "deployments", *_node_id("deployments"),
        sa.Column("model_id", ID, nullable=False),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("namespace", sa.String(253), nullable=False),
        sa.Column("k8s_ref", JSON, nullable=True),
        sa.Column("k8s_uid", sa.String(128), nullable=False),
        sa.Column("traffic_percent", sa.Integer(), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("ended_at", TS, nullable=True),
        sa.ForeignKeyConstraint(["model_id"], ["nodes.id"], name="fk_deployments_model_id"),
    )
    op.create_index("ix_deployments_model_id", "deployments", ["model_id"])
    op.create_index("ix_deployments_name", "deployments", ["name"])
    op.create_index("uq_deployments_open", "deployments", ["namespace", "name", "k8s_uid", "model_id"], unique=True,
                    sqlite_where=sa.text("ended_at IS NULL"), postgresql_where=sa.text("ended_at IS NULL"))

    op.create_table(
        "edges",
        sa.Column("id", ID, autoincrement=True, nullable=False),
        sa.Column("src_id", ID, nullable=False),
        sa.Column("dst_id", ID, nullable=False),
        sa.Column("type", sa.String(32), nullable=False),
        sa.ForeignKeyConstraint(["src_id"], ["nodes.id"], name="fk_edges_src_id", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["dst_id"], ["nodes.id"], name="fk_edges_dst_id", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_edges"),
        sa.UniqueConstraint("src_id", "dst_id", "type", name="uq_edges_src_id_dst_id_type"),
    )
    op.create_index("ix_edges_dst_id", "edges", ["dst_id"])


def downgrade() -> None:
    for table in ("edges", "deployments", "models", "checkpoints", "runs", "datasets", "nodes"):
        op.drop_table(table)  # drops the table's indexes with it
