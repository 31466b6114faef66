"""Mercado Pago's own notifications: `mp-connect` / `application.deauthorized`.

Mercado Pago signs a notification with `x-signature: ts=<unix>,v1=<hex>`, an HMAC-SHA256 keyed
with the application's webhook secret over

    id:<data.id>;request-id:<x-request-id>;ts:<ts>;

where `data.id` comes from the query string (lower-cased when alphanumeric) and absent parts
are left out. The signature does not cover the body, so a notification is only a hint: only
the signed `data.id` is acted on (a body naming another user changes nothing), and before
unlinking, the seller's own token is tried on `GET /users/me`: only a 401 unlinks.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert

from service.core.applications import Application, Applications
from service.core.config import Settings
from service.core.crypto import Keyring
from service.core.db import transaction
from service.core.domain import Reason, Status
from service.core.mercadopago import TokenCheck
from service.core.models import Seller, WebhookReceipt
from service.core.runtime import Clock, Database, Upstream
from service.lifecycle.sellers import unlink

log = logging.getLogger("broker.webhooks")


@dataclass(frozen=True)
class Notifications:
    """The parts of the process Mercado Pago's notifications use."""

    settings: Settings
    clock: Clock
    db: Database
    keyring: Keyring
    upstream: Upstream


TOPIC = "mp-connect"
HEX = re.compile(r"[0-9a-fA-F]{64}")  # a v1 signature: HMAC-SHA256 in hex
# What may go into the signed manifest: neither may hold its separators (`;`, and `:` in an
# id), or one manifest would read as another (`id:1;request-id:…`).
DATA_ID = r"^[A-Za-z0-9_-]{1,64}$"
REQUEST_ID = r"^[A-Za-z0-9_.-]{1,128}$"
# Longer than any handling takes (one /users/me per seller of the user, each under
# MP_TIMEOUT_SECONDS); a claim older than this and never marked handled was left by a crash.
CLAIM_SECONDS = 300


def application_of(apps: Applications, body: dict[str, Any]) -> Application | None:
    """The application a notification is for: its `application_id`. With one application, a
    notification naming none, or another, is still verified with that one's secret (and then
    ignored if it names another): as before there were several."""
    named = apps.by_client_id.get(str(body.get("application_id", "")))
    if named is None and len(apps) == 1:
        return next(iter(apps.values()))
    return named


def manifest(data_id: str | None, request_id: str | None, ts: str) -> str:
    if data_id and data_id.isalnum():
        data_id = data_id.lower()
    parts = []
    if data_id:
        parts.append(f"id:{data_id};")
    if request_id:
        parts.append(f"request-id:{request_id};")
    parts.append(f"ts:{ts};")
    return "".join(parts)


def signature(secret: str, data_id: str | None, request_id: str | None, ts: str) -> str:
    message = manifest(data_id, request_id, ts).encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(
    header: str | None,
    secrets: tuple[str, ...],
    data_id: str | None,
    request_id: str | None,
    now: datetime,
    tolerance_seconds: int,
) -> bool:
    """A valid, fresh signature by any of the configured secrets (two during a secret change)."""
    fields = dict(part.strip().split("=", 1) for part in (header or "").split(",") if "=" in part)
    ts, given = fields.get("ts", ""), fields.get("v1", "")
    # ASCII digits only: str.isdigit() is true for "²", which int() then refuses (a 500).
    if not (ts.isascii() and ts.isdigit()) or not HEX.fullmatch(given) or not secrets:
        return False
    # Mercado Pago's ts is in seconds or, in some reports, milliseconds: accept both.
    seconds = int(ts) / 1000 if len(ts) > 11 else int(ts)
    if abs(now.timestamp() - seconds) > tolerance_seconds:
        return False  # stale: a captured notification cannot be replayed later
    return any(
        hmac.compare_digest(signature(secret, data_id, request_id, ts), given.lower())
        for secret in secrets
    )


@dataclass(frozen=True)
class Handled:
    # "unlinked" | "ignored" | "duplicate" | "still_authorized" | "unconfirmed"
    action: str
    sellers: int = 0


