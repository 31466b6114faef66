"""Events to internal services: a transactional outbox and a signed, retried delivery loop.

`emit` adds the event (and one delivery per subscriber) to the caller's unit of work, so an
event exists exactly when its change committed. The dispatcher claims due deliveries with
`FOR UPDATE SKIP LOCKED` (any number of refresher processes can run it), POSTs them, and retries
with exponential backoff and jitter until `BROKER_EVENT_RETRY_HOURS` have passed; then the
delivery is parked as `failed` (`broker events list --failed`, `broker events replay`).

Delivery is at least once: receivers de-duplicate on the event `id` and order a seller's events
by `seller_version`. An event never carries a token.

The signature (README: "Events"): `Broker-Signature: t=<unix seconds>,v1=<hex>` where
`v1 = HMAC-SHA256(secret, f"{t}.{raw body}")`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import Select, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core import logs, metrics
from service.core.config import Settings, Subscriber
from service.core.db import transaction
from service.core.domain import DeliveryState, EventType, Status
from service.core.models import Event, EventDelivery, Seller
from service.core.runtime import Clock
from service.refresh import policy

log = logging.getLogger("broker.events")


SIGNATURE_HEADER = "Broker-Signature"
CLAIM_SECONDS = 60  # a claimed delivery is someone's for this long (longer than one POST)


def emit(
    session: AsyncSession,
    settings: Settings,
    now: datetime,
    type_: EventType,
    seller_id: str,
    seller_version: int,
    **data: object,
) -> None:
    """Add an event to the caller's unit of work: it commits, or not, with the change."""
    event_id = str(uuid.uuid4())
    fields = {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in data.items()}
    session.add(
        Event(
            id=event_id,
            type=type_,
            seller_id=seller_id,
            seller_version=seller_version,
            data=fields,
            created_at=now,
        )
    )
    give_up_at = now + timedelta(hours=settings.broker_event_retry_hours)
    for subscriber in settings.broker_event_subscribers:
        session.add(
            EventDelivery(
                event_id=event_id,
                subscriber=subscriber.name,
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=now,
                give_up_at=give_up_at,
            )
        )
    metrics.EVENTS_EMITTED.labels(str(data.get("application", "")), type_).inc()


def emit_for(
    session: AsyncSession, settings: Settings, now: datetime, type_: EventType, seller: Seller
) -> None:
    """`emit` with what a receiver needs to know about the seller's state (never a token)."""
    emit(
        session,
        settings,
        now,
        type_,
        seller.seller_id,
        seller.version,
        application=settings.apps.name_of(seller.client_id),
        client_id=seller.client_id,
        status=seller.status,
        reason=seller.status_reason,
        mp_user_id=seller.mp_user_id,
        live_mode=seller.live_mode,
        expires_at=seller.expires_at,
        refresh_failures=seller.refresh_failures,
        last_refresh_error=seller.last_refresh_error,
    )


def body(event: Event) -> bytes:
    return json.dumps(
        {
            "id": event.id,
            "type": event.type,
            "created_at": event.created_at.isoformat(),
            "seller_id": event.seller_id,
            "seller_version": event.seller_version,
            "data": event.data,
        },
        separators=(",", ":"),
        sort_keys=True,
    ).encode()


