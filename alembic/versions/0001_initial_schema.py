"""initial schema

Revision ID: 0001
Revises:
Create Date: 2026-11-28 18:12:36.542516
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("scopes", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("namespace", sa.String(length=128), nullable=True),
        sa.Column("created_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("revoked_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("last_used_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("name", name=op.f("uq_api_keys_name")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    op.create_table(
        "app_breakers",
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("tripped_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("probe_after", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("client_id", name=op.f("pk_app_breakers")),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=100), nullable=False),
        sa.Column("action", sa.String(length=40), nullable=False),
        sa.Column("seller_id", sa.String(length=128), nullable=True),
        sa.Column("detail", sa.String(length=200), nullable=True),
        sa.Column("count", sa.Integer(), server_default=sa.text("1"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(op.f("ix_audit_events_at"), "audit_events", ["at"], unique=False)
    op.create_index(op.f("ix_audit_events_seller_id"), "audit_events", ["seller_id"], unique=False)
    op.create_table(
        "sellers",
        sa.Column("seller_id", sa.String(length=128), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("mp_user_id", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("status_reason", sa.String(length=64), nullable=True),
        sa.Column("access_token", sa.Text(), nullable=True),
        sa.Column("refresh_token", sa.Text(), nullable=True),
        sa.Column("scope", sa.Text(), nullable=True),
        sa.Column("public_key", sa.Text(), nullable=True),
        sa.Column("live_mode", sa.Boolean(), nullable=False),
        sa.Column("expires_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("next_refresh_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("last_refreshed_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("refresh_failures", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("last_refresh_error", sa.String(length=64), nullable=True),
        sa.Column("lease_owner", sa.String(length=64), nullable=True),
        sa.Column("lease_until", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("attempt_fingerprint", sa.String(length=16), nullable=True),
        sa.Column("attempt_sent_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("attempt_outcome", sa.String(length=16), nullable=True),
        sa.Column("version", sa.BigInteger(), server_default=sa.text("1"), nullable=False),
        sa.Column("linked_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("updated_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("seller_id", name=op.f("pk_sellers")),
    )
    op.create_index(
        "ix_sellers_next_refresh_at_linked",
        "sellers",
        ["next_refresh_at"],
        unique=False,
        postgresql_where=sa.text("status = 'linked'"),
    )
    op.create_table(
        "webhook_receipts",
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("received_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_webhook_receipts")),
    )
    op.create_table(
        "links",
        sa.Column("id_hash", sa.String(length=64), nullable=False),
        sa.Column("seller_id", sa.String(length=128), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("return_url", sa.Text(), nullable=True),
        sa.Column("test", sa.Boolean(), nullable=False),
        sa.Column("created_by", sa.String(length=36), nullable=True),
        sa.Column("created_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("expires_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("completed_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["created_by"],
            ["api_keys.id"],
            name=op.f("fk_links_created_by_api_keys"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id_hash", name=op.f("pk_links")),
    )
    op.create_index(op.f("ix_links_seller_id"), "links", ["seller_id"], unique=False)
    op.create_table(
        "link_attempts",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("link_id_hash", sa.String(length=64), nullable=False),
        sa.Column("seller_id", sa.String(length=128), nullable=False),
        sa.Column("client_id", sa.String(length=64), nullable=False),
        sa.Column("state_hash", sa.String(length=64), nullable=False),
        sa.Column("binder_hash", sa.String(length=64), nullable=False),
        sa.Column("code_verifier", sa.Text(), nullable=True),
        sa.Column("challenge_method", sa.String(length=8), nullable=True),
        sa.Column("test", sa.Boolean(), nullable=False),
        sa.Column("created_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("expires_at", postgresql.TIMESTAMP(timezone=True), nullable=False),
        sa.Column("consumed_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.Column("outcome", sa.String(length=32), nullable=True),
        sa.Column("mp_user_id", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["link_id_hash"],
            ["links.id_hash"],
            name=op.f("fk_link_attempts_link_id_hash_links"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_link_attempts")),
        sa.UniqueConstraint("state_hash", name=op.f("uq_link_attempts_state_hash")),
    )
    op.create_index(
        op.f("ix_link_attempts_link_id_hash"), "link_attempts", ["link_id_hash"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_link_attempts_link_id_hash"), table_name="link_attempts")
    op.drop_table("link_attempts")
    op.drop_index(op.f("ix_links_seller_id"), table_name="links")
    op.drop_table("links")
    op.drop_table("webhook_receipts")
    op.drop_index(
        "ix_sellers_next_refresh_at_linked",
        table_name="sellers",
        postgresql_where=sa.text("status = 'linked'"),
    )
    op.drop_table("sellers")
    op.drop_index(op.f("ix_audit_events_seller_id"), table_name="audit_events")
    op.drop_index(op.f("ix_audit_events_at"), table_name="audit_events")
    op.drop_table("audit_events")
    op.drop_table("app_breakers")
    op.drop_table("api_keys")
