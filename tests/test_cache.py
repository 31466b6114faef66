"""The token cache: served from memory, and never stale for more than a second on any replica."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from service.core import db
from service.core.config import Settings
from service.core.domain import KeyView, SellerView
from service.core.runtime import Runtime
from service.main import create_app
from service.serving import apikeys
from service.serving import cache as cache_module
from service.serving.cache import Cache
from tests.support import (
    Broker,
    Loopback,
    SellerBrowser,
    Simulator,
    bound_socket,
    create_api_key,
    seed_sellers,
    wait_until,
)
from tests.support.processes import env_for, run_cli
from tests.test_fast_path import scope

STALE_BOUND = 1.0  # seconds: the promise


NOW = datetime.now(UTC)


def view(seller_id: str = "s-1", version: int = 1, status: str = "linked") -> SellerView:
    now = NOW
    return SellerView(
        seller_id=seller_id,
        client_id="app",
        version=version,
        status=status,
        status_reason=None,
        expires_at=now + timedelta(days=1),
        refresh_failures=0,
        last_refreshed_at=None,
        attempt_sent_at=None,
        lease_until=None,
        mp_user_id=1,
        live_mode=True,
        scope=None,
        access_token=f"token-v{version}",
        body=b"{}",
    )


def key_view(revoked: bool = False) -> KeyView:
    return KeyView(
        id="k-1",
        name="billing",
        prefix="0a1b2c3d",
        digest="0" * 64,
        scopes=("tokens:read",),
        namespace=None,
        client_ids=None,
        revoked=revoked,
    )


def live_cache(size: int = 100) -> Cache:
    cache = Cache(size)
    cache.live = True
    return cache


def test_a_load_that_began_before_a_notification_is_not_stored() -> None:
    cache = live_cache()
    begun = cache.begin()  # a slow reader starts
    cache.notified("s:2:s-1")  # meanwhile the row changed
    cache.store_seller(view(version=1), begun)  # what the slow reader saw
    assert cache.seller("s-1") is None
    cache.store_seller(view(version=2), cache.begin())
    assert cache.seller("s-1") == view(version=2)


def test_a_notification_drops_older_and_equal_versions_but_not_a_newer_entry() -> None:
    cache = live_cache()
    cache.store_seller(view(version=3), cache.begin())
    cache.notified("s:2:s-1")  # late news about an older pair
    assert cache.seller("s-1") is not None
    cache.notified("s:3:s-1")  # same version, new status (relink_required, say)
    assert cache.seller("s-1") is None
    cache.store_seller(view(version=4), cache.begin())
    cache.store_seller(view(version=3), cache.begin())  # an older read never wins
    assert cache.seller("s-1") == view(version=4)


def test_nothing_is_served_or_stored_while_the_listener_is_down_and_it_is_bounded() -> None:
    cache = live_cache(size=2)
    for n in range(3):
        cache.store_seller(view(f"s-{n}"), cache.begin())
        cache.store_seller(view(f"s-{n}"), cache.begin())  # its second miss: admitted when full
    assert [cache.seller(f"s-{n}") is not None for n in range(3)] == [False, True, True]
    begun = cache.begin()
    cache.live = False
    cache.flush()
    assert cache.seller("s-2") is None
    cache.store_seller(view("s-9"), begun)
    cache.live = True
    cache.store_seller(view("s-9"), begun)  # began before the flush: may be stale
    assert cache.seller("s-9") is None
    assert Cache(0).seller("s-1") is None


def test_when_full_a_seller_displaces_another_only_on_its_second_miss() -> None:
    cache = live_cache(size=2)
    cache.store_seller(view("s-0"), cache.begin())
    cache.store_seller(view("s-1"), cache.begin())  # room: in on the first miss
    assert cache.seller("s-0") is not None  # read: s-1 is now the least recently read
    cache.store_seller(view("s-2"), cache.begin())  # full: a first miss changes nothing
    assert list(cache.sellers) == ["s-1", "s-0"]
    cache.store_seller(view("s-2"), cache.begin())  # the second: in, for the least read
    assert list(cache.sellers) == ["s-0", "s-2"]
    # A newer version of a cached seller is never held at the door.
    cache.store_seller(view("s-2", version=2), cache.begin())
    assert cache.seller("s-2") == view("s-2", version=2)
    # The door remembers at most one cache's worth of first misses.
    for n in range(3, 8):
        cache.store_seller(view(f"s-{n}"), cache.begin())
        assert len(cache.seen) <= cache.size
    assert list(cache.sellers) == ["s-0", "s-2"]


def test_a_key_is_never_served_or_stored_while_the_listener_is_down_whatever_the_size() -> None:
    cache = live_cache(size=0)  # keys are cached whatever the token cache's size
    cache.store_key(key_view(), cache.begin())
    assert cache.key("0a1b2c3d") == key_view()
    begun = cache.begin()  # a slow key lookup starts
    cache.live = False
    cache.flush()  # what the listener does when its connection drops
    assert cache.key("0a1b2c3d") is None
    cache.store_key(key_view(), begun)
    assert cache.keys == {}
    cache.live = True
    cache.flush()  # and again once it listens again
    cache.store_key(key_view(), begun)  # read before the drop: may predate a revocation
    assert cache.key("0a1b2c3d") is None
    cache.notified("k:0a1b2c3d")  # a revocation heard while live
    cache.store_key(key_view(revoked=True), cache.begin())
    assert cache.key("0a1b2c3d") == key_view(revoked=True)


class CountingDatabase:
    """Counts every session and connection the runtime opens while in the `with` block."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.opened = 0
        self.sessions, self.autocommit, self.direct = (
            runtime.db.sessions,
            runtime.db.autocommit,
            runtime.db.direct,
        )

    def __enter__(self) -> CountingDatabase:
        counter = self

        class Engine:
            def connect(self) -> Any:
                counter.opened += 1
                return counter.autocommit.connect()

        class Pool:
            def acquire(self, **kwargs: Any) -> Any:
                counter.opened += 1
                return counter.direct.acquire(**kwargs)

        def sessions(*args: Any, **kwargs: Any) -> Any:
            self.opened += 1
            return self.sessions(*args, **kwargs)

        self.runtime.db.sessions = sessions  # type: ignore[assignment]
        self.runtime.db.autocommit = Engine()  # type: ignore[assignment]
        self.runtime.db.direct = Pool()
        return self

    def __exit__(self, *exc: object) -> None:
        self.runtime.db.sessions, self.runtime.db.autocommit = self.sessions, self.autocommit
        self.runtime.db.direct = self.direct