async def handle(
    flow: Notifications,
    app: Application,
    request_id: str,
    data_id: str | None,
    body: dict[str, Any],
) -> Handled:
    """Act on a verified notification (`data_id`: the signed one, from the query string;
    `request_id`: its x-request-id, which the route requires in the REQUEST_ID shape):
    de-duplicated, checked, confirmed with Mercado Pago."""
    if not await _claim(flow, request_id):
        return Handled("duplicate")
    try:
        handled = await _act(flow, app, data_id, body)
    except BaseException:
        # Mercado Pago retries a notification that failed half-way (it could not confirm):
        # the retry must not be dropped as a duplicate.
        await _release(flow, request_id)
        raise
    await _handled(flow, request_id)
    log.info(
        "webhook.handled",
        extra={
            "fields": {
                "action": handled.action,
                "application": app.name,
                "request_id": request_id,
            }
        },
    )
    return handled


async def _claim(flow: Notifications, request_id: str) -> bool:
    """Take the request id; True only for the one delivery that took it, so two deliveries
    at once act once (the other is a duplicate). A claim never marked handled (its process
    died mid-way) is taken over by a retry after CLAIM_SECONDS."""
    now = flow.clock()
    statement = insert(WebhookReceipt).values(request_id=request_id, received_at=now)
    async with transaction(flow.db.sessions) as session:
        taken = await session.scalar(
            statement.on_conflict_do_update(
                index_elements=[WebhookReceipt.request_id],
                set_={"received_at": now},
                where=WebhookReceipt.handled_at.is_(None)
                & (WebhookReceipt.received_at < now - timedelta(seconds=CLAIM_SECONDS)),
            ).returning(WebhookReceipt.request_id)
        )
    return taken is not None


async def _handled(flow: Notifications, request_id: str) -> None:
    async with transaction(flow.db.sessions) as session:
        await session.execute(
            update(WebhookReceipt)
            .where(WebhookReceipt.request_id == request_id)
            .values(handled_at=flow.clock())
        )


async def _release(flow: Notifications, request_id: str) -> None:
    async with transaction(flow.db.sessions) as session:
        await session.execute(delete(WebhookReceipt).where(WebhookReceipt.request_id == request_id))


def _user_id(value: Any) -> int | None:
    try:
        return int(str(value))
    except ValueError:
        return None


async def _act(
    flow: Notifications, app: Application, signed_id: str | None, body: dict[str, Any]
) -> Handled:
    if (body.get("type") or body.get("topic")) != TOPIC:
        return Handled("ignored")
    if str(body.get("application_id", "")) != app.client_id:
        return Handled("ignored")  # another application's notification
    if body.get("action") != "application.deauthorized":
        return Handled("ignored")
    user_id = _user_id(signed_id)
    if user_id is None:
        return Handled("ignored")  # no signed user: nothing the signature vouches for
    data = body.get("data")
    named = data.get("id") if isinstance(data, dict) else None
    named = named if named is not None else body.get("user_id")
    if named is not None and _user_id(named) != user_id:
        # The body is not signed: one naming another user than `data.id` is not believed.
        log.warning("webhook.user_mismatch", extra={"fields": {"mp_user_id": user_id}})
        return Handled("ignored")
    async with flow.db.sessions() as session:
        sellers = list(
            await session.scalars(
                select(Seller).where(
                    Seller.mp_user_id == user_id,
                    Seller.client_id == app.client_id,
                    Seller.status != Status.UNLINKED,
                )
            )
        )
    unlinked = unconfirmed = 0
    for seller in sellers:
        if seller.access_token is None:  # never so for a seller not unlinked
            continue
        token = flow.keyring.open_column(
            Seller.access_token, seller.seller_id, seller.client_id, seller.access_token
        )
        check = await flow.upstream.mercadopago.check_token(app.api_url, token, app.name)
        if check == TokenCheck.WORKS:
            continue  # the hint was wrong (or forged): the token still works
        if check == TokenCheck.FORBIDDEN:
            unconfirmed += 1  # a 403 does not say the grant is gone: change nothing
            log.warning(
                "webhook.unconfirmed",
                extra={"fields": {"seller_id": seller.seller_id, "upstream_status": 403}},
            )
            continue
        if await unlink(
            flow.db.sessions,
            flow.settings,
            flow.clock(),
            seller.seller_id,
            Reason.DEAUTHORIZED,
            expected_version=seller.version,
        ):
            unlinked += 1
    log.warning(
        "webhook.deauthorized",
        extra={"fields": {"mp_user_id": user_id, "application": app.name, "unlinked": unlinked}},
    )
    if unlinked:
        return Handled("unlinked", unlinked)
    return Handled("unconfirmed" if unconfirmed else "still_authorized")
