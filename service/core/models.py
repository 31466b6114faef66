"""Tables. The schema itself is created only by the Alembic revisions in `alembic/versions/`."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, TIMESTAMP
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from service.core.domain import Status

Timestamp = TIMESTAMP(timezone=True)
# A column holding a sealed value (service/core/crypto.py derives its context from the column).
SEALED = {"sealed": True}


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(column_0_label)s",
            "uq": "uq_%(table_name)s_%(column_0_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class ApiKey(Base):
    """An internal caller. Only a SHA-256 digest of the key is stored; `prefix` finds the row."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    digest: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text))
    namespace: Mapped[str | None] = mapped_column(String(128))
    # The applications (by client_id) the key may act in; NULL: all of them.
    client_ids: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    revoked_at: Mapped[datetime | None] = mapped_column(Timestamp)


class Link(Base):
    """A link (`/link/{token}`) an internal service asked for; keyed by the token's digest."""

    __tablename__ = "links"

    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    seller_id: Mapped[str] = mapped_column(String(128), index=True)
    client_id: Mapped[str] = mapped_column(String(64))
    return_url: Mapped[str | None] = mapped_column(Text)
    test: Mapped[bool] = mapped_column(Boolean)
    created_by: Mapped[str | None] = mapped_column(ForeignKey("api_keys.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    expires_at: Mapped[datetime] = mapped_column(Timestamp)
    completed_at: Mapped[datetime | None] = mapped_column(Timestamp)


class LinkAttempt(Base):
    """One click on a link: the server-side half of `state` and PKCE, bound to one browser."""

    __tablename__ = "link_attempts"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    link_id_hash: Mapped[str] = mapped_column(
        ForeignKey("links.id_hash", ondelete="CASCADE"), index=True
    )
    seller_id: Mapped[str] = mapped_column(String(128))
    client_id: Mapped[str] = mapped_column(String(64))
    state_hash: Mapped[str] = mapped_column(String(64), unique=True)
    binder_hash: Mapped[str] = mapped_column(String(64))
    code_verifier: Mapped[str | None] = mapped_column(Text, info=SEALED)
    challenge_method: Mapped[str | None] = mapped_column(String(8))
    test: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    expires_at: Mapped[datetime] = mapped_column(Timestamp)
    consumed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    outcome: Mapped[str | None] = mapped_column(String(32))
    mp_user_id: Mapped[int | None] = mapped_column(BigInteger)


class Seller(Base):
    """A seller the platform linked, keyed by the platform's own id; tokens are sealed."""

    __tablename__ = "sellers"

    seller_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    client_id: Mapped[str] = mapped_column(String(64))
    mp_user_id: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(20))  # linked | relink_required | unlinked
    status_reason: Mapped[str | None] = mapped_column(String(64))
    access_token: Mapped[str | None] = mapped_column(Text, info=SEALED)
    refresh_token: Mapped[str | None] = mapped_column(Text, info=SEALED)
    scope: Mapped[str | None] = mapped_column(Text)
    public_key: Mapped[str | None] = mapped_column(Text)
    live_mode: Mapped[bool] = mapped_column(Boolean)
    expires_at: Mapped[datetime] = mapped_column(Timestamp)
    next_refresh_at: Mapped[datetime | None] = mapped_column(Timestamp)
    last_refreshed_at: Mapped[datetime | None] = mapped_column(Timestamp)
    refresh_failures: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    last_refresh_error: Mapped[str | None] = mapped_column(String(64))
    lease_owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(Timestamp)
    # The last refresh attempt, recorded before it is sent: a later invalid_grant for the same
    # refresh token after an unknown outcome means the rotation was lost, not revoked.
    attempt_fingerprint: Mapped[str | None] = mapped_column(String(16))
    attempt_sent_at: Mapped[datetime | None] = mapped_column(Timestamp)
    attempt_outcome: Mapped[str | None] = mapped_column(String(16))
    # The `version` a `seller.expiring_soon` event was last sent for: one event per token pair.
    expiring_notified_version: Mapped[int | None] = mapped_column(BigInteger)
    # The rotation counter: bumped by every new token pair, guards every token write.
    version: Mapped[int] = mapped_column(BigInteger, server_default=text("1"))
    linked_at: Mapped[datetime] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = mapped_column(Timestamp)

    __table_args__ = (
        # The refresher's work queue, one per application: only linked sellers are ever due.
        Index(
            "ix_sellers_client_id_next_refresh_at_linked",
            "client_id",
            "next_refresh_at",
            postgresql_where=text(f"status = '{Status.LINKED}'"),
        ),
        # The "expiring soon" scan: only sellers that cannot be refreshed (a few, one hopes).
        Index(
            "ix_sellers_expires_at_at_risk",
            "expires_at",
            postgresql_where=text(f"status = '{Status.RELINK_REQUIRED}' OR refresh_failures > 0"),
        ),
        # The dead-owner look (refresh/owners.py): only the sellers leased now.
        Index(
            "ix_sellers_lease_owner_leased",
            "lease_owner",
            postgresql_where=text("lease_owner IS NOT NULL"),
        ),
    )


class AppBreaker(Base):
    """An open circuit breaker: refreshing for this application is paused on every process.

    No row means closed. After `probe_after`, one refresh goes through as a probe; its success
    closes the breaker (`broker breaker close` does too).
    """

    __tablename__ = "app_breakers"

    client_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(String(64))
    tripped_at: Mapped[datetime] = mapped_column(Timestamp)
    probe_after: Mapped[datetime] = mapped_column(Timestamp)


class WebhookReceipt(Base):
    """Mercado Pago notifications taken, by `x-request-id`: a replay does nothing. One taken
    and never `handled_at` (its process died) is taken again by a retry after a while."""

    __tablename__ = "webhook_receipts"

    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    received_at: Mapped[datetime] = mapped_column(Timestamp)
    handled_at: Mapped[datetime | None] = mapped_column(Timestamp)


class AuditEvent(Base):
    """Who did what to which seller. Token reads are aggregated: `count` per key, seller, minute."""

    __tablename__ = "audit_events"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(Timestamp, index=True)
    actor: Mapped[str] = mapped_column(String(100))  # an API key's name, "seller", "system"
    action: Mapped[str] = mapped_column(String(40))
    seller_id: Mapped[str | None] = mapped_column(String(128), index=True)
    detail: Mapped[str | None] = mapped_column(String(200))
    application: Mapped[str | None] = mapped_column(String(100))  # its name when it happened
    count: Mapped[int] = mapped_column(Integer, server_default=text("1"))


class DataKey(Base):
    """A data key wrapped by the key service (service/core/keys.py); never a key in clear.

    The primary is the key promoted last. Only with BROKER_KEY_SERVICE; otherwise empty."""

    __tablename__ = "data_keys"

    key_id: Mapped[str] = mapped_column(String(16), primary_key=True)
    wrapped: Mapped[str] = mapped_column(Text)  # e.g. Transit's `vault:v3:…`
    wrapped_by: Mapped[str] = mapped_column(String(200))  # e.g. `transit:transit/broker`
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=text("now()"))
    promoted_at: Mapped[datetime | None] = mapped_column(Timestamp)


