"""cover-nofsq reads source audio

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28

`acestep_job_seconds` prices reading and encoding the source for the tasks that read one; the
task type cover-nofsq (cover with the raw source latents as context) is one of them, as it is in
handler/http/cost_model.py (`SOURCE_TASK_TYPES`).
"""

from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_FUNCTION = """
CREATE OR REPLACE FUNCTION acestep_job_seconds(k float8[], task_type text, items int, audio_seconds float8,
                                               dit_steps int, lm_mode int)
RETURNS float8 LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT GREATEST(0.1, CASE WHEN task_type LIKE 'lm\\_%' THEN k[8]
           ELSE k[1]
              + CASE WHEN task_type IN ({source_tasks})
                     THEN k[2] * COALESCE(audio_seconds, k[9]) ELSE 0 END
              + CASE WHEN lm_mode >= 1 THEN k[3] ELSE 0 END
              + CASE WHEN lm_mode = 2 THEN k[4] ELSE 0 END * COALESCE(audio_seconds, k[9]) * items
              + (k[5] * dit_steps + k[6]) * COALESCE(audio_seconds, k[9]) * items
              + k[7] * items
           END)
$$
"""
_BEFORE = "'cover', 'repaint', 'lego', 'extract', 'complete'"
_AFTER = "'cover', 'cover-nofsq', 'repaint', 'lego', 'extract', 'complete'"


def upgrade() -> None:
    op.execute(_FUNCTION.format(source_tasks=_AFTER))


def downgrade() -> None:
    op.execute(_FUNCTION.format(source_tasks=_BEFORE))
