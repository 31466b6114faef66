"""index the sellers whose token may lapse unrefreshed; webhook receipts say when handled

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29 02:00:00

The refresher looks for them every few minutes (`seller.expiring_soon` events); without this
index that look was a scan of the whole sellers table.

A webhook receipt is now taken before the notification is handled (two copies at once act
once) and marked `handled_at` after: one a crash left unhandled can be taken again.
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
    op.add_column(
        "webhook_receipts",
        sa.Column("handled_at", sa.TIMESTAMP(timezone=True), nullable=True),
    )
    # Receipts written before this revision were recorded after handling.
    op.execute("UPDATE webhook_receipts SET handled_at = received_at")


def downgrade() -> None:
    op.drop_column("webhook_receipts", "handled_at")
    op.drop_index("ix_sellers_expires_at_at_risk", table_name="sellers")