class RefreshPause(Base):
    """The operator's switch (`broker refresher pause`): while this row exists, no process
    refreshes any seller (background or on read). Tokens still valid go on being served."""

    __tablename__ = "refresh_pause"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)  # always 1: one switch
    paused_at: Mapped[datetime] = mapped_column(Timestamp)
    paused_by: Mapped[str] = mapped_column(String(100))
    reason: Mapped[str | None] = mapped_column(String(200))


class Event(Base):
    """The transactional outbox: written in the same transaction as the change it reports."""

    __tablename__ = "events"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # receivers de-duplicate on it
    type: Mapped[str] = mapped_column(String(40))
    seller_id: Mapped[str] = mapped_column(String(128), index=True)
    seller_version: Mapped[int] = mapped_column(BigInteger)  # receivers order on it
    data: Mapped[dict[str, object]] = mapped_column(JSONB)  # never a token
    created_at: Mapped[datetime] = mapped_column(Timestamp, index=True)


class EventDelivery(Base):
    """One event for one subscriber: pending until delivered, or failed once retries run out."""

    __tablename__ = "event_deliveries"

    event_id: Mapped[str] = mapped_column(
        ForeignKey("events.id", ondelete="CASCADE"), primary_key=True
    )
    subscriber: Mapped[str] = mapped_column(String(64), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))  # pending | delivered | failed
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    next_attempt_at: Mapped[datetime] = mapped_column(Timestamp)
    give_up_at: Mapped[datetime] = mapped_column(Timestamp)
    last_error: Mapped[str | None] = mapped_column(String(64))
    delivered_at: Mapped[datetime | None] = mapped_column(Timestamp)

    __table_args__ = (
        # The dispatcher's work queue: only pending deliveries are ever claimed.
        Index(
            "ix_event_deliveries_next_attempt_at_pending",
            "next_attempt_at",
            postgresql_where=text("state = 'pending'"),
        ),
    )
