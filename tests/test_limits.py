"""Absurd requests are refused early and change nothing; callers that ask too often get 429."""

from __future__ import annotations

import asyncio
import ipaddress
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from service.core.config import Settings
from service.ops.server import BoundedHttpTools, uvicorn_config
from service.serving import apikeys
from service.serving.deps import FAILURE_FLOOR_SECONDS
from service.serving.limits import Buckets, client_address
from tests.support import Broker, SellerBrowser, assert_problem, wait_until
from tests.support.processes import api_process, free_port


async def test_an_oversized_body_is_413_and_stores_nothing(
    broker: Broker, sql: asyncpg.Connection
) -> None:
    body = {"seller_id": "s-1", "return_url": "https://platform.example/sellers/" + "x" * 20_000}
    reply = await broker.http.post("/link/start", json=body)
    assert reply.status_code == 413
    assert reply.json()["code"] == "body_too_large"
    assert await sql.fetchval("SELECT count(*) FROM links") == 0


async def test_an_oversized_chunked_body_is_stopped_while_streaming(
    broker: Broker, sql: asyncpg.Connection
) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"seller_id": "s-1", "return_url": "'
        for _ in range(40):
            yield b"x" * 1024
        yield b'"}'

    reply = await broker.http.post(
        "/link/start", content=chunks(), headers={"content-type": "application/json"}
    )
    assert reply.status_code == 413
    assert await sql.fetchval("SELECT count(*) FROM links") == 0


async def test_an_absurd_query_string_is_414(broker: Broker) -> None:
    reply = await broker.http.get("/sellers/s-1/token", params={"min_ttl": "1" * 5000})
    assert reply.status_code == 414
    assert reply.json()["code"] == "uri_too_long"


@pytest.mark.parametrize(
    "path",
    [
        "/sellers?cursor=%00",
        "/audit?seller_id=%00",
        "/audit?actor=a%00b",
        "/sellers/a%00b",
        "/sellers/a%00b/token",  # the fast path too
        "/sellers/seller-1/token%0A",  # a route's `$` matched before the newline: served
        "/sellers/seller-1%0D",
    ],
)
async def test_a_nul_anywhere_in_path_or_query_is_422_not_a_database_error(
    broker: Broker, path: str
) -> None:
    """asyncpg raises on a NUL in text (PostgreSQL stores none): it used to be a 500."""
    async with SellerBrowser() as browser:  # seller-1 exists: nothing may serve it here
        await browser.link(await broker.start_link("seller-1"))
    assert_problem(await broker.http.get(path), 422, "invalid_request")


async def test_absurd_headers_are_431(broker: Broker) -> None:
    reply = await broker.http.get("/sellers/s-1/token", headers={"x-junk": "y" * 20_000})
    assert reply.status_code == 431
    assert reply.json()["code"] == "headers_too_large"


@pytest.mark.parametrize("settings_overrides", [{"broker_rate_limit_per_address_per_minute": 3}])
async def test_seller_pages_are_rate_limited_per_address_with_retry_after(broker: Broker) -> None:
    async with SellerBrowser() as browser:
        statuses = [
            (await browser.http.get(f"{broker.url}/link/{'x' * 43}")).status_code for _ in range(5)
        ]
        limited = await browser.http.get(f"{broker.url}/oauth/callback?state=a&code=b")
    assert statuses == [404, 404, 404, 429, 429]
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1


@pytest.mark.parametrize("settings_overrides", [{"broker_rate_limit_per_key_per_second": 2}])
async def test_api_keys_are_rate_limited_per_key(broker: Broker, database_url: str) -> None:
    statuses = [(await broker.token("nobody")).status_code for _ in range(4)]
    assert statuses[:2] == [404, 404]
    assert 429 in statuses[2:]
    from tests.support import create_api_key

    other = await create_api_key(database_url)  # another key has its own budget
    async with httpx.AsyncClient(
        base_url=broker.url, headers={"Authorization": f"Bearer {other}"}
    ) as caller:
        assert (await caller.get("/sellers/nobody/token")).status_code == 404


