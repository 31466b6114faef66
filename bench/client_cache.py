"""The Python client's cache hit: what `token()` costs when the cache answers (target: 5 µs).

`python -m bench.client_cache` prints {"sync_us": ..., "async_us": ...}: microseconds per
call of `BrokerClient.token` and `AsyncBrokerClient.token` over CALLS calls for one seller.
The cache is warmed through an in-process transport that answers the one token read; no
timed call reaches it (checked), so only the hit path is measured, never HTTP.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta

import httpx
from mp_broker import AsyncBrokerClient, BrokerClient

CALLS = 200_000
SELLER = "bench/seller-1"


class OneToken:
    """Answers every token read with the same long-lived token, counting them."""

    def __init__(self) -> None:
        self.reads = 0

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.reads += 1
        expires_at = datetime.now(UTC) + timedelta(days=180)
        return httpx.Response(
            200,
            json={
                "access_token": "APP_USR-bench",
                "expires_at": expires_at.isoformat(),
                "mp_user_id": 1,
                "live_mode": False,
                "scope": "offline_access read write",
            },
        )


def per_call_us(started_ns: int) -> float:
    return (time.perf_counter_ns() - started_ns) / CALLS / 1000


def measure_sync() -> float:
    answer = OneToken()
    with BrokerClient("http://broker.invalid", "key", transport=httpx.MockTransport(answer)) as c:
        c.token(SELLER)
        started = time.perf_counter_ns()
        for _ in range(CALLS):
            c.token(SELLER)
        elapsed = per_call_us(started)
    assert answer.reads == 1, "a timed call missed the cache"
    return elapsed


async def measure_async() -> float:
    answer = OneToken()
    async with AsyncBrokerClient(
        "http://broker.invalid", "key", transport=httpx.MockTransport(answer)
    ) as c:
        await c.token(SELLER)
        started = time.perf_counter_ns()
        for _ in range(CALLS):
            await c.token(SELLER)
        elapsed = per_call_us(started)
    assert answer.reads == 1, "a timed call missed the cache"
    return elapsed


def measure() -> dict[str, float]:
    return {"sync_us": round(measure_sync(), 3), "async_us": round(asyncio.run(measure_async()), 3)}


if __name__ == "__main__":
    print(json.dumps(measure()))
