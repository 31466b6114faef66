"""The database goes away under load: clean 503s, no hang, no 500, recovery by itself.

The broker reaches PostgreSQL through a loopback TCP proxy (tests/support/netproxy.py) that the test
cuts: open connections are aborted and new ones refused, as when the database host is gone.
A restart is the other face of it: every server connection dropped at once, the server back
at once (`pg_terminate_backend` on every broker connection).
"""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections import Counter
from dataclasses import dataclass, field

import asyncpg
import httpx
import pytest

from service.core.config import Settings
from service.core.db import is_database_outage
from service.main import create_app
from tests.support import (
    Loopback,
    SellerBrowser,
    Simulator,
    create_api_key,
    query_of,
    seed_sellers,
)
from tests.support.netproxy import proxied

pytestmark = pytest.mark.chaos

OUTAGE_SECONDS = 10.0  # the figure: the database unreachable for 10 s
READERS = 8


@dataclass
class Load:
    """Bounded read load: who got what, when, and how long it took."""

    http: httpx.AsyncClient
    sellers: list[str]
    replies: list[tuple[float, int, str, float]] = field(default_factory=list)  # t, status, code, s
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def reader(self) -> None:
        for _ in range(100_000):  # bounded in count as well as by `stop`
            if self.stop.is_set():
                return
            started = time.monotonic()
            reply = await self.http.get(f"/sellers/{random.choice(self.sellers)}/token")
            code = ""
            if reply.status_code != 200:
                assert reply.headers["content-type"] == "application/problem+json"
                code = reply.json()["code"]
                if reply.status_code == 503:
                    assert int(reply.headers["retry-after"]) >= 1
            self.replies.append((started, reply.status_code, code, time.monotonic() - started))
            if reply.status_code != 200:
                await asyncio.sleep(0.02)  # a polite client on a 503; keeps the log readable

    def between(self, start: float, end: float) -> list[tuple[float, int, str, float]]:
        return [r for r in self.replies if start <= r[0] < end]


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.exceptions.AdminShutdownError("terminating connection"),  # pg_terminate_backend
        asyncpg.exceptions.CannotConnectNowError("the database system is starting up"),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
        # What asyncpg says of a pooled connection whose backend was terminated while idle.
        asyncpg.exceptions.InternalClientError("cannot switch to state 12"),
        ConnectionRefusedError(),
        TimeoutError(),  # a pool acquire or a statement past its deadline
    ],
)
def test_raw_asyncpg_outages_are_503s(error: Exception) -> None:
    assert is_database_outage(error)


def test_a_bug_in_a_statement_is_not_an_outage() -> None:
    assert not is_database_outage(asyncpg.exceptions.UndefinedColumnError("no such column"))
    assert not is_database_outage(ValueError("a bug"))


