"""the VAE is priced on the latents it runs over, tiles' overlap included

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07

The VAE decodes (and encodes, for a source) a song longer than one 512-frame chunk in tiles: cores
of 384 latent frames, each run with up to 64 frames of context per side (pipeline.vae.tiles), so a
240 s song runs over 1.32x its own frames and a 20 s song over exactly its own. Measured on the
tiny pipeline (medians of warm runs): the VAE's seconds per song-second rose from 0.049 (10-20 s) to
0.064 (120-240 s); per tiled second they stayed at 0.044-0.049.

`acestep_vae_seconds(s)`: the seconds of latents the VAE runs over for a song of s seconds (the
same as cost_model.vae_seconds). `acestep_job_seconds` reads the VAE's seconds per such second from
k[11] (cost_model.SQL_COEFFICIENTS' `k_vae`), k[6] being then the encoding's alone; it prices the
source's read (k[2]) on them too. An array without k[11] prices as migration 0007 did.
"""

from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

_SOURCE_TASKS = "'cover', 'cover-nofsq', 'repaint', 'lego', 'extract', 'complete'"

_VAE_SECONDS = """
CREATE OR REPLACE FUNCTION acestep_vae_seconds(s float8)
RETURNS float8 LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    -- 25 latent frames a second; one chunk up to 512 frames; else cores of 384 with 64 a side
    SELECT CASE WHEN s IS NULL OR s * 25 <= 512 THEN s
           ELSE (s * 25 + 64 * (2 * ceil(s * 25 / 384) - 3) + LEAST(64, s * 25 - (ceil(s * 25 / 384) - 1) * 384)) / 25
           END
$$
"""

_JOB_SECONDS = """
CREATE OR REPLACE FUNCTION acestep_job_seconds(k float8[], task_type text, items int, audio_seconds float8,
                                               dit_steps int, lm_mode int)
RETURNS float8 LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT GREATEST(0.1, CASE WHEN task_type LIKE 'lm\\_%' THEN k[8]
           ELSE k[1]
              + CASE WHEN task_type IN ({source_tasks})
                     THEN k[2] * {source_seconds} ELSE 0 END
              + CASE lm_mode WHEN 1 THEN k[3] WHEN 2 THEN COALESCE(k[10], k[3]) ELSE 0 END
              + CASE WHEN lm_mode = 2 THEN k[4] ELSE 0 END * COALESCE(audio_seconds, k[9]) * items
              + (k[5] * dit_steps + k[6]) * COALESCE(audio_seconds, k[9]) * items
              + {vae}
              + k[7] * items
           END)
$$
"""

_AFTER = {
    "source_seconds": "CASE WHEN k[11] IS NULL THEN COALESCE(audio_seconds, k[9])"
                      " ELSE acestep_vae_seconds(COALESCE(audio_seconds, k[9])) END",
    "vae": "COALESCE(k[11] * acestep_vae_seconds(COALESCE(audio_seconds, k[9])) * items, 0)",
}
_BEFORE = {"source_seconds": "COALESCE(audio_seconds, k[9])", "vae": "0"}


def upgrade() -> None:
    op.execute(_VAE_SECONDS)
    op.execute(_JOB_SECONDS.format(source_tasks=_SOURCE_TASKS, **_AFTER))


def downgrade() -> None:
    op.execute(_JOB_SECONDS.format(source_tasks=_SOURCE_TASKS, **_BEFORE))
    op.execute("DROP FUNCTION acestep_vae_seconds(float8)")
