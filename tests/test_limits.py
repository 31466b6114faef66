"""Absurd requests are refused early and change nothing; callers that ask too often get 429."""

from __future__ import annotations

import ipaddress
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from service.limits import Buckets, client_address
from tests.conftest import Broker, SellerBrowser


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
    from tests.conftest import create_api_key

    other = await create_api_key(database_url)  # another key has its own budget
    async with httpx.AsyncClient(
        base_url=broker.url, headers={"Authorization": f"Bearer {other}"}
    ) as caller:
        assert (await caller.get("/sellers/nobody/token")).status_code == 404


PROXIES = [ipaddress.ip_network("10.0.0.0/8")]


def scope(peer: str, forwarded: str | None = None) -> dict[str, object]:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
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
    assert client_address(scope(peer, forwarded), PROXIES) == expected


def test_a_bucket_refills_at_its_rate_and_forgets_the_least_recent() -> None:
    buckets = Buckets(rate=1, burst=2, capacity=2)
    assert [buckets.take("a", now=0) for _ in range(3)] == [0, 0, 1.0]
    assert buckets.take("a", now=2) == 0
    buckets.take("b", now=2)
    buckets.take("c", now=2)
    assert "a" not in buckets.buckets
