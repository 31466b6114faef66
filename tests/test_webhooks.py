"""Mercado Pago's `mp-connect` notifications: verified, de-duplicated, confirmed, then acted on."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import SecretStr

from service.lifecycle.webhooks import manifest, signature, verify
from tests.support import CLIENT_ID, Broker, FakeClock, Loopback, SellerBrowser, Simulator

NEW, OLD = "whsec-new-0123456789", "whsec-old-0123456789"
SECRETS = pytest.mark.parametrize(
    "settings_overrides", [{"mp_webhook_secret": SecretStr(f"{NEW},{OLD}")}]
)
SELLER, USER = "seller-1", 777


def notification(user_id: int = USER, **changes: Any) -> dict[str, Any]:
    body = {
        "id": 12345,
        "live_mode": True,
        "type": "mp-connect",
        "date_created": "2026-11-28T12:00:00Z",
        "application_id": CLIENT_ID,
        "user_id": user_id,
        "version": 1,
        "api_version": "v1",
        "action": "application.deauthorized",
        "data": {"id": str(user_id)},
    }
    return body | changes


async def deliver(
    broker: Broker,
    body: dict[str, Any],
    *,
    secret: str = OLD,
    request_id: str = "req-1",
    ts: datetime | None = None,
    signature_value: str | None = None,
    data_id: str | None = None,
) -> httpx.Response:
    """Sent and signed as Mercado Pago does: the signature covers the query's `data.id` (the
    body's unless given), the request id and the time, never the body."""
    stamp = str(int((ts or datetime.now(UTC)).timestamp()))
    data_id = data_id or body["data"]["id"]
    v1 = signature_value or signature(secret, data_id, request_id, stamp)
    async with httpx.AsyncClient(base_url=broker.url) as mercadopago:
        return await mercadopago.post(
            "/webhooks/mercadopago",
            params={"data.id": data_id, "type": "mp-connect"},
            content=json.dumps(body),
            headers={
                "content-type": "application/json",
                "x-signature": f"ts={stamp},v1={v1}",
                "x-request-id": request_id,
            },
        )


async def linked_seller(broker: Broker) -> None:
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link(SELLER), user_id=USER)


# -- the signature ------------------------------------------------------------------------------


def test_the_manifest_lowercases_alphanumeric_ids_and_leaves_out_absent_parts() -> None:
    assert manifest("ABC123", "req-9", "1700000000") == "id:abc123;request-id:req-9;ts:1700000000;"
    assert manifest("A-B", None, "1") == "id:A-B;ts:1;"
    assert manifest(None, None, "1") == "ts:1;"


def test_a_fresh_signature_by_either_secret_verifies_and_nothing_else_does() -> None:
    now = datetime(2026, 11, 28, tzinfo=UTC)
    ts = str(int(now.timestamp()))
    good = signature(OLD, "777", "r", ts)
    args = ("777", "r", now, 300)
    assert verify(f"ts={ts},v1={good}", (NEW, OLD), *args)
    assert verify(f"ts={ts}, v1={good.upper()}", (NEW, OLD), *args)
    assert not verify(f"ts={ts},v1={good}", (NEW,), *args)  # the old secret retired
    assert not verify(f"ts={ts},v1={good}", (NEW, OLD), "778", "r", now, 300)  # other seller
    assert not verify(f"ts={int(ts) - 301},v1={good}", (NEW, OLD), *args)
    assert not verify(None, (NEW, OLD), *args)
    assert not verify(f"ts={ts},v1={good}", (), *args)  # no secret configured


def test_a_timestamp_or_signature_of_other_characters_is_refused_not_a_crash() -> None:
    now = datetime(2026, 11, 28, tzinfo=UTC)
    good = signature(OLD, "777", "r", str(int(now.timestamp())))
    for header in (
        "ts=²,v1=" + good,
        "ts=\uff11\uff17,v1=" + good,
        f"ts={int(now.timestamp())},v1=zz",
    ):
        assert not verify(header, (OLD,), "777", "r", now, 300)


# -- end to end ---------------------------------------------------------------------------------


