"""routing by model, LoRA adapters

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28

`jobs.lm_model`: the 5 Hz LM a job needs ("" none, "*" any, else a folder name); with `jobs.model`
(the DiT) what a worker must serve to claim it, read from the queue index (INCLUDE). The LoRA
adapters callers upload (`lora_adapters`) and the per-caller state of the upstream `/v1/lora/*`
routes (`lora_states`).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

QUEUE_WHERE = sa.text("status = 'queued'")
INCLUDE_BEFORE = ['model', 'task_type', 'items', 'audio_seconds', 'dit_steps', 'lm_mode']
INCLUDE_AFTER = ['model', 'lm_model', 'task_type', 'items', 'audio_seconds', 'dit_steps', 'lm_mode']


def _queue_index(include: list[str]) -> None:
    op.drop_index('ix_jobs_queue', table_name='jobs', postgresql_where=QUEUE_WHERE)
    op.create_index('ix_jobs_queue', 'jobs', ['priority', 'created_at', 'id'], unique=False,
                    postgresql_where=QUEUE_WHERE, postgresql_include=include)


def upgrade() -> None:
    op.add_column('jobs', sa.Column('lm_model', sa.Text(), server_default='', nullable=False))
    _queue_index(INCLUDE_AFTER)
    op.create_table(
        'lora_adapters',
        sa.Column('owner', sa.Text(), nullable=False),
        sa.Column('name', sa.Text(), nullable=False),
        sa.Column('storage_key', sa.Text(), nullable=False),
        sa.Column('digest', sa.Text(), nullable=False),
        sa.Column('size_bytes', sa.BigInteger(), nullable=False),
        sa.Column('config', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"),
                  nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.PrimaryKeyConstraint('owner', 'name', name=op.f('pk_lora_adapters')),
    )
    op.create_table(
        'lora_states',
        sa.Column('owner', sa.Text(), nullable=False),
        sa.Column('state', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"),
                  nullable=False),
        sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
        sa.PrimaryKeyConstraint('owner', name=op.f('pk_lora_states')),
    )


def downgrade() -> None:
    op.drop_table('lora_states')
    op.drop_table('lora_adapters')
    _queue_index(INCLUDE_BEFORE)
    op.drop_column('jobs', 'lm_model')