@asynccontextmanager
async def replica(
    settings: Settings, database_url: str, api_key: str
) -> AsyncIterator[tuple[httpx.AsyncClient, Runtime]]:
    """Another API process on the same database (in this event loop, over real HTTP)."""
    app = create_app(settings, database_url=database_url)
    async with (
        Loopback(app, bound_socket()) as server,
        httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {api_key}"}
        ) as http,
    ):
        runtime: Runtime = app.state.runtime
        await wait_until(_live(runtime), "the replica listens", 10)
        yield http, runtime


def _live(runtime: Runtime) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return runtime.cache.live

    return check


async def token_of(http: httpx.AsyncClient, seller_id: str) -> tuple[int, str | None]:
    reply = await http.get(f"/sellers/{seller_id}/token")
    return reply.status_code, reply.json().get("access_token")


async def test_cached_reads_open_no_database_session(broker: Broker) -> None:
    runtime: Runtime = broker.app.state.runtime
    await wait_until(_live(runtime), "the broker listens", 10)
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link("seller-1"), user_id=11)
    first = await broker.token("seller-1")  # loads the key and the seller
    with CountingDatabase(runtime) as counting:
        replies = [await broker.token("seller-1") for _ in range(50)]
    assert {r.status_code for r in replies} == {200}
    assert {r.content for r in replies} == {first.content}
    assert counting.opened == 0