@SECRETS
async def test_a_signed_notification_without_a_request_id_is_refused(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    """Without x-request-id nothing de-duplicates it: within the tolerance each copy would be
    handled again, a /users/me call each."""
    await linked_seller(broker)
    await simulator.http.post("/_control/revoke", json={"user_id": USER})
    stamp = str(int(datetime.now(UTC).timestamp()))
    v1 = signature(OLD, str(USER), None, stamp)  # a valid signature over no request id
    async with httpx.AsyncClient(base_url=broker.url) as anyone:
        reply = await anyone.post(
            "/webhooks/mercadopago",
            params={"data.id": str(USER)},
            json=notification(),
            headers={"x-signature": f"ts={stamp},v1={v1}"},
        )
    assert reply.status_code == 422
    assert await sql.fetchval("SELECT status FROM sellers") == "linked"  # (old code: unlinked)


@SECRETS
@pytest.mark.parametrize(
    ("params", "headers"),
    [
        ({"data.id": "1"}, {"x-signature": "ts=²,v1=ab", "x-request-id": "r-1"}),  # was a 500
        ({"data.id": "1;request-id:x"}, {"x-signature": "ts=1,v1=ab", "x-request-id": "r-1"}),
        ({"data.id": "1"}, {"x-signature": "ts=1,v1=ab", "x-request-id": "r;ts:1"}),
        ({"data.id": "1"}, {"x-signature": "ts=1,v1=ab"}),  # no x-request-id: not de-duplicable
    ],
    ids=["superscript-ts", "data-id-with-separators", "request-id-with-separators", "no-id"],
)
async def test_malformed_notifications_are_refused_before_verifying_and_change_nothing(
    broker: Broker, sql: asyncpg.Connection, params: dict[str, str], headers: dict[str, str]
) -> None:
    await linked_seller(broker)
    async with httpx.AsyncClient(base_url=broker.url) as anyone:
        reply = await anyone.post(
            "/webhooks/mercadopago",
            params=params,
            json=notification(),
            headers={k.encode(): v.encode("latin-1") for k, v in headers.items()},
        )
    assert reply.status_code in (401, 422), reply.text
    assert reply.json()["code"] in ("invalid_signature", "invalid_request")
    assert await sql.fetchval("SELECT status FROM sellers") == "linked"
    assert await sql.fetchval("SELECT count(*) FROM webhook_receipts") == 0


@SECRETS
async def test_a_verified_deauthorization_confirmed_by_mercado_pago_unlinks_the_seller(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    await linked_seller(broker)
    await simulator.http.post("/_control/revoke", json={"user_id": USER})
    reply = await deliver(broker, notification())
    assert reply.status_code == 200
    assert reply.json() == {"action": "unlinked"}
    row = await sql.fetchrow("SELECT * FROM sellers")
    assert (row["status"], row["status_reason"]) == ("unlinked", "deauthorized")
    assert (row["access_token"], row["refresh_token"]) == (None, None)
    assert (await broker.token(SELLER)).json()["code"] == "seller_not_found"
    again = await deliver(broker, notification())  # Mercado Pago delivers it twice
    assert again.json() == {"action": "duplicate"}


@SECRETS
@pytest.mark.parametrize(
    ("taken_seconds_ago", "handled", "action"),
    [
        (600, False, "unlinked"),  # its process died mid-way: a retry takes it over
        (10, False, "duplicate"),  # another process is handling it right now
        (600, True, "duplicate"),  # handled: a replay does nothing
    ],
)
async def test_a_notification_a_crash_left_unhandled_is_acted_on_when_sent_again(
    broker: Broker,
    simulator: Simulator,
    sql: asyncpg.Connection,
    clock: FakeClock,
    taken_seconds_ago: int,
    handled: bool,
    action: str,
) -> None:
    await linked_seller(broker)
    await simulator.http.post("/_control/revoke", json={"user_id": USER})
    taken = clock() - timedelta(seconds=taken_seconds_ago)
    await sql.execute(
        "INSERT INTO webhook_receipts (request_id, received_at, handled_at) VALUES ($1, $2, $3)",
        "req-1",
        taken,
        taken if handled else None,
    )
    reply = await deliver(broker, notification(), request_id="req-1")
    assert reply.json() == {"action": action}
    status = await sql.fetchval("SELECT status FROM sellers")
    assert status == ("unlinked" if action == "unlinked" else "linked")
    marked = await sql.fetchval("SELECT handled_at IS NOT NULL FROM webhook_receipts")
    assert marked == (handled or action == "unlinked")  # the taker marks it when done


@SECRETS
async def test_a_deauthorization_the_token_contradicts_changes_nothing(
    broker: Broker, sql: asyncpg.Connection
) -> None:
    await linked_seller(broker)
    reply = await deliver(broker, notification(), secret=NEW)
    assert reply.json() == {"action": "still_authorized"}
    assert await sql.fetchval("SELECT status FROM sellers") == "linked"


@SECRETS
@pytest.mark.parametrize(
    "tamper",
    [
        {"signature_value": "0" * 64},
        {"secret": "someone-elses-secret"},
        {"ts": datetime(2020, 1, 1, tzinfo=UTC)},
    ],
)
async def test_unsigned_forged_or_stale_notifications_change_nothing(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection, tamper: dict[str, Any]
) -> None:
    await linked_seller(broker)
    await simulator.http.post("/_control/revoke", json={"user_id": USER})
    reply = await deliver(broker, notification(), **tamper)
    assert reply.status_code == 401
    assert reply.json()["code"] == "invalid_signature"
    assert await sql.fetchval("SELECT status FROM sellers") == "linked"
    assert await sql.fetchval("SELECT count(*) FROM webhook_receipts") == 0


@SECRETS
async def test_another_applications_notification_is_ignored(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    await linked_seller(broker)
    await simulator.http.post("/_control/revoke", json={"user_id": USER})
    reply = await deliver(broker, notification(application_id="999"))
    assert reply.json() == {"action": "ignored"}
    assert await sql.fetchval("SELECT status FROM sellers") == "linked"


async def test_without_a_configured_secret_nothing_is_accepted(
    broker: Broker, sql: asyncpg.Connection
) -> None:
    await linked_seller(broker)
    assert (await deliver(broker, notification())).status_code == 401


@SECRETS
async def test_a_refresh_in_flight_cannot_store_tokens_into_an_unlinked_seller(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    await linked_seller(broker)
    clock.advance(days=160)
    await simulator.faults(after_rotate="hold")
    read = asyncio.create_task(broker.token(SELLER, min_ttl=30 * 24 * 3600))
    await simulator.wait_until_held()
    await simulator.http.post("/_control/revoke", json={"user_id": USER})
    unlinked = await deliver(broker, notification(), ts=clock.now)  # the broker's clock moved
    assert unlinked.json() == {"action": "unlinked"}
    await simulator.release()
    assert (await read).status_code == 404
    row = await sql.fetchrow("SELECT * FROM sellers")
    assert (row["status"], row["access_token"], row["refresh_token"]) == ("unlinked", None, None)


@SECRETS
@pytest.mark.parametrize(
    ("signed_id", "body"),
    [
        (str(USER + 1), notification()),  # the body names a seller the signature does not
        (str(USER), notification(user_id=USER + 1)),  # and the other way round
        (str(USER), notification(data={"id": str(USER + 1)})),
    ],
)
async def test_a_body_naming_another_user_than_the_signed_data_id_changes_nothing(
    broker: Broker,
    simulator: Simulator,
    sql: asyncpg.Connection,
    signed_id: str,
    body: dict[str, Any],
) -> None:
    await linked_seller(broker)
    await simulator.http.post("/_control/revoke", json={"user_id": USER})
    reply = await deliver(broker, body, data_id=signed_id)
    assert reply.status_code == 200
    assert reply.json() == {"action": "ignored"}
    assert await sql.fetchval("SELECT status FROM sellers") == "linked"


@SECRETS
async def test_the_signed_data_id_is_the_user_acted_on(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    await linked_seller(broker)
    await simulator.http.post("/_control/revoke", json={"user_id": USER})
    body = notification(data={})  # only the query string names the user
    del body["user_id"]
    reply = await deliver(broker, body, data_id=str(USER))
    assert reply.json() == {"action": "unlinked"}
    assert await sql.fetchval("SELECT status FROM sellers") == "unlinked"


@SECRETS
@pytest.mark.parametrize("changes", [{"type": "payment"}, {"type": None}])
async def test_a_notification_of_another_topic_changes_nothing(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection, changes: dict[str, Any]
) -> None:
    await linked_seller(broker)
    await simulator.http.post("/_control/revoke", json={"user_id": USER})
    reply = await deliver(broker, notification(**changes))
    assert reply.json() == {"action": "ignored"}
    assert await sql.fetchval("SELECT status FROM sellers") == "linked"


# -- confirmation, against a stand-in for Mercado Pago's API the test controls ------------------


class UsersMe:
    """`GET /users/me` answering `status` with Mercado Pago's error shape; while `holding`,
    each reply waits for `release`."""

    def __init__(self) -> None:
        self.status = 401
        self.calls = 0
        self.holding = False
        self.release = asyncio.Event()
        self.url = ""

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/users/me")
        async def users_me() -> JSONResponse:
            self.calls += 1
            if self.holding:
                await self.release.wait()
            body = {"message": "m", "error": "e", "status": self.status, "cause": []}
            return JSONResponse(body, status_code=self.status)

        return app


@pytest.fixture
async def users_me() -> AsyncIterator[UsersMe]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    fake = UsersMe()
    async with Loopback(fake.app(), sock) as server:
        fake.url = server.url
        yield fake
        fake.release.set()  # a failed test must not leave a reply held


class TestConfirmationWithMercadoPago:
    @pytest.fixture
    def settings_overrides(self, users_me: UsersMe) -> dict[str, Any]:
        return {"mp_webhook_secret": SecretStr(f"{NEW},{OLD}"), "mp_api_url": users_me.url}

    async def test_only_a_401_from_users_me_unlinks_and_a_403_changes_nothing(
        self, broker: Broker, users_me: UsersMe, sql: asyncpg.Connection
    ) -> None:
        await linked_seller(broker)
        users_me.status = 403
        reply = await deliver(broker, notification(), request_id="req-1")
        assert (reply.status_code, reply.json()) == (200, {"action": "unconfirmed"})
        assert users_me.calls == 1
        assert await sql.fetchval("SELECT status FROM sellers") == "linked"
        users_me.status = 401
        reply = await deliver(broker, notification(), request_id="req-2")
        assert reply.json() == {"action": "unlinked"}
        assert await sql.fetchval("SELECT status FROM sellers") == "unlinked"

    async def test_two_concurrent_deliveries_of_one_notification_confirm_and_unlink_once(
        self, broker: Broker, users_me: UsersMe, sql: asyncpg.Connection
    ) -> None:
        await linked_seller(broker)
        users_me.holding = True
        first = asyncio.create_task(deliver(broker, notification()))
        second = asyncio.create_task(deliver(broker, notification()))
        for _ in range(400):  # bounded: until both asked Mercado Pago, or one was turned away
            if users_me.calls >= 2 or (users_me.calls and (first.done() or second.done())):
                break
            await asyncio.sleep(0.01)
        users_me.release.set()
        replies = await asyncio.gather(first, second)
        assert users_me.calls == 1
        assert sorted(r.json()["action"] for r in replies) == ["duplicate", "unlinked"]
        unlinks = "SELECT count(*) FROM audit_events WHERE action = 'seller.unlinked'"
        assert await sql.fetchval(unlinks) == 1

    async def test_a_notification_mercado_pago_could_not_confirm_is_acted_on_when_sent_again(
        self, broker: Broker, users_me: UsersMe, sql: asyncpg.Connection
    ) -> None:
        await linked_seller(broker)
        users_me.status = 500
        failed = await deliver(broker, notification())
        assert (failed.status_code, failed.json()["code"]) == (503, "upstream_unavailable")
        users_me.status = 401
        again = await deliver(broker, notification())  # the same x-request-id, retried
        assert again.json() == {"action": "unlinked"}
        assert await sql.fetchval("SELECT status FROM sellers") == "unlinked"
