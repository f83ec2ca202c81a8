"""Tenants on jobs, files and fine-tuned models; API keys (hashed)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 08:48:44.891160
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

def upgrade() -> None:

    op.create_table('api_keys',
    sa.Column('id', sa.String(length=64), nullable=False),
    sa.Column('tenant', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('secret_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_tenant'), ['tenant'], unique=False)

    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tenant', sa.String(length=64), nullable=False, server_default='default'))
        batch_op.create_index(batch_op.f('ix_files_tenant'), ['tenant'], unique=False)

    with op.batch_alter_table('fine_tuned_models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tenant', sa.String(length=64), nullable=False, server_default='default'))
        batch_op.create_index(batch_op.f('ix_fine_tuned_models_tenant'), ['tenant'], unique=False)

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tenant', sa.String(length=64), nullable=False, server_default='default'))
        batch_op.drop_index(batch_op.f('ix_jobs_created'))
        batch_op.create_index('ix_jobs_tenant_created', ['tenant', 'created_at'], unique=False)

def downgrade() -> None:

    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('ix_jobs_tenant_created')
        batch_op.create_index(batch_op.f('ix_jobs_created'), ['created_at'], unique=False)
        batch_op.drop_column('tenant')

    with op.batch_alter_table('fine_tuned_models', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_fine_tuned_models_tenant'))
        batch_op.drop_column('tenant')

    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_files_tenant'))
        batch_op.drop_column('tenant')

    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_tenant'))

    op.drop_table('api_keys')

