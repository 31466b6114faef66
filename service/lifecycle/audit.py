"""The audit trail: who read which seller's token, and every link, refresh, unlink and key change.

Changes are recorded in the same transaction as the change itself. Token reads, the hot path,
are counted in memory per (API key, seller, minute) and written in one batch every
`BROKER_AUDIT_FLUSH_SECONDS`: no transaction per read. A crash loses at most that many seconds
of read counts (never a change).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core import db
from service.core.db import transaction
from service.core.models import AuditEvent, Link, LinkAttempt, WebhookReceipt

log = logging.getLogger("broker.audit")
FLUSH_SLICE = 2000  # rows per COPY: a few ms of encoding, then the event loop runs again


def record(
    session: AsyncSession,
    at: datetime,
    actor: str,
    action: str,
    seller_id: str | None = None,
    detail: str | None = None,
    *,
    application: str | None = None,
) -> None:
    """Add an event to the caller's unit of work (it commits with the change)."""
    session.add(
        AuditEvent(
            at=at,
            actor=actor,
            action=action,
            seller_id=seller_id,
            detail=detail,
            application=application,
        )
    )


class ReadCounter:
    """Token reads per (API key, seller, application, minute); the application is counted by
    `client_id`, as the cached view has it, and written by name, as `/audit` filters it."""

    def __init__(self, name_of: Callable[[str], str] = str, action: str = "token.read") -> None:
        self.name_of = name_of
        self.action = action  # "proxy.call" for calls through the Mercado Pago proxy
        self.counts: Counter[tuple[str, str, str, datetime]] = Counter()
        # The current minute, one object while it lasts: a datetime caches its hash, so every
        # read of the minute hashes it once, and none pays for replace() (the hot path).
        self.minute = self.minute_end = datetime.min.replace(tzinfo=UTC)

    def add(self, actor: str, seller_id: str, client_id: str, now: datetime) -> None:
        if not self.minute <= now < self.minute_end:
            self.minute = now.replace(second=0, microsecond=0)
            self.minute_end = self.minute + timedelta(minutes=1)
        self.counts[(actor, seller_id, client_id, self.minute)] += 1

    async def flush(self, pool: asyncpg.Pool) -> int:
        counts, self.counts = self.counts, Counter()
        if not counts:
            return 0
        rows = (
            (minute, actor, self.action, seller, n, self.name_of(client_id))
            for (actor, seller, client_id, minute), n in counts.items()
        )
        try:
            # Binary COPY (asyncpg encodes in C; the ORM's bulk insert cost 6% of a million-
            # seller read load's CPU), in slices, yielding between them: a flush of thousands
            # of rows in one go would hold the event loop (and every read's latency).
            async with db.direct(pool) as connection, connection.transaction():
                while chunk := list(itertools.islice(rows, FLUSH_SLICE)):
                    await connection.copy_records_to_table(
                        "audit_events",
                        records=chunk,
                        columns=("at", "actor", "action", "seller_id", "count", "application"),
                    )
                    await asyncio.sleep(0)
        except Exception as exc:  # noqa: BLE001 a failed flush keeps its counts for the next
            self.counts.update(counts)
            log.error("audit.flush_failed", extra={"fields": {"error": type(exc).__name__}})
            return 0
        return len(counts)

    async def run(self, pool: asyncpg.Pool, stop: asyncio.Event, every: float) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
            await self.flush(pool)


async def prune(
    sessions: async_sessionmaker[AsyncSession],
    now: datetime,
    audit_days: int,
    attempt_days: int,
) -> tuple[int, int, int]:
    """Enforce retention: old audit events, old link attempts, webhook receipts and links
    expired that long ago go. Counts: (audit events, link attempts, links)."""
    async with transaction(sessions) as session:
        events = await session.execute(
            delete(AuditEvent).where(AuditEvent.at < now - timedelta(days=audit_days))
        )
        attempts = await session.execute(
            delete(LinkAttempt).where(LinkAttempt.created_at < now - timedelta(days=attempt_days))
        )
        await session.execute(
            delete(WebhookReceipt).where(
                WebhookReceipt.received_at < now - timedelta(days=attempt_days)
            )
        )
        links = await session.execute(  # their remaining attempts go with them (cascade)
            delete(Link).where(Link.expires_at < now - timedelta(days=attempt_days))
        )
    counts = (events.rowcount, attempts.rowcount, links.rowcount)  # type: ignore[attr-defined]
    return int(counts[0]), int(counts[1]), int(counts[2])


async def query(
    session: AsyncSession,
    seller_id: str | None = None,
    actor: str | None = None,
    before_id: int | None = None,
    limit: int = 100,
    application: str | None = None,
) -> list[AuditEvent]:
    stmt = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if application is not None:
        stmt = stmt.where(AuditEvent.application == application)
    if seller_id is not None:
        stmt = stmt.where(AuditEvent.seller_id == seller_id)
    if actor is not None:
        stmt = stmt.where(AuditEvent.actor == actor)
    if before_id is not None:
        stmt = stmt.where(AuditEvent.id < before_id)
    return list(await session.scalars(stmt))
