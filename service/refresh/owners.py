"""Whether a lease's owner is alive, and taking over the leases of one that is not.

A lease alone cannot tell a dead owner from a slow one, so it has to outlive both: a crashed
process's sellers waited out its lease and then the late-reply grace (`sql.free`), two minutes at
the default settings, before anyone refreshed them again. The database can tell them apart: every
process that claims leases (a `broker serve` replica refreshing on read, a `broker refresher`)
holds, on a connection of its own, the session advisory lock `hashtextextended(owner, 0)` for as
long as it lives (`Liveness`), and claims nothing without it. PostgreSQL drops that lock the moment
the session ends: a process killed with SIGKILL (the kernel closes its socket), a backend
terminated, a host gone silent (once the server's TCP keepalive gives up: `tcp_keepalives_idle` and
friends, hours by the OS's defaults). A process that is alive but slow (paused, swapping, its event
loop stuck) keeps its connection, so its lock, so every protection its leases have today: nobody
sends for its sellers until its lease and the grace after it have run, as before.

Every refresher looks, once a second, for owners of leases whose lock nobody holds (`Takeover`).
One found absent in every look for ABSENT_SECONDS is dead: its leases are freed at once and its
sellers made due, their attempts still marked sent, so the next attempt tells a rotation the dead
owner lost (`invalid_grant` for the same token: `rotation_lost`) from a request that never left.
A kill is taken over within about ABSENT_SECONDS + two looks (7 s), not two minutes.

Why ABSENT_SECONDS and not at once: a database restart or failover drops every lock, live
owners' too. A live owner takes its lock again as soon as the database answers (`Liveness.watch`
retries within RELOCK_SECONDS, and a claim first takes it), while a looker counts only looks
that succeeded, from its first one after the database came back, and starts over after any
failed look: the owner is locked again long before a looker could call it dead. An owner whose
own lock connection fails alone stops claiming until it has the lock again; if that takes it
longer than ABSENT_SECONDS, its leases are taken over while its requests may still be out: the
second send then gets `invalid_grant` (the seller is marked `rotation_lost`), and the owner's
late store still lands over it (`recovered`), never a silent loss. The lock needs a session
that stays with its process: a direct connection, not a transaction-pooling PgBouncer (as the
cache's LISTEN).

Only owners whose name says they lock (`LOCKING`, which `owner_name` appends) are ever taken
over: a release before owner locks, running beside this one in a rolling upgrade, holds no
lock, and its leases keep the lease and the grace alone, as that release expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import (
    ColumnExpressionArgument,
    DateTime,
    Text,
    all_,
    bindparam,
    case,
    func,
    literal_column,
    null,
    select,
    update,
)
from sqlalchemy.sql.elements import ColumnElement

from service.core import db, logs, metrics
from service.core.db import Hot, const
from service.core.domain import Status
from service.core.models import Seller
from service.core.runtime import Clock

log = logging.getLogger("broker.refresh")

ABSENT_SECONDS = 5.0  # an owner missing from every look for this long is dead
LOOK_SECONDS = 1.0  # how often a refresher looks for dead owners
PING_SECONDS = 1.0  # how often a live owner checks its lock connection
PING_TIMEOUT_SECONDS = 2.0
RELOCK_SECONDS = (0.1, 0.25, 0.5, 1.0)  # an owner without its lock tries again after these
CONNECT_TIMEOUT_SECONDS = 5.0
CLOSE_TIMEOUT_SECONDS = 1.0  # of the shutdown budget; then the socket is just dropped

# How the name of an owner that holds an owner lock ends. A release before owner locks
# named its owners without it and never held one: its leases (a rolling upgrade runs both
# side by side) keep the lease and the grace alone, and are never taken over.
LOCKING = "+lock"

# The key of every advisory lock held in this database (pg_locks shows the whole cluster's), as
# pg_locks shows a bigint key: its high and low halves. One InitPlan per statement, never a
# scan of pg_locks per row.
_HELD: ColumnElement[Any] = literal_column(
    "ARRAY(SELECT (classid::bigint << 32) | objid::bigint FROM pg_locks"
    " WHERE locktype = 'advisory' AND objsubid = 1 AND granted"
    " AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
)
TAKE_LOCK = "SELECT pg_try_advisory_lock(hashtextextended($1, 0))"


def _unlocked(owner: ColumnExpressionArgument[Any]) -> ColumnElement[bool]:
    return func.hashtextextended(owner, literal_column("0")) != all_(_HELD)


# Owners of leases whose lock nobody holds (on the partial index of leased sellers).
ABSENT = Hot.compile(
    "absent_owners",
    select(Seller.lease_owner)
    .distinct()
    .where(
        Seller.lease_owner.is_not(None),
        Seller.lease_owner.like(const(f"%{LOCKING}")),
        _unlocked(Seller.lease_owner),
    ),
)
# A dead owner's leases, freed only if it is still absent now; its linked sellers due at once.
_OWNER = bindparam("owner", type_=Text())
_NOW = bindparam("now", type_=DateTime(timezone=True))
TAKE_OVER = Hot.compile(
    "take_over",
    update(Seller)
    .where(Seller.lease_owner == _OWNER, _unlocked(_OWNER))
    .values(
        lease_owner=null(),
        lease_until=null(),
        next_refresh_at=case(
            (
                Seller.status == const(Status.LINKED),
                func.least(func.coalesce(Seller.next_refresh_at, _NOW), _NOW),
            ),
            else_=Seller.next_refresh_at,
        ),
    ),
)


def owner_name() -> str:
    """A new owner's name: unique per process (and per `Refresher.replica` in tests)."""
    host, pid, nonce = socket.gethostname()[:32], os.getpid(), uuid.uuid4().hex[:8]
    return f"{host}:{pid}:{nonce}{LOCKING}"  # at most 54 characters: lease_owner holds 64


