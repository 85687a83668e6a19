"""evaluations: an evaluation of a checkpoint or model (issue 15, "Evaluation and promotion")

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

One row per evaluation node: the evaluated artifact (target_id; the edge target -evaluated_as-> evaluation
carries the same link for graph walks), an optional name, the result JSON (suites, each with its content
hash and per-mode figures) and the result's hash, so writing the same result twice is one node.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: Union[str, Sequence[str], None] = "0002"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "evaluations",
        sa.Column("node_id", ID, nullable=False),
        sa.Column("target_id", ID, nullable=False),
        sa.Column("name", sa.String(length=253), nullable=False),
        sa.Column("result", JSON, nullable=False),
        sa.Column("result_hash", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(["node_id"], ["nodes.id"], name="fk_evaluations_node_id", ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["target_id"], ["nodes.id"], name="fk_evaluations_target_id", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("node_id", name="pk_evaluations"),
        sa.UniqueConstraint("target_id", "result_hash", name="uq_evaluations_target_id_result_hash"),
    )
    op.create_index("ix_evaluations_target_id", "evaluations", ["target_id"])


def downgrade() -> None:
    op.drop_index("ix_evaluations_target_id", table_name="evaluations")
    op.drop_table("evaluations")
