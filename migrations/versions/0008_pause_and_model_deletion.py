"""Pausing a fine-tune and deleting a fine-tuned model: jobs.pause_requested, fine_tuned_models.deleted_at.

A pause is asked for on the row (as a cancel is) and acted on by the worker at its next step; a deleted model
keeps its row (its job's history names it) but is no longer listed or served.

Revision ID: 0008
Revises: 0006
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pause_requested", sa.Boolean(), nullable=False, server_default=sa.false()))
    with op.batch_alter_table("fine_tuned_models", schema=None) as batch_op:
        batch_op.add_column(sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("fine_tuned_models", schema=None) as batch_op:
        batch_op.drop_column("deleted_at")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("pause_requested")