def counted_lookups(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The prefixes the broker looks up in the database from now on, in order."""
    lookups: list[str] = []
    find = apikeys.find

    async def counted(connection: Any, prefix: str) -> Any:
        lookups.append(prefix)
        return await find(connection, prefix)

    monkeypatch.setattr(apikeys, "find", counted)
    return lookups


def _unknown_key() -> str:
    return f"Bearer mpb_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"


@pytest.mark.parametrize("settings_overrides", [{"broker_failed_auth_per_address_per_minute": 3}])
async def test_failed_authentications_are_limited_per_address_before_any_lookup(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Enumerating key prefixes costs a lookup each; after a few failures from one address the
    broker answers 429 without one (#13 finding 7). Keys already known are not slowed."""
    lookups = counted_lookups(monkeypatch)
    cache = broker.app.state.runtime.cache

    async def cache_live() -> bool:  # keys are kept in memory only while its listener is up
        return bool(cache.live)

    await wait_until(cache_live, "the key cache listens", 10)
    assert (await broker.token("nobody")).status_code == 404  # the test's own key, now cached
    lookups.clear()
    async with httpx.AsyncClient(base_url=broker.url) as prober:
        first = [
            (await prober.get("/sellers/x/token", headers={"Authorization": _unknown_key()}))
            for _ in range(3)
        ]
        assert [r.status_code for r in first] == [401, 401, 401]
        assert len(lookups) == 3
        refused = await prober.get("/sellers/x/token", headers={"Authorization": _unknown_key()})
        assert_problem(refused, 429, "rate_limited")
        assert int(refused.headers["retry-after"]) >= 1
        assert len(lookups) == 3  # no lookup for the refused one
    assert (await broker.token("nobody")).status_code == 404  # a known key is served as before


async def test_an_unknown_prefix_is_remembered_and_every_failure_takes_the_same_floor(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups = counted_lookups(monkeypatch)
    unknown = _unknown_key()
    last = "a" if broker.api_key[-1] != "a" else "b"
    known_wrong = f"Bearer {broker.api_key[:-1]}{last}"  # a known prefix, a wrong secret
    loop = asyncio.get_running_loop()
    async with httpx.AsyncClient(base_url=broker.url) as caller:
        await caller.get("/sellers/x/token", headers={"Authorization": f"Bearer {broker.api_key}"})
        lookups.clear()
        for header in (unknown, unknown, known_wrong):
            started = loop.time()
            reply = await caller.get("/sellers/x/token", headers={"Authorization": header})
            assert_problem(reply, 401, "unauthorized")
            assert loop.time() - started >= FAILURE_FLOOR_SECONDS  # a floor, whatever failed
    # The unknown prefix was looked up once, then remembered. (The known one may be looked up
    # too: the key cache serves only while its listener is connected.)
    assert lookups.count(unknown.split("_")[1]) == 1


@pytest.mark.parametrize("settings_overrides", [{"broker_rate_limit_per_key_per_second": 1}])
async def test_the_per_key_429_is_a_problem_with_retry_after(broker: Broker) -> None:
    for _ in range(20):  # bounded: a budget of 1 a second is spent within a few requests
        reply = await broker.token("nobody")
        if reply.status_code == 429:
            break
    assert_problem(reply, 429, "rate_limited")
    assert int(reply.headers["retry-after"]) >= 1


@pytest.mark.parametrize("settings_overrides", [{"broker_rate_limit_per_address_per_minute": 2}])
async def test_internal_link_starts_are_not_limited_per_address(broker: Broker) -> None:
    started = [
        (await broker.http.post("/link/start", json={"seller_id": f"s-{n}"})).status_code
        for n in range(4)
    ]
    assert started == [201] * 4
    async with SellerBrowser() as browser:  # the same address, on a seller page: limited
        pages = [
            (await browser.http.get(f"{broker.url}/link/{'x' * 43}")).status_code for _ in range(3)
        ]
    assert pages == [404, 404, 429]


@pytest.mark.parametrize(
    "settings_overrides",
    [{"broker_rate_limit_per_address_per_minute": 2, "broker_trusted_proxies": ["127.0.0.1/32"]}],
)
async def test_clients_behind_a_trusted_proxy_get_their_own_buckets_and_cannot_forge_one(
    broker: Broker,
) -> None:
    page = f"{broker.url}/link/{'x' * 43}"

    async def status(*forwarded: str) -> int:
        headers = [("x-forwarded-for", line) for line in forwarded]  # one line each
        async with httpx.AsyncClient() as client:  # the proxy: a loopback peer
            return (await client.get(page, headers=headers)).status_code

    assert [await status("198.51.100.1") for _ in range(2)] == [404, 404]
    assert await status("198.51.100.1") == 429
    assert await status("198.51.100.2") == 404  # another client, its own bucket
    assert await status("6.6.6.6, 198.51.100.1") == 429  # a forged leftmost entry
    assert await status("6.6.6.7", "198.51.100.1") == 429  # the proxy appended its own line


async def test_a_served_broker_believes_no_forwarded_for_from_an_untrusted_peer(
    settings: Settings, database_url: str, tmp_path: Path
) -> None:
    """uvicorn would take a loopback peer's X-Forwarded-For as the client by default; the
    served broker leaves that to its own reading, and trusts no proxy unless configured."""
    port = free_port()
    limited = {"BROKER_RATE_LIMIT_PER_ADDRESS_PER_MINUTE": "2"}
    async with (
        api_process(settings, database_url, port, tmp_path / "api.log", **limited),
        httpx.AsyncClient() as client,
    ):
        page = f"http://127.0.0.1:{port}/link/{'x' * 43}"
        statuses = [
            (await client.get(page, headers={"x-forwarded-for": f"198.51.100.{n}"})).status_code
            for n in range(3)
        ]
    assert statuses == [404, 404, 429]  # one peer, one bucket, whatever it claims


PROXIES = [ipaddress.ip_network("10.0.0.0/8")]


def scope(peer: str, *forwarded: str) -> dict[str, object]:
    headers = [(b"x-forwarded-for", line.encode()) for line in forwarded]
    return {"client": (peer, 1234), "headers": headers}


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("203.0.113.9", None, "203.0.113.9"),
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # an untrusted peer cannot claim others
        ("10.1.2.3", "198.51.100.1", "198.51.100.1"),  # via our proxy
        ("10.1.2.3", "6.6.6.6, 198.51.100.1", "198.51.100.1"),  # the client forged the left
        ("10.1.2.3", "198.51.100.1, 10.9.9.9", "198.51.100.1"),  # two of our proxies
    ],
)
def test_forwarded_for_counts_only_through_trusted_proxies(
    peer: str, forwarded: str | None, expected: str
) -> None:
    assert client_address(scope(peer, *([forwarded] if forwarded else [])), PROXIES) == expected


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (("6.6.6.6", "198.51.100.1"), "198.51.100.1"),  # the client's line, then our proxy's
        (("6.6.6.6, 198.51.100.1", "10.9.9.9"), "198.51.100.1"),  # two of our proxies
        (("198.51.100.1", "10.9.9.9, 10.8.8.8"), "198.51.100.1"),
    ],
)
def test_several_forwarded_for_lines_are_read_in_order_from_the_right(
    lines: tuple[str, ...], expected: str
) -> None:
    assert client_address(scope("10.1.2.3", *lines), PROXIES) == expected


