"""Events to internal services: outbox in the change's transaction, signed, retried, parked."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import pytest
from fastapi import FastAPI, Request, Response
from pydantic import SecretStr

from service.core.config import Settings, Subscriber
from service.core.crypto import context
from service.core.runtime import Runtime
from service.lifecycle import events
from service.lifecycle.events import Dispatcher
from tests.support import (
    CLIENT_ID,
    Broker,
    FakeClock,
    Loopback,
    SellerBrowser,
    Simulator,
    seed_sellers,
)
from tests.support.processes import env_for, run_cli

SECRET = "whsec-billing-0123456789abcdef"


@dataclass
class Receiver:
    """An internal service receiving the broker's events; fails while `failures` > 0."""

    url: str = ""
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    failures: int = 0

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.received]


@pytest.fixture
def receiver_socket() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock


@pytest.fixture
def settings_overrides(receiver_socket: socket.socket) -> dict[str, Any]:
    port = receiver_socket.getsockname()[1]
    subscriber = Subscriber(
        name="billing", url=f"http://127.0.0.1:{port}/hooks/broker", secret=SecretStr(SECRET)
    )
    return {"broker_event_subscribers": [subscriber], "broker_event_retry_hours": 1.0}


@pytest.fixture
async def receiver(receiver_socket: socket.socket) -> AsyncIterator[Receiver]:
    state = Receiver()
    app = FastAPI()

    @app.post("/hooks/broker")
    async def hook(request: Request) -> Response:
        state.received.append((dict(request.headers), await request.body()))
        if state.failures > 0:
            state.failures -= 1
            return Response(status_code=503)
        return Response(status_code=204)

    async with Loopback(app, receiver_socket) as server:
        state.url = server.url
        yield state


