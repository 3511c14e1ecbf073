"""job work features and stage timings

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28

The cost model's features replace dit_units/lm_units: songs (`items`), seconds per song
(`audio_seconds`, NULL while the LM is to choose it; the worker fills it in once known), the DiT
steps the schedule runs (`dit_steps`) and what the LM does (`lm_mode`: 0 nothing, 1 text, 2 audio
codes). `timings` holds what a finished job's stages cost (its share of a batch). The SQL function
`acestep_job_seconds` prices one job with a model's coefficients (handler/http/cost_model.py holds
the same formula in Python: `Coefficients.seconds`).
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None

QUEUE_WHERE = sa.text("status = 'queued'")

# k: the coefficients in the order of cost_model.SQL_COEFFICIENTS (k0, k_src, k_lm_a, k_lm_b, k_dit,
# k_audio, k_items, k_lm_task, expected_seconds). One SELECT without FROM, so the planner inlines it.
JOB_SECONDS_FUNCTION = """
CREATE FUNCTION acestep_job_seconds(k float8[], task_type text, items int, audio_seconds float8,
                                    dit_steps int, lm_mode int)
RETURNS float8 LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT GREATEST(0.1, CASE WHEN task_type LIKE 'lm\\_%' THEN k[8]
           ELSE k[1]
              + CASE WHEN task_type IN ('cover', 'repaint', 'lego', 'extract', 'complete')
                     THEN k[2] * COALESCE(audio_seconds, k[9]) ELSE 0 END
              + CASE WHEN lm_mode >= 1 THEN k[3] ELSE 0 END
              + CASE WHEN lm_mode = 2 THEN k[4] ELSE 0 END * COALESCE(audio_seconds, k[9]) * items
              + (k[5] * dit_steps + k[6]) * COALESCE(audio_seconds, k[9]) * items
              + k[7] * items
           END)
$$
"""

BACKFILL = """
UPDATE jobs SET
    items = CASE WHEN jsonb_typeof(request->'batch_size') = 'number'
                 THEN GREATEST(1, (request->>'batch_size')::float8::int) ELSE 1 END,
    audio_seconds = CASE WHEN jsonb_typeof(request->'audio_duration') = 'number'
                         THEN (request->>'audio_duration')::float8 END,
    dit_steps = CASE WHEN model LIKE '%turbo%' OR jsonb_typeof(request->'inference_steps') <> 'number' THEN 8
                     ELSE (request->>'inference_steps')::float8::int END,
    lm_mode = CASE WHEN request->>'lm_task' IS NOT NULL THEN 1
                   WHEN request->'thinking' = 'true'::jsonb THEN 2 ELSE 0 END
"""


def upgrade() -> None:
    op.add_column('jobs', sa.Column('items', sa.Integer(), server_default='1', nullable=False))
    op.add_column('jobs', sa.Column('audio_seconds', sa.Float(), nullable=True))
    op.add_column('jobs', sa.Column('dit_steps', sa.Integer(), server_default='8', nullable=False))
    op.add_column('jobs', sa.Column('lm_mode', sa.SmallInteger(), server_default='0', nullable=False))
    op.add_column('jobs', sa.Column('timings', postgresql.JSONB(astext_type=sa.Text()), nullable=True))
    op.execute(BACKFILL)
    op.drop_index('ix_jobs_queue', table_name='jobs', postgresql_where=QUEUE_WHERE)
    op.drop_column('jobs', 'dit_units')
    op.drop_column('jobs', 'lm_units')
    op.create_index('ix_jobs_queue', 'jobs', ['priority', 'created_at', 'id'], unique=False,
                    postgresql_where=QUEUE_WHERE,
                    postgresql_include=['model', 'task_type', 'items', 'audio_seconds', 'dit_steps', 'lm_mode'])
    op.execute(JOB_SECONDS_FUNCTION)


def downgrade() -> None:
    op.execute("DROP FUNCTION acestep_job_seconds(float8[], text, int, float8, int, int)")
    op.drop_index('ix_jobs_queue', table_name='jobs', postgresql_where=QUEUE_WHERE)
    op.add_column('jobs', sa.Column('dit_units', sa.Float(), server_default='0', nullable=False))
    op.add_column('jobs', sa.Column('lm_units', sa.Float(), server_default='0', nullable=False))
    op.execute("UPDATE jobs SET dit_units = COALESCE(audio_seconds, 60) * items * dit_steps, "
               "lm_units = CASE WHEN lm_mode = 2 THEN COALESCE(audio_seconds, 60) * items ELSE 0 END")
    op.create_index('ix_jobs_queue', 'jobs', ['priority', 'created_at', 'id'], unique=False,
                    postgresql_where=QUEUE_WHERE, postgresql_include=['model', 'dit_units', 'lm_units'])
    for column in ('timings', 'lm_mode', 'dit_steps', 'audio_seconds', 'items'):
        op.drop_column('jobs', column)
