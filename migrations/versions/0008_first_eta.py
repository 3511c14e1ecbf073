"""the finish a job's first ETA promised

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06

`jobs.eta_predicted_at`: the submit time plus the `eta_seconds` of the submit answer's estimate,
written once. `GET /metrics` compares it with `finished_at` for the jobs that succeeded lately (the
ETA error, per model), the same on every API replica.
"""

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column('eta_predicted_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'eta_predicted_at')
