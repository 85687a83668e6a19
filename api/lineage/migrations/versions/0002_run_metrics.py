"""run_metrics: the per-step metrics a run reports (the dashboard's curves)

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

One row per (run, step) with that step's metrics as a JSON object: a trainer reports a batch of steps at
once, a resumed run that redoes a step overwrites it, and deleting the run's node deletes its rows.
"""
from typing import Sequence, Union

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: Union[str, Sequence[str], None] = "0001"
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()), "postgresql")


def upgrade() -> None:
    op.create_table(
        "run_metrics",
        sa.Column("run_id", ID, nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("metrics", JSON, nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["nodes.id"], name="fk_run_metrics_run_id", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("run_id", "step", name="pk_run_metrics"),
    )


def downgrade() -> None:
    op.drop_table("run_metrics")
