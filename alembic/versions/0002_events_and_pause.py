"""events outbox, deliveries, the refresh pause switch

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 20:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TIMESTAMP = postgresql.TIMESTAMP(timezone=True)


def upgrade() -> None:
    op.add_column("sellers", sa.Column("expiring_notified_version", sa.BigInteger(), nullable=True))
    op.create_table(
        "refresh_pause",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("paused_at", TIMESTAMP, nullable=False),
        sa.Column("paused_by", sa.String(length=100), nullable=False),
        sa.Column("reason", sa.String(length=200), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refresh_pause")),
    )
    op.create_table(
        "events",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("type", sa.String(length=40), nullable=False),
        sa.Column("seller_id", sa.String(length=128), nullable=False),
        sa.Column("seller_version", sa.BigInteger(), nullable=False),
        sa.Column("data", postgresql.JSONB(), nullable=False),
        sa.Column("created_at", TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_seller_id"), "events", ["seller_id"])
    op.create_index(op.f("ix_events_created_at"), "events", ["created_at"])
    op.create_table(
        "event_deliveries",
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("subscriber", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("next_attempt_at", TIMESTAMP, nullable=False),
        sa.Column("give_up_at", TIMESTAMP, nullable=False),
        sa.Column("last_error", sa.String(length=64), nullable=True),
        sa.Column("delivered_at", TIMESTAMP, nullable=True),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["events.id"],
            name=op.f("fk_event_deliveries_event_id_events"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("event_id", "subscriber", name=op.f("pk_event_deliveries")),
    )
    op.create_index(
        "ix_event_deliveries_next_attempt_at_pending",
        "event_deliveries",
        ["next_attempt_at"],
        postgresql_where=sa.text("state = 'pending'"),
    )


def downgrade() -> None:
    op.drop_index("ix_event_deliveries_next_attempt_at_pending", table_name="event_deliveries")
    op.drop_table("event_deliveries")
    op.drop_index(op.f("ix_events_created_at"), table_name="events")
    op.drop_index(op.f("ix_events_seller_id"), table_name="events")
    op.drop_table("events")
    op.drop_table("refresh_pause")
    op.drop_column("sellers", "expiring_notified_version")