async def test_a_refresh_or_unlink_on_one_replica_stops_the_old_token_on_another_within_a_second(
    broker: Broker, settings: Settings, database_url: str, simulator: Simulator
) -> None:
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link("seller-1"), user_id=11)
    async with replica(settings, database_url, broker.api_key) as (other, _):
        code, old = await token_of(other, "seller-1")
        assert code == 200
        assert await token_of(other, "seller-1") == (200, old)  # now from its memory

        assert await broker.refresher.refresh("seller-1") == "refreshed"
        new = (await broker.token("seller-1")).json()["access_token"]
        assert new != old

        async def serves_new() -> bool:
            return await token_of(other, "seller-1") == (200, new)

        took = await wait_until(serves_new, "the other replica serves the new token", 5)
        assert took < STALE_BOUND

        assert (await broker.http.delete("/sellers/seller-1")).status_code == 200

        async def gone() -> bool:
            return (await token_of(other, "seller-1"))[0] == 404

        assert await wait_until(gone, "the unlinked seller is gone", 5) < STALE_BOUND


def prefix_of(key: str) -> str:
    return key.split("_", 2)[1]


async def status_with(http: httpx.AsyncClient, key: str) -> int:
    reply = await http.get("/sellers/nobody/token", headers={"Authorization": f"Bearer {key}"})
    return reply.status_code


async def revoke_in_process(database_url: str, key: str) -> None:
    """`broker api-keys revoke`'s own code, committed here so the clock starts at the commit."""
    engine = db.make_engine(database_url, "tests", pool_size=1)
    try:
        async with db.transaction(db.make_sessionmaker(engine)) as session:
            assert await apikeys.revoke(session, prefix_of(key), datetime.now(UTC))
    finally:
        await engine.dispose()


async def test_a_revoked_key_fails_on_every_replica_within_a_second_of_its_commit(
    broker: Broker, settings: Settings, database_url: str
) -> None:
    by_cli, timed = [await create_api_key(database_url, ("tokens:read",)) for _ in range(2)]
    async with replica(settings, database_url, by_cli) as (other, runtime):
        for key in (by_cli, timed):
            assert await status_with(other, key) == 404
            assert runtime.cache.key(prefix_of(key)) is not None  # from memory from now on
        env = env_for(settings, database_url)
        code, _, _ = await run_cli("api-keys", "revoke", prefix_of(by_cli), env=env)
        assert code == 0

        def refused(key: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return await status_with(other, key) == 401

            return check

        assert await wait_until(refused(by_cli), "the CLI-revoked key", 5) < STALE_BOUND
        assert await status_with(other, timed) == 404  # only the revoked key went

        await revoke_in_process(database_url, timed)
        took = await wait_until(refused(timed), "the revoked key is refused", 5)
        assert took < STALE_BOUND  # measured from the revoking commit
        cached = runtime.cache.key(prefix_of(timed))
        assert cached is None or cached.revoked  # remembered, if at all, as revoked


async def test_a_key_revoked_while_the_listener_was_cut_off_is_refused_then_and_after(
    broker: Broker, settings: Settings, database_url: str, sql: asyncpg.Connection
) -> None:
    key = await create_api_key(database_url, ("tokens:read",))
    async with replica(settings, database_url, key) as (other, runtime):
        assert await status_with(other, key) == 404
        assert runtime.cache.key(prefix_of(key)) is not None
        # Drop the LISTEN connections server side and wait until they are gone: a revocation
        # committed now reaches no listener (unless one is back, and then it hears it).
        pids = await sql.fetchval(
            "SELECT array_agg(pid) FROM pg_stat_activity "
            "WHERE application_name = 'broker-cache' AND datname = current_database()"
        )
        assert len(pids) >= 1
        await sql.execute("SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid", pids)

        async def gone() -> bool:
            alive = "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])"
            left: int = await sql.fetchval(alive, pids)
            return left == 0

        await wait_until(gone, "the listening backends exit", 5)
        await revoke_in_process(database_url, key)

        async def refused() -> bool:
            return await status_with(other, key) == 401

        assert await wait_until(refused, "the key, despite the lost notice", 5) < STALE_BOUND
        await wait_until(_live(runtime), "the listener is back", 10)
        for _ in range(3):  # served from memory again: still refused
            assert await status_with(other, key) == 401


async def test_a_dropped_listening_connection_bypasses_the_cache_at_once_not_at_the_next_ping(
    database_url: str, sql: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No ping during this test: only the dropped connection itself can stop the cache.
    monkeypatch.setattr(cache_module, "PING_SECONDS", 60.0)
    cache, stop = Cache(10), asyncio.Event()
    listening = asyncio.create_task(cache.listen(database_url, stop))
    try:
        await wait_until(lambda: _true(cache.live), "the cache listens", 10)
        cache.store_key(key_view(), cache.begin())
        cache.store_seller(view(), cache.begin())
        pid = await sql.fetchval(
            "SELECT pid FROM pg_stat_activity "
            "WHERE application_name = 'broker-cache' AND datname = current_database()"
        )
        assert await sql.fetchval("SELECT pg_terminate_backend($1)", pid)

        async def bypassed() -> bool:
            return cache.key("0a1b2c3d") is None and cache.seller("s-1") is None

        await wait_until(bypassed, "nothing is served from memory", STALE_BOUND)
        assert cache.keys == {}
        assert not cache.sellers

        async def relistening() -> bool:
            query = (
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'broker-cache' "
                "AND datname = current_database() AND pid <> $1"
            )
            listeners: int = await sql.fetchval(query, pid)
            return cache.live and listeners == 1

        await wait_until(relistening, "a new listening connection", 10)
    finally:
        stop.set()
        await listening
    assert not cache.live


async def _true(value: bool) -> bool:
    return value


async def test_a_change_made_while_the_listener_was_cut_off_is_never_served_stale(
    broker: Broker, settings: Settings, database_url: str, sql: asyncpg.Connection
) -> None:
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link("seller-1"), user_id=11)
    async with replica(settings, database_url, broker.api_key) as (other, runtime):
        _, old = await token_of(other, "seller-1")
        assert runtime.cache.seller("seller-1") is not None
        # Drop only the replica's LISTEN connection, server side, then change the seller
        # before it can reconnect: that notification is lost for good.
        killed = await sql.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE application_name = 'broker-cache' AND datname = current_database()"
        )
        assert killed >= 1
        assert await broker.refresher.refresh("seller-1") == "refreshed"
        new = (await broker.token("seller-1")).json()["access_token"]
        assert new != old

        async def serves_new() -> bool:
            return await token_of(other, "seller-1") == (200, new)

        assert await wait_until(serves_new, "the new token, despite the lost notice", 5) < (
            STALE_BOUND
        )
        await wait_until(_live(runtime), "the listener is back", 10)
        assert await token_of(other, "seller-1") == (200, new)


