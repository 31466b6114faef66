"""Request ids, HTTP metrics, and the health that `/readyz` reports.

`Observe` is pure ASGI (no per-request task, no body buffering): it takes the caller's
`X-Request-ID` (or makes one), puts it in every log line of the request and in the response,
and counts the request by route template and status. It writes no log line per request: the
hot path stays quiet at INFO.

Readiness: a replica that lost its database can still serve tokens it holds in memory, so a
short blip must not pull every replica out of the balancer at once. `broker_database_up` shows
the blip; `/readyz` fails only once the database has been unreachable for longer than
`BROKER_READINESS_GRACE_SECONDS`, or while the schema is behind the code, or during shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core import db, logs, metrics
from service.core.config import Settings
from service.core.keys import KeyWatch
from service.core.logs import request_id
from service.core.runtime import Clock

log = logging.getLogger("broker.observe")

REQUEST_ID_HEADER = b"x-request-id"
# What we accept from a caller: short and printable, so it cannot forge log lines.
VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:/+=-]{1,128}$")


# A request without a (valid) id gets `<process prefix><counter>`: unique, and far cheaper than
# a uuid4 per request on the hot path (ids need to be unique, not unguessable).
_PREFIX = uuid.uuid4().hex[:16]
_COUNTER = itertools.count(1)


def request_id_of(scope: Any) -> bytes:
    given = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER), None)
    return request_id_from(given)


def request_id_from(given: bytes | None) -> bytes:
    """The caller's `X-Request-ID` when it is short and printable, else a new one."""
    if given is not None and VALID_REQUEST_ID.match(given):
        return given
    return f"{_PREFIX}{next(_COUNTER):016x}".encode()


# Count one request by route template and status, and its latency: record(template, status,
# seconds). The bound method itself, not a function around it: one call less per token read.
record = metrics.REQUESTS.record


class Observe:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = request_id_of(scope)
        token = request_id.set(rid.decode())
        status = 500
        started = time.perf_counter()

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER, rid)]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            template = getattr(scope.get("route"), "path", None) or "unmatched"
            record(template, status, time.perf_counter() - started)
            request_id.reset(token)


@dataclass
class Health:
    """What `/readyz` answers from; updated by `watch`, never by a request."""

    grace_seconds: float
    schema_at_head: bool = False  # or ahead: a newer release's (db.schema_behind)
    stopping: bool = False
    database_ok_at: float = field(default_factory=time.monotonic)
    keys: KeyWatch | None = None  # with a key service (service/core/keys.py)

    @property
    def key_service(self) -> str | None:
        """Why the key service's last check failed; None when it answered (or there is none).
        Not a readiness failure: the data keys are in memory, and serving goes on."""
        return self.keys.failing if self.keys else None

    def ready(self) -> tuple[bool, str]:
        if self.stopping:
            return False, "shutting_down"
        if not self.schema_at_head:
            return False, "schema_behind"
        if time.monotonic() - self.database_ok_at > self.grace_seconds:
            return False, "database_unreachable"
        return True, "ok"


async def watch(
    health: Health,
    settings: Settings,
    clock: Clock,
    sessions: async_sessionmaker[AsyncSession],
    stop: asyncio.Event,
) -> None:
    """Checks the database every `BROKER_DB_CHECK_SECONDS`; refreshes the database gauges."""
    next_gauges = 0.0
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        up = False
        try:
            async with (
                asyncio.timeout(settings.broker_db_check_seconds),
                sessions() as session,
            ):
                revision = await db.schema_revision(session)
            health.schema_at_head = not db.schema_behind(revision)
            health.database_ok_at = time.monotonic()
            up = True
        except Exception as exc:  # noqa: BLE001 any failure to answer is "down"
            logs.event(log, "database.check_failed", {"error": type(exc).__name__}, 30)
        metrics.DATABASE_UP.set(1 if up else 0)
        if up and loop.time() >= next_gauges:
            next_gauges = loop.time() + settings.broker_metrics_db_seconds
            try:
                async with sessions() as session:
                    await metrics.collect_database_gauges(
                        session, clock(), settings.broker_expiring_soon_days, settings.apps
                    )
            except Exception as exc:  # noqa: BLE001 stale gauges must not stop the health check
                logs.event(log, "metrics.collect_failed", {"error": type(exc).__name__}, 30)
        metrics.READY.set(1 if health.ready()[0] else 0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.broker_db_check_seconds)
