"""Batches end in the background: an index on batches.status for the reaper's scan, and expired_at (a batch past
its completion window with requests left; it ends `expired`). The claim's index follows the claim's order
(priority high to low, then created_at, then id), so interactive jobs are read first from it however many
batch requests wait.

Revision ID: 0011
Revises: 0010
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.add_column(sa.Column("expired_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index("ix_batches_status", ["status"], unique=False)
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_claim")
        batch_op.create_index(
            "ix_jobs_claim",
            ["kind", "status", "base_model", sa.text("priority DESC"), "created_at", "id"],
            unique=False,
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_claim")
        batch_op.create_index("ix_jobs_claim", ["kind", "status", "base_model", "created_at"], unique=False)
    with op.batch_alter_table("batches", schema=None) as batch_op:
        batch_op.drop_index("ix_batches_status")
        batch_op.drop_column("expired_at")