def verify_like_a_receiver(secret: str, header: str, body: bytes) -> bool:
    """The README's few lines, written independently of service.events."""
    parts = dict(item.split("=", 1) for item in header.split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(expected.hexdigest(), parts["v1"])


def dispatcher(broker: Broker) -> Dispatcher:
    runtime: Runtime = broker.app.state.runtime
    return Dispatcher(runtime.settings, runtime.clock, runtime.db.sessions, runtime.http)


async def test_link_relink_and_unlink_are_delivered_signed_in_version_order_without_tokens(
    broker: Broker, receiver: Receiver, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    runtime: Runtime = broker.app.state.runtime
    tokens = []
    for _ in range(2):  # link, then relink
        async with SellerBrowser() as browser:
            await browser.link(await broker.start_link("seller-1"), user_id=11)
        tokens.append((await broker.token("seller-1")).json()["access_token"])
        sealed = await sql.fetchval("SELECT refresh_token FROM sellers")
        tokens.append(
            runtime.keyring.open(sealed, context("sellers", "seller-1", "refresh_token", CLIENT_ID))
        )
    assert (await broker.http.delete("/sellers/seller-1")).status_code == 200
    # Written with the change, before any delivery.
    assert await sql.fetchval("SELECT count(*) FROM events") == 3
    assert await sql.fetchval("SELECT count(*) FROM event_deliveries WHERE state = 'pending'") == 3

    assert await dispatcher(broker).deliver_due() == 3
    bodies = sorted(receiver.bodies(), key=lambda b: b["seller_version"])
    assert [(b["type"], b["seller_version"]) for b in bodies] == [
        ("seller.linked", 1),
        ("seller.relinked", 2),
        ("seller.unlinked", 3),
    ]
    assert bodies[0]["data"]["mp_user_id"] == 11
    assert bodies[2]["data"]["reason"] == "unlinked_by_platform"
    for headers, body in receiver.received:
        assert verify_like_a_receiver(SECRET, headers["broker-signature"], body)
        assert not verify_like_a_receiver("another-secret", headers["broker-signature"], body)
        assert headers["broker-event-id"] == json.loads(body)["id"]
    everything = b"".join(body for _, body in receiver.received).decode()
    assert not [token for token in tokens if token in everything]
    assert (
        await sql.fetchval("SELECT count(*) FROM event_deliveries WHERE state = 'delivered'") == 3
    )
    assert await dispatcher(broker).deliver_due() == 0  # delivered once, not again


async def test_a_receiver_answering_a_byte_at_a_time_is_cut_at_one_deadline(
    broker: Broker, receiver_socket: socket.socket, sql: asyncpg.Connection
) -> None:
    """httpx's timeout is per read: a byte every 0.2 s would keep a 1 s one alive for ever."""
    dripped = 0
    handlers: set[asyncio.Task[object]] = set()

    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal dripped
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 204 No Content\r\n")
            for _ in range(50):  # bounded: 10 s of headers, one byte at a time
                writer.write(b"X")
                dripped += 1
                await writer.drain()
                await asyncio.sleep(0.2)
        except ConnectionError:
            pass  # the broker hung up: what this test wants
        finally:
            writer.transport.abort()  # no socket outlives the test (or its event loop)

    server = await asyncio.start_server(drip, sock=receiver_socket)
    try:
        async with SellerBrowser() as browser:
            await browser.link(await broker.start_link("seller-1"), user_id=11)
        send = dispatcher(broker)
        send.settings = send.settings.model_copy(update={"broker_event_timeout_seconds": 1.0})
        assert await send.deliver_due() == 1
    finally:
        server.close()
        for handler in handlers:
            handler.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
    row = await sql.fetchrow("SELECT state, last_error FROM event_deliveries")
    assert (row["state"], row["last_error"]) == ("pending", "Timeout")
    assert dripped <= 10  # cut after about 1 s of dripping, not 10 s


async def test_a_failing_receiver_gets_retries_with_backoff_then_a_parked_event_is_replayed(
    broker: Broker,
    receiver: Receiver,
    clock: FakeClock,
    settings: Settings,
    database_url: str,
    sql: asyncpg.Connection,
) -> None:
    receiver.failures = 1000
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link("seller-1"), user_id=11)
    send = dispatcher(broker)
    assert await send.deliver_due() == 1
    row = await sql.fetchrow("SELECT * FROM event_deliveries")
    assert (row["state"], row["attempts"], row["last_error"]) == ("pending", 1, "http_503")
    waited = row["next_attempt_at"] - clock()
    assert timedelta(seconds=2) <= waited <= timedelta(seconds=5)
    assert await send.deliver_due() == 0  # not before its time

    delays = []
    for _ in range(40):  # bounded: the retry period is one hour
        row = await sql.fetchrow("SELECT * FROM event_deliveries")
        if row["state"] != "pending":
            break
        delays.append(row["next_attempt_at"] - clock())
        clock.advance(seconds=(row["next_attempt_at"] - clock()).total_seconds() + 1)
        await send.deliver_due()
    assert row["state"] == "failed"
    assert delays[-1] > delays[0] * 4  # it backed off
    assert max(delays) <= timedelta(seconds=settings.broker_event_backoff_max_seconds)
    attempts = len(receiver.received)
    assert attempts == row["attempts"] > 3

    env = env_for(settings, database_url)
    code, out, _ = await run_cli("events", "list", "--failed", env=env)
    assert code == 0
    event_id = await sql.fetchval("SELECT id FROM events")
    assert event_id in out
    assert "billing:failed" in out
    receiver.failures = 0
    code, out, _ = await run_cli("events", "replay", "--all-failed", env=env)
    assert (code, out.strip()) == (0, "queued 1 delivery(ies) again")
    assert await send.deliver_due() == 1
    assert await sql.fetchval("SELECT state FROM event_deliveries") == "delivered"
    ids = {headers["broker-event-id"] for headers, _ in receiver.received}
    assert ids == {event_id}  # at least once: the same id every time, for de-duplication


async def test_refresh_failures_send_one_event_per_streak_and_recovery_closes_it(
    broker: Broker,
    receiver: Receiver,
    simulator: Simulator,
    settings: Settings,
    sql: asyncpg.Connection,
    clock: FakeClock,
) -> None:
    [seller] = await seed_sellers(sql, simulator, settings, 1, expires_in=3600, due=True)
    await simulator.faults(status=503, count=2)
    assert await broker.refresher.refresh(seller) == "transient"
    await sql.execute("UPDATE sellers SET next_refresh_at = now() - interval '1 s'")
    assert await broker.refresher.refresh(seller) == "transient"
    assert await broker.refresher.refresh(seller) == "refreshed"
    types = [r["type"] for r in await sql.fetch("SELECT type FROM events ORDER BY created_at")]
    assert types == ["token.refresh_failed", "seller.recovered"]

    await simulator.http.post("/_control/revoke", json={"user_id": 10_000})
    await sql.execute("UPDATE sellers SET attempt_sent_at = NULL")
    assert await broker.refresher.refresh(seller) == "relink_required"
    data = await sql.fetchval("SELECT data FROM events WHERE type = 'seller.relink_required'")
    assert json.loads(data)["reason"] == "revoked"


async def test_a_token_that_will_lapse_unrefreshed_is_announced_once_per_token_pair(
    broker: Broker, simulator: Simulator, settings: Settings, sql: asyncpg.Connection
) -> None:
    sellers = await seed_sellers(sql, simulator, settings, 3, expires_in=3 * 86400, due=False)
    # seller 0: failing; seller 1: relink required; seller 2: healthy (its refresh is ahead).
    await sql.execute("UPDATE sellers SET refresh_failures = 2 WHERE seller_id = $1", sellers[0])
    await sql.execute(
        "UPDATE sellers SET status = 'relink_required' WHERE seller_id = $1", sellers[1]
    )
    runtime: Runtime = broker.app.state.runtime
    assert await events.notify_expiring(runtime.db.sessions, settings, runtime.clock()) == 2
    assert await events.notify_expiring(runtime.db.sessions, settings, runtime.clock()) == 0
    announced = await sql.fetch("SELECT seller_id FROM events WHERE type = 'seller.expiring_soon'")
    assert sorted(r["seller_id"] for r in announced) == sellers[:2]
    await sql.execute("UPDATE sellers SET version = version + 1 WHERE seller_id = $1", sellers[0])
    assert await events.notify_expiring(runtime.db.sessions, settings, runtime.clock()) == 1