@pytest.mark.parametrize(
    "settings_overrides",
    [
        {
            "broker_db_check_seconds": 0.2,
            "broker_readiness_grace_seconds": 30.0,
            "broker_rate_limit_per_key_per_second": 1_000_000,  # the readers are not throttled
        }
    ],
)
async def test_ten_seconds_without_the_database_under_read_load(
    settings: Settings,
    database_url: str,
    sql: asyncpg.Connection,
    simulator: Simulator,
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    sellers = await seed_sellers(sql, simulator, settings, 20, expires_in=86400, due=False)
    key = await create_api_key(database_url)
    async with proxied(database_url) as proxy:
        app = create_app(settings, database_url=proxy.url)
        async with (
            Loopback(app, sockets[0]) as server,
            httpx.AsyncClient(
                base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=20
            ) as http,
        ):
            load = Load(http, sellers)
            readers = [asyncio.create_task(load.reader()) for _ in range(READERS)]
            ready: list[int] = []
            await asyncio.sleep(2)  # steady load before the fault
            cut_at = time.monotonic()
            await proxy.cut()
            while time.monotonic() - cut_at < OUTAGE_SECONDS:  # the fault lasts 10 s
                ready.append((await http.get("/readyz")).status_code)
                await asyncio.sleep(0.5)
            restoring_at = time.monotonic()
            await proxy.restore()
            back_at = time.monotonic()
            await asyncio.sleep(5)  # load after the fault: the pool must recover by itself
            load.stop.set()
            await asyncio.gather(*readers)

    # Answered before the cut (a request in flight at the cut may meet it: it belongs to neither).
    before = [r for r in load.between(0, cut_at) if r[0] + r[3] < cut_at]
    # Answered while the database was away (what was in flight at the cut aside).
    during = [r for r in load.between(cut_at + 0.5, restoring_at) if r[0] + r[3] < restoring_at]
    after = load.between(back_at, float("inf"))
    statuses = Counter(status for _, status, _, _ in load.replies)
    assert {status for _, status, _, _ in before} == {200}
    assert 500 not in statuses
    assert set(statuses) <= {200, 503}
    assert {code for _, status, code, _ in load.replies if status == 503} == {
        "database_unavailable"
    }
    assert during
    assert {status for _, status, _, _ in during} == {503}  # nothing stale: cache bypassed
    assert max(seconds for *_, seconds in load.replies) < 5.0  # never a hang
    recovered_at = min(t for t, status, _, _ in after if status == 200)
    time_to_recover = recovered_at - back_at
    assert time_to_recover < 3.0
    assert {status for t, status, _, _ in after if t > recovered_at + 1} == {200}
    assert set(ready) == {200}  # a 10 s blip is within the readiness grace
    print(
        f"\ndatabase outage {OUTAGE_SECONDS:.0f} s under {READERS} readers: "
        f"{len(load.replies)} requests, {dict(statuses)}, "
        f"max latency {max(s for *_, s in load.replies):.2f} s, "
        f"first 200 after {time_to_recover:.2f} s"
    )


async def test_a_restart_drops_every_connection_and_the_pool_recovers_by_itself(
    settings: Settings,
    database_url: str,
    sql: asyncpg.Connection,
    simulator: Simulator,
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    sellers = await seed_sellers(sql, simulator, settings, 20, expires_in=86400, due=False)
    key = await create_api_key(database_url)
    uncached = settings.model_copy(  # every read hits PostgreSQL; the readers go unthrottled
        update={"broker_token_cache_size": 0, "broker_rate_limit_per_key_per_second": 1_000_000}
    )
    app = create_app(uncached, database_url=database_url)
    async with (
        Loopback(app, sockets[0]) as server,
        httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=20
        ) as http,
    ):
        load = Load(http, sellers)
        readers = [asyncio.create_task(load.reader()) for _ in range(READERS)]
        await asyncio.sleep(1)
        restarted_at = time.monotonic()
        killed = await sql.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'broker-%'"
        )
        assert killed >= 1
        await asyncio.sleep(3)
        load.stop.set()
        await asyncio.gather(*readers)
    statuses = Counter(status for _, status, _, _ in load.replies)
    assert 500 not in statuses
    assert set(statuses) <= {200, 503}
    after = load.between(restarted_at + 1, float("inf"))
    assert after
    assert {status for _, status, _, _ in after} == {200}
    print(f"\nall broker connections dropped under load: {dict(statuses)}")


async def test_a_callback_during_the_outage_fails_cleanly_and_completes_once_it_is_back(
    settings: Settings,
    database_url: str,
    sql: asyncpg.Connection,
    simulator: Simulator,
    sockets: tuple[socket.socket, socket.socket],
) -> None:
    key = await create_api_key(database_url)
    async with proxied(database_url) as proxy:
        app = create_app(settings, database_url=proxy.url)
        async with (
            Loopback(app, sockets[0]) as server,
            httpx.AsyncClient(
                base_url=server.url, headers={"Authorization": f"Bearer {key}"}
            ) as http,
            SellerBrowser() as browser,
        ):
            started = await http.post("/link/start", json={"seller_id": "seller-1"})
            callback = await browser.authorize(started.json()["link_url"], user_id=77)
            await proxy.cut()
            failed = await browser.callback(callback)
            assert failed.status_code == 503
            assert failed.headers["retry-after"]
            await proxy.restore()
            done = await browser.callback(callback)  # the seller presses reload
            assert done.status_code == 200, done.text
    assert await sql.fetchval("SELECT status FROM sellers WHERE seller_id = 'seller-1'") == "linked"
    assert await simulator.token_requests() == 1  # the code was exchanged once
    assert query_of(callback)["code"]