async def test_without_a_cache_every_read_goes_to_the_database(
    settings: Settings, database_url: str, simulator: Simulator, sockets: tuple[socket.socket, ...]
) -> None:
    uncached = settings.model_copy(update={"broker_token_cache_size": 0})
    app = create_app(uncached, database_url=database_url)
    key = await create_api_key(database_url)
    async with (
        Loopback(app, sockets[0]) as server,
        httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as http,
    ):
        runtime: Runtime = app.state.runtime
        await wait_until(_live(runtime), "the broker listens (API keys are cached)", 10)
        assert (await http.get("/sellers/nobody/token")).status_code == 404
        with CountingDatabase(runtime) as counting:
            for _ in range(5):
                assert (await http.get("/sellers/nobody/token")).status_code == 404
        assert counting.opened >= 5  # the seller, every time (the key from memory)


async def test_reads_that_miss_together_are_read_together(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    """Forty reads of forty uncached sellers arriving in one turn of the event loop (as a
    busy server's sockets deliver them): one statement on one connection, not forty."""
    runtime: Runtime = broker.app.state.runtime
    await wait_until(_live(runtime), "the broker listens", 10)
    sellers = await seed_sellers(sql, simulator, broker.settings, 40, expires_in=3600, due=False)
    assert (await broker.token("nobody")).status_code == 404  # the key, cached
    authorization = f"Bearer {broker.api_key}".encode()

    async def read(seller_id: str) -> dict[str, Any]:
        sent: list[MutableMapping[str, Any]] = []

        async def send(message: MutableMapping[str, Any]) -> None:
            sent.append(message)

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        request = scope(f"/sellers/{seller_id}/token", headers=((b"authorization", authorization),))
        await broker.app(request, receive, send)
        return {"status": sent[0]["status"], "body": json.loads(sent[1]["body"])}

    with CountingDatabase(runtime) as counting:
        replies = await asyncio.gather(*(read(s) for s in sellers))
    assert [r["status"] for r in replies] == [200] * len(sellers)
    assert len({r["body"]["access_token"] for r in replies}) == len(sellers)  # each its own
    assert counting.opened == 1
