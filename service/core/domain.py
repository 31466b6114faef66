"""The broker's domain types: what a seller and an API key are to the flows that serve them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class SellerView:
    """What a token read needs of a seller row, with the access token already decrypted."""

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


@dataclass(frozen=True, slots=True)
class KeyView:
    """An API key as the routes need it (never its secret: only the digest)."""

    id: str
    name: str
    prefix: str
    digest: str
    scopes: tuple[str, ...]
    namespace: str | None
    revoked: bool
