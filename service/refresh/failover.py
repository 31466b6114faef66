"""After a database failover: store again the rotations the new primary may have lost.

With asynchronous replication a failover promotes a standby that may miss the last commits,
and a lost commit here can be a rotation Mercado Pago already honoured: the new pair then
exists only in the process that stored it, and the database holds a spent refresh token
without knowing. (With synchronous replication nothing acknowledged is lost, and none of this
ever finds anything to do.)

So each process keeps, for JOURNAL_SECONDS after it stored a rotation (counted while it could
see the database), the sealed pair (the
ciphertext the row holds, never a plain token) and the version it was stored over (`Journal`),
and watches which server it is talking to: `pg_postmaster_start_time()` changes with every
restart and every promotion, and needs no privilege (`Server`). On a new server, before this
process claims anything more, it stores every kept pair again, guarded by that version as the
first store was: a pair the new primary has (or one a later rotation replaced) is superseded
and nothing changes; a lost one lands again (`failover.restored`, `broker_rotations_restored`)
and its seller never notices. A restart of the same primary loses nothing; storing again then
only finds everything superseded.

What this cannot cover: a process that died with the old primary took its journal with it. Its
claims that reached the new primary still say `sent`, so its sellers are taken over and their
next attempt marks them `rotation_lost` (owners.py); a claim lost as well leaves no trace in
the database. That is what `broker sellers mark-restored` is for: the runbook
(docs/RELIABILITY.md, "Database failover") says when.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core import db, logs, metrics
from service.core.config import Settings
from service.core.runtime import Clock
from service.lifecycle import sellers

log = logging.getLogger("broker.refresh")

# Longer than any replication lag a failover would promote over (Patroni refuses a standby
# more than 1 MB of WAL behind by default, well under a second of the broker's writes; a lag
# alert fires at seconds). A standby further behind is a restore: the restore runbook.
JOURNAL_SECONDS = 60.0
# 1,000 refreshes a second for the whole window; about 720 bytes each (the two sealed tokens
# and their row's fields): 43 MB at the very most, 17 MB at a 400/s rate cap.
JOURNAL_CAP = 60_000
WATCH_SECONDS = 1.0
SERVER = "SELECT pg_postmaster_start_time()"


@dataclass(frozen=True)
class Kept:
    seller_id: str
    application: str
    version: int  # the version the pair was stored over
    pair: sellers.Pair
    at: float  # time.monotonic() of the store


class Journal:
    """The rotations this process stored lately, oldest first, bounded in time and count."""

    def __init__(self) -> None:
        self.kept: deque[Kept] = deque(maxlen=JOURNAL_CAP)
        # When a check last saw the same server: a store JOURNAL_SECONDS older than that had
        # replicated before any failover (while the database is away, nothing is forgotten).
        self.confirmed_at = time.monotonic()

    def keep(self, seller_id: str, application: str, version: int, pair: sellers.Pair) -> None:
        while self.kept and self.kept[0].at < self.confirmed_at - JOURNAL_SECONDS:
            self.kept.popleft()
        self.kept.append(Kept(seller_id, application, version, pair, time.monotonic()))

    def take(self) -> list[Kept]:
        taken = list(self.kept)
        self.kept.clear()
        return taken


class Failover:
    """This process's watch on its database server, and the journal it stores again."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        sessions: async_sessionmaker[AsyncSession],
        pool: asyncpg.Pool,
    ) -> None:
        self.settings, self.clock, self.sessions, self.pool = settings, clock, sessions, pool
        self.journal = Journal()
        self.server: datetime | None = None  # the server's start time when last seen
        self.checking = asyncio.Lock()

    async def check(self, connection: asyncpg.Connection) -> int:
        """Before a claim (on its connection), and every WATCH_SECONDS: on a new server, store
        the journal again first. How many rotations that restored."""
        async with self.checking:  # a claim waits while the journal is being stored again
            server = await connection.fetchval(SERVER)
            if self.server is None or server == self.server:
                self.server = server
                self.journal.confirmed_at = time.monotonic()
                return 0
            previous, self.server = self.server, server
            kept = self.journal.take()
            logs.event(
                log,
                "failover.new_server",
                {"started": server.isoformat(), "was": previous.isoformat(), "kept": len(kept)},
                logging.WARNING,
            )
            try:
                return await self._restore(connection, kept)
            except BaseException:
                self.server = previous  # not done: the next check starts over
                self.journal.kept.extendleft(reversed(kept))
                raise

    async def _restore(self, connection: asyncpg.Connection, kept: list[Kept]) -> int:
        restored = 0
        for entry in kept:
            now = self.clock()
            if not await sellers.store_refreshed_healthy(
                connection, entry.seller_id, entry.version, entry.pair, now, entry.application
            ):
                stored = await sellers.store_refreshed(
                    self.sessions, self.settings, now, entry.seller_id, entry.version, entry.pair
                )
                if stored == sellers.Stored.SUPERSEDED:
                    continue  # the new primary has it, or something newer
            restored += 1
            metrics.ROTATIONS_RESTORED.inc()
            fields = {"seller_id": entry.seller_id, "version": entry.version + 1}
            logs.event(log, "failover.restored", fields, logging.WARNING)
        if kept:
            logs.event(log, "failover.checked", {"kept": len(kept), "restored": restored})
        return restored

    async def watch(self, stop: asyncio.Event) -> None:
        """Check every WATCH_SECONDS until `stop` (a process that claims nothing for a while
        still stores its journal again soon after a failover)."""
        while not stop.is_set():
            try:
                async with db.direct(self.pool) as connection:
                    await self.check(connection)
            except Exception as exc:  # noqa: BLE001 the database is away: check again soon
                if not db.is_database_outage(exc):
                    logs.event(log, "failover.check_failed", {"error": type(exc).__name__}, 40)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), WATCH_SECONDS)