def test_a_bucket_refills_at_its_rate_and_forgets_the_least_recent() -> None:
    buckets = Buckets(rate=1, burst=2, capacity=2)
    assert [buckets.take("a", now=0) for _ in range(3)] == [0, 0, 1.0]
    assert buckets.take("a", now=2) == 0
    buckets.take("b", now=2)
    buckets.take("c", now=2)
    assert "a" not in buckets.buckets
    buckets.take("b", now=3)  # read again: now the most recent
    buckets.take("d", now=3)
    assert list(buckets.buckets) == ["b", "d"]
    assert buckets.take("c", now=3) == 0  # forgotten: a full bucket again


def test_a_reservation_waits_its_turn_and_a_rate_below_one_always_waits() -> None:
    per_second = Buckets(rate=10, burst=10, capacity=1)
    assert [per_second.reserve("", 0.0) for _ in range(10)] == [0.0] * 10  # one second's burst
    assert [round(per_second.reserve("", 0.0), 6) for _ in range(2)] == [0.1, 0.2]  # in order
    slow = Buckets(rate=0.05, burst=0.05, capacity=1)
    assert round(slow.reserve("", 0.0), 6) == 19.0  # (1 - 0.05) / 0.05: never a burst of one
    assert round(slow.reserve("", 19.0), 6) == 20.0  # the next turn comes 20 s after the first


