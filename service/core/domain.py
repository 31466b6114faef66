"""The broker's domain types: what a seller and an API key are to the flows that serve them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Literal


class Status(StrEnum):
    """A seller's `status`. Only `service/lifecycle/sellers.py` changes it."""

    LINKED = "linked"
    RELINK_REQUIRED = "relink_required"  # the token may still be served until it lapses
    UNLINKED = "unlinked"  # tokens destroyed; the row stays for its history


# `Status` as a type of the API's query parameters (the OpenAPI document lists the values in
# place); tests/test_lifecycle.py checks that the two agree.
StatusName = Literal["linked", "relink_required", "unlinked"]


class Reason(StrEnum):
    """Why a seller is not `linked` (`status_reason`)."""

    ROTATION_LOST = "rotation_lost"  # a refresh's reply was lost; its token is burned
    REVOKED = "revoked"  # Mercado Pago refused the grant
    DEAUTHORIZED = "deauthorized"  # the seller removed the app (a confirmed mp-connect)
    UNLINKED_BY_PLATFORM = "unlinked_by_platform"  # DELETE /sellers/{id}
    UNLINKED_BY_OPERATOR = "unlinked_by_operator"  # `broker sellers unlink`


UNLINK_REASONS = (Reason.DEAUTHORIZED, Reason.UNLINKED_BY_PLATFORM, Reason.UNLINKED_BY_OPERATOR)


class AttemptOutcome(StrEnum):
    """How the seller's last refresh attempt ended (`attempt_outcome`)."""

    SENT = "sent"  # recorded before the request; still `sent`: its owner never said how it ended
    OK = "ok"
    UNKNOWN = "unknown"  # sent and unanswered (a timeout, a 5xx): Mercado Pago may have rotated
    NOT_SENT = "not_sent"  # surely never reached Mercado Pago
    REJECTED = "rejected"  # an application-wide error (the breaker trips)
    INVALID_GRANT = "invalid_grant"


# The outcomes after which the same refresh token may already be spent.
OUTCOME_UNKNOWN = (AttemptOutcome.SENT, AttemptOutcome.UNKNOWN)


class TokenWarning(StrEnum):
    """`Broker-Token-Warning`: the token served is valid but its seller needs attention."""

    REFRESH_FAILING = "refresh-failing"
    RELINK_REQUIRED = "relink-required"


class EventType(StrEnum):
    """What an event to internal services reports (`events.type`)."""

    LINKED = "seller.linked"
    RELINKED = "seller.relinked"
    RELINK_REQUIRED = "seller.relink_required"
    UNLINKED = "seller.unlinked"
    RECOVERED = "seller.recovered"
    EXPIRING_SOON = "seller.expiring_soon"
    REFRESH_FAILED = "token.refresh_failed"


class DeliveryState(StrEnum):
    """One event's delivery to one subscriber (`event_deliveries.state`)."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # retries ran out; `broker events replay` sends it again


@dataclass(slots=True)
class SellerView:
    """What a token read needs of a seller row, with the access token already decrypted.

    Not frozen: a cache hit builds one from the cached tuple (`cache.py`), and a frozen
    dataclass's `__init__` (one `object.__setattr__` per field) cost 1.2 µs of it, against
    0.13 µs; each read holds its own, so nothing shares one to mutate."""

    seller_id: str
    client_id: str
    version: int
    status: str
    status_reason: str | None
    expires_at: datetime
    refresh_failures: int
    last_refreshed_at: datetime | None
    attempt_sent_at: datetime | None
    lease_until: datetime | None
    mp_user_id: int
    live_mode: bool
    scope: str | None
    access_token: str | None  # None once unlinked
    body: bytes  # the token reply, serialized once
    head: tuple[tuple[bytes, bytes], ...] = ()  # and the headers of its 200, built once


@dataclass(frozen=True, slots=True)
class KeyView:
    """An API key as the routes need it (never its secret: only the digest)."""

    id: str
    name: str
    prefix: str
    digest: str
    scopes: tuple[str, ...]
    namespace: str | None
    client_ids: frozenset[str] | None  # the applications it may act in; None: all
    revoked: bool
