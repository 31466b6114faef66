"""index the sellers whose token may lapse unrefreshed

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 02:00:00

The refresher looks for them every few minutes (`seller.expiring_soon` events); without this
index that look was a scan of the whole sellers table.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_sellers_expires_at_at_risk",
        "sellers",
        ["expires_at"],
        postgresql_where=sa.text("status = 'relink_required' OR refresh_failures > 0"),
    )


def downgrade() -> None:
    op.drop_index("ix_sellers_expires_at_at_risk", table_name="sellers")
