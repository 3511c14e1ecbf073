"""webhook outbox

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24

The webhook outbox and the trigger that fills it when a job with a webhook_url finishes.
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

# Same transaction as the status change: a finished job's webhook can be late, never lost.
OUTBOX_FUNCTION = """
CREATE FUNCTION acestep_queue_webhook() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO webhook_outbox (job_id, url, event)
    VALUES (NEW.id, NEW.request->>'webhook_url', 'job.' || NEW.status);
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.create_table('webhook_outbox',
    sa.Column('id', sa.BigInteger(), sa.Identity(always=False), nullable=False),
    sa.Column('job_id', sa.Uuid(), nullable=False),
    sa.Column('url', sa.Text(), nullable=False),
    sa.Column('event', sa.Text(), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('gave_up_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_webhook_outbox'))
    )
    op.create_index('ix_webhook_outbox_due', 'webhook_outbox', ['next_attempt_at'], unique=False, postgresql_where=sa.text('delivered_at IS NULL AND gave_up_at IS NULL'))
    op.create_index(op.f('ix_webhook_outbox_job_id'), 'webhook_outbox', ['job_id'], unique=False)
    op.execute(OUTBOX_FUNCTION)
    op.execute(
        "CREATE TRIGGER jobs_queue_webhook AFTER UPDATE OF status ON jobs FOR EACH ROW "
        "WHEN (OLD.status IS DISTINCT FROM NEW.status AND NEW.status IN ('succeeded', 'failed', 'canceled') "
        "AND NEW.request->>'webhook_url' IS NOT NULL) EXECUTE FUNCTION acestep_queue_webhook()"
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER jobs_queue_webhook ON jobs")
    op.execute("DROP FUNCTION acestep_queue_webhook()")
    op.drop_index(op.f('ix_webhook_outbox_job_id'), table_name='webhook_outbox')
    op.drop_index('ix_webhook_outbox_due', table_name='webhook_outbox', postgresql_where=sa.text('delivered_at IS NULL AND gave_up_at IS NULL'))
    op.drop_table('webhook_outbox')