def sign(secret: str, timestamp: int, payload: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + payload, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


@dataclass(frozen=True)
class _Due:
    event: Event
    subscriber: Subscriber
    attempts: int
    give_up_at: datetime


class Dispatcher:
    """Delivers pending events; runs beside the refresher (`broker refresher`)."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        sessions: async_sessionmaker[AsyncSession],
        http: httpx.AsyncClient,
    ) -> None:
        self.settings, self.clock, self.sessions, self.http = settings, clock, sessions, http
        self.subscribers = {s.name: s for s in settings.broker_event_subscribers}

    async def run(self, stop: asyncio.Event, poll_seconds: float = 1.0) -> None:
        while not stop.is_set():
            try:
                sent = await self.deliver_due()
            except Exception as exc:  # noqa: BLE001 a database blip must not end the loop
                logs.event(log, "events.dispatch_failed", {"error": type(exc).__name__}, 40)
                sent = 0
            if sent:
                continue  # more may be waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), poll_seconds)

    async def deliver_due(self) -> int:
        """Claim up to `BROKER_EVENT_CONCURRENCY` due deliveries and send them concurrently."""
        if not self.subscribers:
            return 0
        due = await self._claim(self.settings.broker_event_concurrency)
        await asyncio.gather(*(self._deliver(item) for item in due))
        return len(due)

    async def _claim(self, limit: int) -> Sequence[_Due]:
        now = self.clock()
        async with transaction(self.sessions) as session:
            rows = (
                await session.execute(
                    select(EventDelivery, Event)
                    .join(Event, Event.id == EventDelivery.event_id)
                    .where(
                        EventDelivery.state == DeliveryState.PENDING,
                        EventDelivery.next_attempt_at <= now,
                        EventDelivery.subscriber.in_(list(self.subscribers)),
                    )
                    .order_by(EventDelivery.next_attempt_at)
                    .limit(limit)
                    .with_for_update(of=EventDelivery, skip_locked=True)
                )
            ).all()
            for delivery, _ in rows:
                # The claim: nobody else picks it up while this POST is in flight.
                delivery.next_attempt_at = now + timedelta(seconds=CLAIM_SECONDS)
        return [
            _Due(event, self.subscribers[d.subscriber], d.attempts, d.give_up_at)
            for d, event in rows
        ]

    async def _deliver(self, due: _Due) -> None:
        payload = body(due.event)
        now = self.clock()
        headers = {
            "Content-Type": "application/json",
            "Broker-Event-Id": due.event.id,
            "Broker-Event-Type": due.event.type,
            SIGNATURE_HEADER: sign(
                due.subscriber.secret.get_secret_value(), int(now.timestamp()), payload
            ),
        }
        error: str | None = None
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            # One deadline for the whole delivery: httpx's timeout is per phase, and a
            # subscriber answering a byte at a time would stretch it without end.
            async with asyncio.timeout(self.settings.broker_event_timeout_seconds):
                reply = await self.http.post(
                    due.subscriber.url, content=payload, headers=headers, timeout=None
                )
            if not 200 <= reply.status_code < 300:
                error = f"http_{reply.status_code}"
        except TimeoutError:
            error = "Timeout"
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        metrics.EVENT_DELIVERY_SECONDS.observe(loop.time() - started)
        await self._settle(due, error)

    async def _settle(self, due: _Due, error: str | None) -> None:
        now = self.clock()
        attempts = due.attempts + 1
        values: dict[str, Any] = {"attempts": attempts, "last_error": error}
        outcome: str  # a DeliveryState, or "retry" (still pending)
        if error is None:
            values |= {"state": DeliveryState.DELIVERED, "delivered_at": now}
            outcome = DeliveryState.DELIVERED
        elif now >= due.give_up_at:
            values |= {"state": DeliveryState.FAILED}
            outcome = DeliveryState.FAILED
        else:
            # 5 s, 10 s, 20 s ... by default: the first retry after one base period.
            retry_in = policy.backoff(
                attempts - 1,
                self.settings.broker_event_backoff_base_seconds,
                self.settings.broker_event_backoff_max_seconds,
            )
            values |= {"next_attempt_at": now + retry_in}
            outcome = "retry"
        async with transaction(self.sessions) as session:
            await session.execute(
                update(EventDelivery)
                .where(
                    EventDelivery.event_id == due.event.id,
                    EventDelivery.subscriber == due.subscriber.name,
                    EventDelivery.state == DeliveryState.PENDING,
                )
                .values(**values)
            )
        metrics.EVENT_DELIVERIES.labels(due.subscriber.name, outcome).inc()
        if outcome != DeliveryState.DELIVERED:
            logs.event(
                log,
                f"event.{outcome}",
                {
                    "event_id": due.event.id,
                    "type": due.event.type,
                    "subscriber": due.subscriber.name,
                    "attempts": attempts,
                    "error": error,
                },
                logging.WARNING if outcome == "retry" else logging.ERROR,
            )


def expiring_query(now: datetime, horizon: datetime) -> Select[Seller]:
    """Sellers at risk not yet told about: the partial index `ix_sellers_expires_at_at_risk`
    holds only sellers that cannot be refreshed, so this never reads the healthy ones."""
    return (
        select(Seller)
        .where(
            Seller.status.in_((Status.LINKED, Status.RELINK_REQUIRED)),
            Seller.expires_at > now,
            Seller.expires_at < horizon,
            or_(Seller.status == Status.RELINK_REQUIRED, Seller.refresh_failures > 0),
            or_(
                Seller.expiring_notified_version.is_(None),
                Seller.expiring_notified_version != Seller.version,
            ),
        )
        .order_by(Seller.expires_at)
        .limit(1000)
        .with_for_update(skip_locked=True)
    )


async def notify_expiring(
    sessions: async_sessionmaker[AsyncSession], settings: Settings, now: datetime
) -> int:
    """`seller.expiring_soon`, once per token pair, for sellers whose token will lapse within
    `BROKER_EXPIRING_SOON_DAYS` and cannot be refreshed (relink required, or failing)."""
    horizon = now + timedelta(days=settings.broker_expiring_soon_days)
    async with transaction(sessions) as session:
        sellers = list(await session.scalars(expiring_query(now, horizon)))
        for seller in sellers:
            seller.expiring_notified_version = seller.version
            emit_for(session, settings, now, EventType.EXPIRING_SOON, seller)
    return len(sellers)


async def list_events(
    session: AsyncSession, limit: int, *, failed_only: bool
) -> list[tuple[Event, EventDelivery | None]]:
    query = (
        select(Event, EventDelivery)
        .outerjoin(EventDelivery, EventDelivery.event_id == Event.id)
        .order_by(Event.created_at.desc())
        .limit(limit)
    )
    if failed_only:
        query = query.where(EventDelivery.state == DeliveryState.FAILED)
    return [(event, delivery) for event, delivery in (await session.execute(query)).all()]


async def replay(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    now: datetime,
    event_ids: Sequence[str] = (),
    *,
    all_failed: bool = False,
) -> int:
    """Put failed deliveries (these events', or all) back in the queue with a fresh period."""
    condition = EventDelivery.state == DeliveryState.FAILED
    if not all_failed:
        # A named event is sent again to every subscriber, even one it already reached.
        condition = EventDelivery.event_id.in_(list(event_ids))
    async with transaction(sessions) as session:
        result = await session.execute(
            update(EventDelivery)
            .where(condition)
            .values(
                state=DeliveryState.PENDING,
                attempts=0,
                next_attempt_at=now,
                give_up_at=now + timedelta(hours=settings.broker_event_retry_hours),
                last_error=None,
            )
        )
    return int(result.rowcount)  # type: ignore[attr-defined]
