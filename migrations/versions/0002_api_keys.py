"""api keys

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

API keys (stored as SHA-256 hashes) and the index that counts a key's queued jobs for its quota.
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('name', sa.Text(), nullable=False),
    sa.Column('key_hash', sa.Text(), nullable=False),
    sa.Column('max_queued', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash'))
    )
    op.create_index('ix_jobs_owner_queued', 'jobs', ['owner'], unique=False, postgresql_where=sa.text("status = 'queued'"))


def downgrade() -> None:
    op.drop_index('ix_jobs_owner_queued', table_name='jobs', postgresql_where=sa.text("status = 'queued'"))
    op.drop_table('api_keys')
