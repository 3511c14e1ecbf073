"""the LM's audio-code runs get an intercept of their own

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06

A `thinking` job's LM writes a chain of thought before its audio codes, so its fixed cost is not
that of a text-only run (metas, format, a sample): measured about 2x. `acestep_job_seconds` reads
the lm_mode 2 intercept from k[10] (cost_model.SQL_COEFFICIENTS' `k_lm_codes_a`); an array without
it (k[10] is NULL) prices as before, with k[3].
"""

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

_SOURCE_TASKS = "'cover', 'cover-nofsq', 'repaint', 'lego', 'extract', 'complete'"
_LM_BEFORE = "CASE WHEN lm_mode >= 1 THEN k[3] ELSE 0 END"
_LM_AFTER = "CASE lm_mode WHEN 1 THEN k[3] WHEN 2 THEN COALESCE(k[10], k[3]) ELSE 0 END"
_FUNCTION = """
CREATE OR REPLACE FUNCTION acestep_job_seconds(k float8[], task_type text, items int, audio_seconds float8,
                                               dit_steps int, lm_mode int)
RETURNS float8 LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT GREATEST(0.1, CASE WHEN task_type LIKE 'lm\\_%' THEN k[8]
           ELSE k[1]
              + CASE WHEN task_type IN ({source_tasks})
                     THEN k[2] * COALESCE(audio_seconds, k[9]) ELSE 0 END
              + {lm_intercept}
              + CASE WHEN lm_mode = 2 THEN k[4] ELSE 0 END * COALESCE(audio_seconds, k[9]) * items
              + (k[5] * dit_steps + k[6]) * COALESCE(audio_seconds, k[9]) * items
              + k[7] * items
           END)
$$
"""


def upgrade() -> None:
    op.execute(_FUNCTION.format(source_tasks=_SOURCE_TASKS, lm_intercept=_LM_AFTER))


def downgrade() -> None:
    op.execute(_FUNCTION.format(source_tasks=_SOURCE_TASKS, lm_intercept=_LM_BEFORE))
