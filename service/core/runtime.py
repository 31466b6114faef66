"""The process-wide objects of one broker process, built at start-up and closed at shutdown.

They come in parts, and each flow is handed the parts it uses: `Database` (sessions for
ordinary work, a plain asyncpg pool for the hot statements), `Upstream` (the applications'
credentials and the Mercado Pago client), `Tasks` (work the process owns, not a request).
`Runtime` is the API process's composition of them; `service/ops/background.py` runs the
loops and the one shutdown of both kinds of process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
import httpx
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.core import db, keys, keyservice, logs
from service.core.applications import Applications
from service.core.config import Settings
from service.core.crypto import Keyring
from service.core.mercadopago import MercadoPagoClient
from service.lifecycle.audit import ReadCounter
from service.serving.cache import Cache
from service.serving.limits import Buckets

log = logging.getLogger("broker")

Clock = Callable[[], datetime]
UPSTREAM_SHARD = 8  # refreshes in flight per upstream connection pool (see MercadoPagoClient)
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass
class Database:
    url: str
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    # Single reads of the hot path: one round trip, no BEGIN/ROLLBACK around it (same pool).
    autocommit: AsyncEngine
    # The hot statements (cold token reads, refresh claims and stores) on plain asyncpg.
    direct: asyncpg.Pool

    @classmethod
    async def open(cls, settings: Settings, url: str, application_name: str) -> Database:
        # Claims, stores and cold reads go through `direct`; the engine carries the rest
        # (links, admin, failures, events), so its pool no longer grows with the concurrency.
        engine = db.make_engine(url, application_name)
        return cls(
            url=url,
            engine=engine,
            sessions=db.make_sessionmaker(engine),
            autocommit=engine.execution_options(isolation_level="AUTOCOMMIT"),
            direct=await db.direct_pool(
                url, application_name, settings.broker_db_direct_connections
            ),
        )

    async def close(self, seconds: float) -> None:
        """Close both pools; a statement still running after `seconds` is cut off."""
        await self.engine.dispose()
        try:  # close waits for connections in use
            await asyncio.wait_for(self.direct.close(), max(seconds, 0.1))
        except TimeoutError:
            self.direct.terminate()


@dataclass
class Upstream:
    """The Mercado Pago applications and the client that calls them."""

    apps: Applications
    mercadopago: MercadoPagoClient

    @classmethod
    def open(
        cls, settings: Settings, clock: Clock, transport: httpx.AsyncBaseTransport | None
    ) -> Upstream:
        # About 8 connections per pool at full refresh concurrency. No httpx timeout: each
        # call runs under one asyncio deadline (MP_TIMEOUT_SECONDS, see mercadopago.py).
        pools: list[httpx.AsyncBaseTransport] = (
            [transport]
            if transport is not None
            else [
                httpx.AsyncHTTPTransport()
                for _ in range(max(1, settings.broker_refresh_concurrency // UPSTREAM_SHARD))
            ]
        )
        return cls(settings.apps, MercadoPagoClient(pools, settings.mp_timeout_seconds, clock))

    async def close(self) -> None:
        await self.mercadopago.aclose()


def proxy_pools(settings: Settings) -> list[httpx.AsyncBaseTransport]:
    """The proxy's connection pools to Mercado Pago: its own, so that callers' traffic never
    holds up a refresh, of UPSTREAM_SHARD connections each (see MercadoPagoClient). No retries
    (a POST may have been honoured); the deadline is the proxy's."""
    return [
        httpx.AsyncHTTPTransport(limits=httpx.Limits(max_connections=UPSTREAM_SHARD))
        for _ in range(-(-settings.broker_proxy_connections // UPSTREAM_SHARD))
    ]


@dataclass
class Tasks:
    """Work owned by the process, not by the request that started it."""

    running: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `work` as a task of the process, not of the caller.

        A token exchange or refresh must reach its database write even when the HTTP client
        that asked disconnects or times out; shutdown waits for these tasks.
        """
        task = asyncio.get_running_loop().create_task(work)
        self.running.add(task)
        task.add_done_callback(self.running.discard)
        return task

    async def owned(self, work: Coroutine[Any, Any, T]) -> T:
        """`spawn` and wait: cancelling the caller leaves the work running."""
        return await asyncio.shield(self.spawn(work))

    async def drain(self, seconds: float) -> int:
        """Wait up to `seconds` for owned work (an exchange or refresh may hold a reply
        Mercado Pago already sent); how many were still running after that."""
        if not self.running:
            return 0
        logs.event(log, "shutdown.draining", {"in_flight": len(self.running)})
        _, pending = await asyncio.wait(set(self.running), timeout=max(seconds, 0))
        return len(pending)


@dataclass
class Runtime:
    """What one API process holds; routes hand each flow the parts it uses."""

    settings: Settings
    clock: Clock
    db: Database
    keyring: Keyring
    upstream: Upstream
    tasks: Tasks
    http: httpx.AsyncClient  # events to internal services
    api: list[httpx.AsyncBaseTransport]  # calls to Mercado Pago's API through the proxy
    key_buckets: Buckets
    cache: Cache
    key_service: keyservice.KeyService | None  # None: BROKER_ENCRYPTION_KEYS (or dev's key)
    reads: ReadCounter
    proxied: ReadCounter  # calls through the proxy, for the audit

    @classmethod
    async def build(
        cls,
        settings: Settings,
        url: str,
        clock: Clock = utcnow,
        transport: httpx.AsyncBaseTransport | None = None,
        application_name: str = "broker-api",
    ) -> Runtime:
        database = await Database.open(settings, url, application_name)
        key_service = keyservice.from_settings(settings)
        try:
            keyring = await keys.open_keyring(
                settings, database.sessions, key_service, settings.broker_key_service_wait_seconds
            )
        except BaseException:
            if key_service is not None:
                await key_service.aclose()
            await database.close(1.0)
            raise
        return cls(
            settings=settings,
            clock=clock,
            db=database,
            keyring=keyring,
            key_service=key_service,
            upstream=Upstream.open(settings, clock, transport),
            tasks=Tasks(),
            http=httpx.AsyncClient(transport=transport, follow_redirects=False),
            api=[transport] if transport is not None else proxy_pools(settings),
            key_buckets=Buckets(
                settings.broker_rate_limit_per_key_per_second,
                burst=settings.broker_rate_limit_per_key_per_second,
            ),
            cache=Cache(settings.broker_token_cache_size),
            reads=ReadCounter(settings.apps.name_of),
            proxied=ReadCounter(settings.apps.name_of, action="proxy.call"),
        )

    async def _flush_counts(self) -> None:
        await self.reads.flush(self.db.direct)
        await self.proxied.flush(self.db.direct)

    async def close(self, seconds: float) -> None:
        """Close what the process opened, within `seconds` (the end of the shutdown budget)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        with contextlib.suppress(TimeoutError):  # counts not written are lost, not waited for
            await asyncio.wait_for(self._flush_counts(), seconds / 2)
        await self.http.aclose()
        for pool in self.api:
            await pool.aclose()
        await self.upstream.close()
        if self.key_service is not None:
            await self.key_service.aclose()
        await self.db.close(end - loop.time())
