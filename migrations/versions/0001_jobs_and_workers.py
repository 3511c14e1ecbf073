"""jobs and workers

Revision ID: 0001
Revises: 
Create Date: 2026-11-24

The jobs table (queue, leases, results), the workers table, and a statement-level trigger that
wakes LISTENing workers whenever jobs are inserted.
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None

# One notification per inserting statement, delivered at commit (LISTEN acestep_jobs).
NOTIFY_FUNCTION = """
CREATE FUNCTION acestep_notify_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('acestep_jobs', '');
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.create_table('jobs',
    sa.Column('id', sa.Uuid(), server_default=sa.text('gen_random_uuid()'), nullable=False),
    sa.Column('status', sa.Text(), server_default='queued', nullable=False),
    sa.Column('priority', sa.Integer(), server_default='0', nullable=False),
    sa.Column('owner', sa.Text(), server_default='', nullable=False),
    sa.Column('idempotency_key', sa.Text(), nullable=True),
    sa.Column('request_hash', sa.Text(), nullable=True),
    sa.Column('request', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'::jsonb"), nullable=False),
    sa.Column('model', sa.Text(), server_default='', nullable=False),
    sa.Column('task_type', sa.Text(), server_default='text2music', nullable=False),
    sa.Column('dit_units', sa.Float(), server_default='0', nullable=False),
    sa.Column('lm_units', sa.Float(), server_default='0', nullable=False),
    sa.Column('attempt', sa.Integer(), server_default='0', nullable=False),
    sa.Column('max_attempts', sa.Integer(), server_default='3', nullable=False),
    sa.Column('worker_id', sa.Text(), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), server_default=sa.text('false'), nullable=False),
    sa.Column('stage', sa.Text(), nullable=True),
    sa.Column('progress', sa.Float(), server_default='0', nullable=False),
    sa.Column('result', postgresql.JSONB(astext_type=sa.Text()), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('errors', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('run_after', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'canceled')", name=op.f('ck_jobs_status')),
    sa.CheckConstraint('max_attempts >= 1', name=op.f('ck_jobs_max_attempts')),
    sa.CheckConstraint('progress >= 0 AND progress <= 1', name=op.f('ck_jobs_progress')),
    sa.CheckConstraint("(status = 'running') = (lease_expires_at IS NOT NULL)", name=op.f('ck_jobs_lease_only_while_running')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_jobs'))
    )
    op.create_index('ix_jobs_finished', 'jobs', ['finished_at'], unique=False, postgresql_where=sa.text('finished_at IS NOT NULL'))
    op.create_index('ix_jobs_lease', 'jobs', ['lease_expires_at'], unique=False, postgresql_where=sa.text('lease_expires_at IS NOT NULL'))
    op.create_index('ix_jobs_owner_created', 'jobs', ['owner', 'created_at'], unique=False)
    op.create_index('ix_jobs_queue', 'jobs', ['priority', 'created_at', 'id'], unique=False, postgresql_where=sa.text("status = 'queued'"), postgresql_include=['model', 'dit_units', 'lm_units'])
    op.create_index('uq_jobs_owner_idempotency_key', 'jobs', ['owner', 'idempotency_key'], unique=True, postgresql_where=sa.text('idempotency_key IS NOT NULL'))
    op.create_table('workers',
    sa.Column('id', sa.Text(), nullable=False),
    sa.Column('host', sa.Text(), nullable=False),
    sa.Column('capacity', sa.Integer(), server_default='1', nullable=False),
    sa.Column('models', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'::jsonb"), nullable=False),
    sa.Column('state', sa.Text(), server_default='STARTING', nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.CheckConstraint("state IN ('STARTING', 'READY', 'BUSY', 'SETUP_FAILED', 'STOPPING')", name=op.f('ck_workers_state')),
    sa.CheckConstraint('capacity >= 0', name=op.f('ck_workers_capacity')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_workers'))
    )
    op.create_index('ix_workers_heartbeat_at', 'workers', ['heartbeat_at'], unique=False)
    op.execute(NOTIFY_FUNCTION)
    op.execute(
        "CREATE TRIGGER jobs_notify_inserted AFTER INSERT ON jobs "
        "FOR EACH STATEMENT EXECUTE FUNCTION acestep_notify_jobs()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER jobs_notify_inserted ON jobs")
    op.execute("DROP FUNCTION acestep_notify_jobs()")
    op.drop_index('ix_workers_heartbeat_at', table_name='workers')
    op.drop_table('workers')
    op.drop_index('uq_jobs_owner_idempotency_key', table_name='jobs', postgresql_where=sa.text('idempotency_key IS NOT NULL'))
    op.drop_index('ix_jobs_queue', table_name='jobs', postgresql_where=sa.text("status = 'queued'"), postgresql_include=['model', 'dit_units', 'lm_units'])
    op.drop_index('ix_jobs_owner_created', table_name='jobs')
    op.drop_index('ix_jobs_lease', table_name='jobs', postgresql_where=sa.text('lease_expires_at IS NOT NULL'))
    op.drop_index('ix_jobs_finished', table_name='jobs', postgresql_where=sa.text('finished_at IS NOT NULL'))
    op.drop_table('jobs')