class Liveness:
    """This process's owner lock: held on its own connection for as long as the process lives."""

    def __init__(self, owner: str, url: str) -> None:
        self.owner, self.url = owner, url
        self.connection: Any = None
        self.taking = asyncio.Lock()

    @property
    def held(self) -> bool:
        # asyncpg marks a connection closed as soon as it sees it end (a restart, a reset).
        return self.connection is not None and not self.connection.is_closed()

    async def ensure(self) -> None:
        """Hold the lock, taking it first if needed; raises when the database cannot be
        reached (then nothing can be claimed either)."""
        if self.held:
            return
        async with self.taking:
            if self.held:
                return
            self._drop()
            connection = await asyncpg.connect(
                **db.asyncpg_params(self.url, "broker-owner"), timeout=CONNECT_TIMEOUT_SECONDS
            )
            try:
                taken = await connection.fetchval(
                    TAKE_LOCK, self.owner, timeout=CONNECT_TIMEOUT_SECONDS
                )
            except BaseException:
                connection.terminate()
                raise
            if not taken:  # only a session of this same owner could hold it: not yet ended
                connection.terminate()
                raise RuntimeError("owner lock held by another session")
            self.connection = connection
            logs.event(log, "owner.locked", {"owner": self.owner})

    async def watch(self, stop: asyncio.Event) -> None:
        """Keep the lock until `stop`: take it again as soon as the database answers."""
        failures = 0
        while not stop.is_set():
            try:
                await self.ensure()
                await self.connection.fetchval("SELECT 1", timeout=PING_TIMEOUT_SECONDS)
                failures, pause = 0, PING_SECONDS
            except Exception as exc:  # noqa: BLE001 any failure: no lock, take it again
                if self.connection is not None:
                    logs.event(log, "owner.lock_lost", {"error": type(exc).__name__}, 30)
                self._drop()
                failures += 1
                pause = RELOCK_SECONDS[min(failures, len(RELOCK_SECONDS)) - 1]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)

    def _drop(self) -> None:
        if self.connection is not None:
            self.connection.terminate()
            self.connection = None

    async def close(self) -> None:
        """Let the lock go (the process is leaving): its remaining leases can be taken over."""
        connection, self.connection = self.connection, None
        if connection is not None and not connection.is_closed():
            try:
                await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT_SECONDS)
            except Exception:  # noqa: BLE001 closing anyway
                connection.terminate()


class Takeover:
    """One refresher's look for dead owners: absent in every look for ABSENT_SECONDS."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        monotonic: Callable[[], float] = time.monotonic,
        freed: Callable[[], None] = lambda: None,
    ) -> None:
        self.pool, self.monotonic, self.freed = pool, monotonic, freed
        self.absent_since: dict[str, float] = {}  # owner -> when it was first found absent
        self.failing = False  # the last look failed (said once, not every second)

    async def run(self, clock: Clock, stop: asyncio.Event) -> None:
        """Look every LOOK_SECONDS until `stop`."""
        while not stop.is_set():
            await self.look(clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), LOOK_SECONDS)

    async def look(self, now: datetime) -> int:
        """Take over the leases of the owners found dead; how many leases that freed."""
        try:
            async with db.direct(self.pool) as connection:
                absent = {row[0] for row in await connection.fetch(ABSENT.sql)}
                seen_at = self.monotonic()
                self.absent_since = {
                    owner: self.absent_since.get(owner, seen_at) for owner in absent
                }
                dead = [
                    owner
                    for owner, since in self.absent_since.items()
                    if seen_at - since >= ABSENT_SECONDS
                ]
                freed = 0
                for owner in dead:
                    status = await connection.execute(
                        TAKE_OVER.sql, *TAKE_OVER.args(owner=owner, now=now)
                    )
                    del self.absent_since[owner]
                    if leases := int(status.split()[-1]):  # none: its stores freed them
                        freed += leases
                        metrics.LEASES_TAKEN_OVER.inc(leases)
                        fields = {"owner": owner, "leases": leases}
                        logs.event(log, "refresher.owner_taken_over", fields, logging.WARNING)
        except Exception as exc:  # noqa: BLE001 a failed look vouches for nobody: count again
            self.absent_since.clear()
            if not self.failing:
                logs.event(log, "refresher.look_failed", {"error": type(exc).__name__}, 40)
            self.failing = True
            return 0
        self.failing = False
        if freed:
            self.freed()  # the refresher claims them now, not at its next poll
        return freed