async def _closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes the connection (EOF), bounded by `limit`."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(limit):
        while await reader.read(4096):
            pass  # a 4xx the server may answer before closing
    return loop.time() - started


async def test_idle_and_slow_header_connections_are_cut_by_the_server_itself(
    settings: Settings, database_url: str, tmp_path: Path
) -> None:
    """A socket that never sends, and one that drips headers (slowloris), each held a connection
    for as long as the client liked (125 s measured); now the header deadline cuts both, while
    a kept-alive connection still serves a second request."""
    port = free_port()
    async with api_process(
        settings, database_url, port, tmp_path / "api.log", BROKER_HEADER_TIMEOUT_SECONDS="1"
    ):
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        drip_reader, drip_writer = await asyncio.open_connection("127.0.0.1", port)
        drip_writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        dripping = asyncio.ensure_future(_drip(drip_writer))
        try:
            idle, drip = await asyncio.gather(
                _closed_after(idle_reader, 10), _closed_after(drip_reader, 10)
            )
        finally:
            dripping.cancel()
            idle_writer.close()
            drip_writer.close()
        assert 0.9 <= idle <= 5, idle  # the deadline, plus a loaded machine's slack
        assert 0.9 <= drip <= 5, drip
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            for _ in range(2):  # a prompt client is served, its connection kept alive
                assert (await client.get("/healthz")).status_code == 200


async def _drip(writer: asyncio.StreamWriter) -> None:
    """One more header line every 0.3 s, never the blank line that ends them (bounded: 40)."""
    for n in range(40):
        await asyncio.sleep(0.3)
        writer.write(f"X-Drip-{n}: 1\r\n".encode())
        await writer.drain()


def test_every_server_caps_its_connections_and_times_out_idle_ones() -> None:
    config = uvicorn_config(object(), "127.0.0.1", 0, header_seconds=3, max_connections=64)
    assert config.limit_concurrency == 64
    assert config.timeout_keep_alive == 5
    assert isinstance(config.http, type)
    assert issubclass(config.http, BoundedHttpTools)
    assert config.http.header_seconds == 3


@pytest.mark.parametrize("settings_overrides", [{"broker_rate_limit_per_address_per_minute": 2}])
async def test_every_refusal_on_a_seller_page_carries_the_pages_security_headers(
    broker: Broker,
) -> None:
    """No page renders a 405, a validation 422 or a 429: they get the headers all the same."""
    async with httpx.AsyncClient(base_url=broker.url) as browser:
        refusals = [
            await browser.post("/oauth/callback"),  # 405
            await browser.get("/link/" + "x" * 200),  # 422: longer than a link token
            await browser.get("/oauth/callback?state=s&code=c"),  # the address's second: a page
            await browser.get("/oauth/callback?state=s&code=c"),  # 429
        ]
    assert [r.status_code for r in refusals] == [405, 422, 400, 429]
    for reply in refusals:
        assert reply.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in reply.headers["content-security-policy"]
        assert reply.headers["referrer-policy"] == "no-referrer"
        assert reply.headers["cache-control"] == "no-store"
        assert len(reply.headers.get_list("x-frame-options")) == 1  # never twice
