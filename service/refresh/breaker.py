"""Per-application circuit breaker, kept in PostgreSQL so every process obeys it.

Application-wide errors (`invalid_client`, ...) mean our credentials or configuration are wrong,
not a seller's grant; a burst of `invalid_grant` smells of a bad deploy. Either trips the
breaker: refreshing for that `client_id` pauses everywhere and no seller changes status. After
`BROKER_BREAKER_PROBE_SECONDS` one refresh goes through as a probe; its success closes it.
`broker breaker close` closes it by hand.

Above the breakers sits the operator's switch, `broker refresher pause|resume`: one row in
`refresh_pause` that every process checks before every claim and every send.
"""

from __future__ import annotations

import logging
from collections import deque
from datetime import datetime, timedelta
from enum import StrEnum

from sqlalchemy import delete, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core.db import transaction
from service.core.models import AppBreaker, RefreshPause

log = logging.getLogger("broker.breaker")


class Gate(StrEnum):
    CLOSED = "closed"  # refresh freely
    PROBE = "probe"  # open, and this caller is the one probe
    OPEN = "open"  # paused


async def gate(
    sessions: async_sessionmaker[AsyncSession], client_id: str, now: datetime, probe_seconds: int
) -> Gate:
    async with transaction(sessions) as session:
        if await session.get(RefreshPause, 1) is not None:
            return Gate.OPEN  # paused by an operator: no probe either
        breaker = await session.get(AppBreaker, client_id)
        if breaker is None:
            return Gate.CLOSED
        # Only one caller wins the probe: the conditional UPDATE moves probe_after on.
        won = await session.execute(
            update(AppBreaker)
            .where(AppBreaker.client_id == client_id, AppBreaker.probe_after <= now)
            .values(probe_after=now + timedelta(seconds=probe_seconds))
        )
        return Gate.PROBE if won.rowcount else Gate.OPEN  # type: ignore[attr-defined]


async def trip(
    sessions: async_sessionmaker[AsyncSession],
    client_id: str,
    reason: str,
    now: datetime,
    probe_seconds: int,
) -> None:
    async with transaction(sessions) as session:
        await session.execute(
            insert(AppBreaker)
            .values(
                client_id=client_id,
                reason=reason,
                tripped_at=now,
                probe_after=now + timedelta(seconds=probe_seconds),
            )
            .on_conflict_do_update(
                index_elements=[AppBreaker.client_id],
                set_={"reason": reason, "probe_after": now + timedelta(seconds=probe_seconds)},
            )
        )
    log.error("breaker.tripped", extra={"fields": {"client_id": client_id, "reason": reason}})


async def close(sessions: async_sessionmaker[AsyncSession], client_id: str | None = None) -> int:
    async with transaction(sessions) as session:
        stmt = delete(AppBreaker)
        if client_id is not None:
            stmt = stmt.where(AppBreaker.client_id == client_id)
        closed = (await session.execute(stmt)).rowcount  # type: ignore[attr-defined]
    if closed:
        log.warning("breaker.closed", extra={"fields": {"client_id": client_id or "*"}})
    return int(closed)


async def open_breakers(session: AsyncSession) -> list[AppBreaker]:
    return list(await session.scalars(select(AppBreaker)))


async def pause(
    sessions: async_sessionmaker[AsyncSession], now: datetime, by: str, reason: str | None
) -> bool:
    """Pause all refreshing on every process; False when it was already paused."""
    async with transaction(sessions) as session:
        result = await session.execute(
            insert(RefreshPause)
            .values(id=1, paused_at=now, paused_by=by, reason=reason)
            .on_conflict_do_nothing()
        )
    paused = bool(result.rowcount)  # type: ignore[attr-defined]
    if paused:
        log.warning("refresh.paused", extra={"fields": {"by": by, "reason": reason}})
    return paused


async def resume(sessions: async_sessionmaker[AsyncSession]) -> bool:
    async with transaction(sessions) as session:
        result = await session.execute(delete(RefreshPause))
    resumed = bool(result.rowcount)  # type: ignore[attr-defined]
    if resumed:
        log.warning("refresh.resumed", extra={"fields": {}})
    return resumed


async def current_pause(session: AsyncSession) -> RefreshPause | None:
    return await session.get(RefreshPause, 1)


class Burst:
    """Counts `invalid_grant` per application in a sliding window (per process)."""

    def __init__(self, threshold: int, window_seconds: int) -> None:
        self.threshold = threshold
        self.window = timedelta(seconds=window_seconds)
        self.seen: dict[str, deque[datetime]] = {}

    def add(self, client_id: str, now: datetime) -> bool:
        """Record one; True when the window now holds `threshold` of them."""
        times = self.seen.setdefault(client_id, deque())
        times.append(now)
        while times and times[0] <= now - self.window:
            times.popleft()
        return len(times) >= self.threshold
