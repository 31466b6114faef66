"""The refresh engine, in one broker process: fake clock, real PostgreSQL, simulator over HTTP.
Fault points are driven through the simulator's control API, never by sleeping."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from service.core import metrics
from service.core.config import LEASE_MARGIN_SECONDS
from service.core.crypto import context
from service.core.runtime import Runtime
from service.lifecycle.sellers import STORE_HEALTHY
from service.refresh.engine import Outcome, RateLimiter, Refresher
from service.serving.tokens import read_token
from tests.support import (
    CLIENT_SECRET,
    SIM_EXPIRES_IN,
    Broker,
    FakeClock,
    SellerBrowser,
    Simulator,
    admin_connect,
    busiest,
    settings_keyring,
    wait_until,
)
from tests.support.api import ANY_KEY

SELLER = "seller-1"
MONTH = 30 * 24 * 3600


@pytest.fixture
async def other(broker: Broker) -> AsyncIterator[Refresher]:
    """Another replica's refresher: its own owner (and owner lock) and single-flight map."""
    async with contextlib.aclosing(broker.refresher.replica()) as refresher:
        yield refresher


async def link(broker: Broker, seller_id: str = SELLER, user_id: int = 4242) -> str:
    async with SellerBrowser() as browser:
        page = await browser.link(await broker.start_link(seller_id), user_id=user_id)
    assert page.status_code == 200, page.text
    reply = await broker.token(seller_id)
    token: str = reply.json()["access_token"]
    return token


async def stored_refresh_token(broker: Broker, sql: asyncpg.Connection, seller_id: str) -> str:
    row = await sql.fetchrow(
        "SELECT refresh_token, client_id FROM sellers WHERE seller_id = $1", seller_id
    )
    ring = settings_keyring(broker.settings)
    return ring.open(
        row["refresh_token"], context("sellers", seller_id, "refresh_token", row["client_id"])
    )


def sample(name: str, **labels: str) -> float:
    """A metric's current value in this process (0 when it was never set)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def event_types(sql: asyncpg.Connection, seller_id: str = SELLER) -> list[str]:
    rows = await sql.fetch(
        "SELECT type FROM events WHERE seller_id = $1 ORDER BY created_at, type", seller_id
    )
    return [r["type"] for r in rows]


async def seller_row(sql: asyncpg.Connection, seller_id: str = SELLER) -> asyncpg.Record:
    return await sql.fetchrow("SELECT * FROM sellers WHERE seller_id = $1", seller_id)


async def wait_for(sql: asyncpg.Connection, query: str, expected: object, *args: object) -> None:
    """Bounded wait (5 s) for a database condition reached by background work."""
    for _ in range(200):
        if await sql.fetchval(query, *args) == expected:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{query} never became {expected!r}")


async def start_held_refresh(
    broker: Broker, simulator: Simulator, clock: FakeClock, **faults: object
) -> asyncio.Task[httpx.Response]:
    """Link, let the token come due, and start a read whose refresh Mercado Pago holds."""
    await link(broker)
    clock.advance(days=160)
    await simulator.faults(after_rotate="hold", **faults)
    reader = asyncio.create_task(broker.token(SELLER, min_ttl=MONTH))
    await simulator.wait_until_held()
    return reader


# -- on-read refresh --------------------------------------------------------------------------


async def test_a_read_with_min_ttl_refreshes_first_and_rotates_the_pair(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    first = await link(broker)
    old_refresh = await stored_refresh_token(broker, sql, SELLER)
    clock.advance(days=160)  # 22 days left, less than the 30 asked for
    reply = await broker.token(SELLER, min_ttl=MONTH)
    assert reply.status_code == 200
    assert reply.json()["access_token"] != first
    assert "broker-token-warning" not in reply.headers
    assert await simulator.token_requests("refresh_token") == 1
    row = await seller_row(sql)
    assert row["version"] == 2
    assert row["attempt_outcome"] == "ok"
    assert row["last_refreshed_at"] == clock.now
    assert await stored_refresh_token(broker, sql, SELLER) != old_refresh
    # expires_at counts from when the refresh was sent, with the reply's expires_in.
    assert row["expires_at"] == clock.now + timedelta(seconds=SIM_EXPIRES_IN)


async def test_a_token_with_enough_time_left_is_served_without_refreshing(
    broker: Broker, simulator: Simulator
) -> None:
    first = await link(broker)
    reply = await broker.token(SELLER, min_ttl=MONTH)
    assert reply.json()["access_token"] == first
    assert await simulator.token_requests("refresh_token") == 0


async def test_min_ttl_above_the_documented_cap_is_refused(broker: Broker) -> None:
    await link(broker)
    reply = await broker.token(SELLER, min_ttl=broker.settings.broker_min_ttl_max_seconds + 1)
    assert reply.status_code == 422
    assert reply.json()["code"] == "invalid_request"


async def test_a_lapsed_token_is_refreshed_on_read(
    broker: Broker, simulator: Simulator, clock: FakeClock
) -> None:
    first = await link(broker)
    clock.advance(seconds=SIM_EXPIRES_IN + 1)
    reply = await broker.token(SELLER)
    assert reply.status_code == 200
    assert reply.json()["access_token"] != first


async def test_concurrent_reads_in_one_process_share_one_refresh(
    broker: Broker, simulator: Simulator, clock: FakeClock
) -> None:
    await link(broker)
    clock.advance(days=160)
    await simulator.faults(latency_ms=200)
    replies = await asyncio.gather(*(broker.token(SELLER, min_ttl=MONTH) for _ in range(20)))
    assert {r.status_code for r in replies} == {200}
    assert len({r.json()["access_token"] for r in replies}) == 1
    assert await simulator.token_requests("refresh_token") == 1


@pytest.mark.parametrize("settings_overrides", [{"broker_on_read_cooldown_seconds": 60}])
async def test_a_fresh_token_is_served_even_when_it_cannot_meet_min_ttl(
    broker: Broker, simulator: Simulator
) -> None:
    await (await simulator.http.post("/_control/config", json={"expires_in": 3600})).aread()
    await link(broker)
    # Every token lives one hour; two hours are asked for: one refresh, then the fresh token.
    first = await broker.token(SELLER, min_ttl=7200)
    second = await broker.token(SELLER, min_ttl=7200)
    assert first.status_code == second.status_code == 200
    assert first.json()["access_token"] == second.json()["access_token"]
    assert await simulator.token_requests("refresh_token") == 1


# The one slow test: Mercado Pago answers after httpx's default 5 s timeout would have given up.
@pytest.mark.parametrize("settings_overrides", [{"mp_timeout_seconds": 8.0}])
async def test_a_reply_slower_than_five_seconds_but_within_the_deadline_is_stored(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    await link(broker)
    clock.advance(days=160)
    await simulator.faults(latency_ms=5500)
    assert await broker.refresher.refresh(SELLER) == Outcome.REFRESHED
    row = await seller_row(sql)
    assert (row["version"], row["refresh_failures"], row["attempt_outcome"]) == (2, 0, "ok")
    assert await simulator.token_requests("refresh_token") == 1


# -- exactly once ------------------------------------------------------------------------------


async def test_a_lease_that_lapses_while_the_reply_is_held_still_stores_the_late_success(
    broker: Broker,
    other: Refresher,
    simulator: Simulator,
    clock: FakeClock,
    sql: asyncpg.Connection,
) -> None:
    first_reader = await start_held_refresh(broker, simulator, clock, count=1)
    # The lease lapses while the reply is on its way (a paused owner, a clock running ahead).
    clock.advance(seconds=broker.settings.broker_lease_seconds + 1)
    # Another replica (its own owner and single-flight map) neither takes the seller in its
    # background claim, though the seller is due, nor refreshes it on demand.
    assert (await other._claim_round(10))[0] == []
    assert await other.refresh(SELLER) == Outcome.BUSY
    assert await simulator.token_requests("refresh_token") == 1
    second_reader = asyncio.create_task(broker.token(SELLER, min_ttl=MONTH))
    for _ in range(200):  # bounded: until the second reader joined the refresh in flight
        if broker.refresher.joined:
            break
        await asyncio.sleep(0.025)
    assert broker.refresher.joined == 1
    await simulator.release()
    replies = await asyncio.gather(first_reader, second_reader)
    assert {r.status_code for r in replies} == {200}
    assert len({r.json()["access_token"] for r in replies}) == 1
    assert await simulator.token_requests("refresh_token") == 1  # never sent twice
    row = await seller_row(sql)
    assert (row["status"], row["version"]) == ("linked", 2)
    log = await simulator.log()
    assert "invalid_grant" not in [e["outcome"] for e in log]
    assert (await other._claim_round(10))[0] == []  # stored: not due again for months


async def test_a_store_whose_connection_is_killed_is_sent_again_until_it_lands(
    broker: Broker,
    simulator: Simulator,
    clock: FakeClock,
    sql: asyncpg.Connection,
    database_url: str,
) -> None:
    reader = await start_held_refresh(broker, simulator, clock, count=1)
    holder = await admin_connect(database_url)  # holds the seller's row: the store waits on it
    try:
        async with holder.transaction():
            await holder.execute("SELECT 1 FROM sellers WHERE seller_id = $1 FOR UPDATE", SELLER)
            await simulator.release()  # Mercado Pago has rotated: the new pair exists only here
            query = (
                "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND starts_with(query, $1)"
            )
            for _ in range(200):  # bounded: until the store waits on the row
                if pid := await sql.fetchval(query, STORE_HEALTHY.tag):
                    break
                await asyncio.sleep(0.025)
            assert pid, "the store never waited on the held row"
            # Its connection dies mid-statement (a restart, a failover, an operator).
            assert await sql.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await holder.close()
    reply = await reader
    assert reply.status_code == 200, reply.text
    row = await seller_row(sql)
    assert (row["status"], row["version"]) == ("linked", 2)  # stored on a new connection
    assert await simulator.token_requests("refresh_token") == 1  # never sent twice
    clock.advance(days=160)  # the stored refresh token is the live one: the next one works
    assert (await broker.token(SELLER, min_ttl=MONTH)).status_code == 200
    assert (await seller_row(sql))["version"] == 3
    assert "invalid_grant" not in [e["outcome"] for e in await simulator.log()]


async def test_a_late_success_recovers_a_seller_marked_relink_required_meanwhile(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    reader = await start_held_refresh(broker, simulator, clock)
    # Another replica, its lease lapsed, got invalid_grant and marked the seller.
    await sql.execute(
        "UPDATE sellers SET status = 'relink_required', status_reason = 'rotation_lost'"
    )
    recovered_before = sample(
        "broker_refreshes_total", application="default", outcome="recovered", reason=""
    )
    await simulator.release()
    assert (await reader).status_code == 200
    row = await seller_row(sql)
    assert (row["status"], row["status_reason"], row["version"]) == ("linked", None, 2)
    # Recorded as a recovery: the audit trail, the outbox and the metric all say so.
    actions = await sql.fetch(
        "SELECT actor, action FROM audit_events WHERE seller_id = $1 AND action LIKE 'seller.r%'",
        SELLER,
    )
    assert [tuple(a) for a in actions] == [("system", "seller.recovered")]
    event = await sql.fetchrow(
        "SELECT seller_version, data FROM events WHERE type = $1", "seller.recovered"
    )
    assert event["seller_version"] == 2
    assert json.loads(event["data"])["status"] == "linked"
    assert (
        sample("broker_refreshes_total", application="default", outcome="recovered", reason="")
        == recovered_before + 1
    )


async def test_invalid_grant_after_someone_else_rotated_is_a_race_not_a_revocation(
    broker: Broker,
    other: Refresher,
    simulator: Simulator,
    clock: FakeClock,
    sql: asyncpg.Connection,
) -> None:
    await link(broker)
    clock.advance(days=160)
    claims = (await other._claim_round(10))[0]  # it read version 1 and the current token
    assert len(claims) == 1
    await sql.execute("UPDATE sellers SET lease_until = NULL")  # its lease lapsed
    # Its claim counts as an attempt: on-read refreshes wait out the cooldown after it.
    clock.advance(seconds=broker.settings.broker_on_read_cooldown_seconds + 1)
    assert (await broker.token(SELLER, min_ttl=MONTH)).status_code == 200  # we rotate first
    outcome = await other._refresh_claimed(claims[0])  # its old token: invalid_grant
    assert outcome == Outcome.RACED
    row = await seller_row(sql)
    assert (row["status"], row["version"]) == ("linked", 2)


async def test_a_seller_unlinked_while_its_refresh_is_in_flight_stays_unlinked(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    reader = await start_held_refresh(broker, simulator, clock)
    unlinked = await broker.http.delete(f"/sellers/{SELLER}")  # moves the rotation version
    assert unlinked.status_code == 200, unlinked.text
    await simulator.release()  # the late pair arrives for a version that is gone
    assert (await reader).status_code == 404
    row = await seller_row(sql)
    assert (row["status"], row["version"]) == ("unlinked", 2)
    assert (row["access_token"], row["refresh_token"], row["last_refreshed_at"]) == (
        None,
        None,
        None,
    )
    assert await simulator.token_requests("refresh_token") == 1


async def test_a_claim_whose_lease_ran_down_before_the_send_sends_nothing(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    await link(broker)
    clock.advance(days=160)
    [claim] = (await broker.refresher._claim_round(10))[0]
    # Between the claim and the send (a slow breaker check, a paused process) the lease ran
    # down to less than the request's deadline plus the margin.
    deadline = broker.settings.mp_timeout_seconds + LEASE_MARGIN_SECONDS
    clock.advance(seconds=broker.settings.broker_lease_seconds - deadline + 1)
    assert await broker.refresher._refresh_claimed(claim) == Outcome.TRANSIENT
    assert await simulator.token_requests("refresh_token") == 0
    row = await seller_row(sql)
    assert (row["attempt_outcome"], row["last_refresh_error"]) == ("not_sent", "lease_too_short")
    assert (row["lease_owner"], row["lease_until"]) == (None, None)
    # Known not sent, so the same refresh token is simply sent next time (no rotation_lost).
    clock.advance(seconds=broker.settings.broker_backoff_max_seconds + 1)
    assert await broker.refresher.refresh(SELLER) == Outcome.REFRESHED


async def test_a_seller_leased_by_another_owner_is_busy_and_nothing_is_sent(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    await link(broker)
    clock.advance(days=160)
    await sql.execute(
        "UPDATE sellers SET lease_owner = 'other-replica', lease_until = $1",
        clock.now + timedelta(seconds=30),
    )
    # Not on read: the claim has no cooldown condition, so only the lease can refuse it.
    assert await broker.refresher.refresh(SELLER, on_read=False) == Outcome.BUSY
    assert await simulator.token_requests("refresh_token") == 0
    row = await seller_row(sql)
    assert (row["lease_owner"], row["version"], row["attempt_sent_at"]) == (
        "other-replica",
        1,
        None,
    )
    clock.advance(seconds=31)  # that lease lapsed: now it is ours to take
    assert await broker.refresher.refresh(SELLER, on_read=False) == Outcome.REFRESHED


async def test_a_client_disconnecting_mid_refresh_does_not_lose_the_new_pair(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    await link(broker)
    clock.advance(days=160)
    await simulator.faults(after_rotate="hold", count=1)
    # uvicorn does not cancel a handler whose client went away, so an HTTP disconnect would
    # prove nothing: cancel the reading task itself (what a timeout wrapper or a server that
    # cancels would do) while Mercado Pago has rotated the token and holds the reply.
    caller = asyncio.create_task(read_token(broker.app.state.serving, ANY_KEY, SELLER, MONTH))
    await simulator.wait_until_held()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await simulator.release()
    await wait_for(sql, "SELECT version FROM sellers", 2)
    reply = await broker.token(SELLER, min_ttl=MONTH)
    assert reply.status_code == 200
    assert "broker-token-warning" not in reply.headers
    assert await simulator.token_requests("refresh_token") == 1
    clock.advance(days=160)  # the stored refresh token is the live one: the next one works
    assert await broker.refresher.refresh(SELLER) == Outcome.REFRESHED


# -- failures ----------------------------------------------------------------------------------


async def breakers_open(broker: Broker, clock: FakeClock) -> float:
    """`broker_breakers_open` as the periodic gauge collection computes it now."""
    runtime: Runtime = broker.app.state.runtime
    async with runtime.db.sessions() as session:
        await metrics.collect_database_gauges(session, clock(), 7, broker.settings.apps)
    return sample("broker_breakers_open", application="default")


@pytest.mark.parametrize(
    ("error", "status"),
    [
        ("invalid_client", 400),
        ("invalid_client", 401),
        ("unauthorized_client", 400),
        ("invalid_scope", 400),
        ("invalid_request", 400),
        ("unsupported_grant_type", 400),
        ("a_code_mercado_pago_never_documented", 400),  # not understood: never relinks anyone
    ],
)
async def test_an_application_wide_error_trips_the_breaker_loudly_and_no_seller_changes_status(
    broker: Broker,
    simulator: Simulator,
    clock: FakeClock,
    sql: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    error: str,
    status: int,
) -> None:
    await link(broker)
    await link(broker, "seller-2", user_id=4343)
    clock.advance(days=160)
    await simulator.faults(status=status, error=error, count=1)
    reply = await broker.token(SELLER, min_ttl=MONTH)
    assert reply.status_code == 503
    assert await sql.fetchval("SELECT reason FROM app_breakers") == error
    statuses = await sql.fetch("SELECT status, status_reason, next_refresh_at FROM sellers")
    assert {(r["status"], r["status_reason"]) for r in statuses} == {("linked", None)}
    assert all(r["next_refresh_at"] <= clock.now for r in statuses)  # both still due
    # Loud: an ERROR line naming the reason, and the gauge the alert watches.
    tripped = [r for r in caplog.records if r.getMessage() == "breaker.tripped"]
    assert [(r.levelno, getattr(r, "fields", {}).get("reason")) for r in tripped] == [
        (logging.ERROR, error)
    ]
    assert await breakers_open(broker, clock) == 1
    # Paused everywhere: the background loop claims nothing for this application.
    assert (await broker.refresher._claim_round(10))[0] == []
    # After the probe delay one refresh goes through; its success closes the breaker.
    clock.advance(seconds=broker.settings.broker_breaker_probe_seconds + 1)
    claims = (await broker.refresher._claim_round(10))[0]
    outcomes = [await broker.refresher._refresh_claimed(c) for c in claims]
    assert Outcome.REFRESHED in outcomes
    assert await sql.fetchval("SELECT count(*) FROM app_breakers") == 0
    assert await breakers_open(broker, clock) == 0


async def test_while_the_breaker_is_open_valid_tokens_are_served_with_the_failing_warning(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    tokens = {SELLER: await link(broker), "seller-2": await link(broker, "seller-2", 4343)}
    clock.advance(days=160)  # 22 days left: both due, both still valid
    await simulator.faults(status=400, error="invalid_client", count=1)
    assert (await broker.token(SELLER, min_ttl=MONTH)).status_code == 503  # trips the breaker
    assert (await broker.token("seller-2", min_ttl=MONTH)).status_code == 503  # refused by it
    assert await simulator.token_requests("refresh_token") == 1
    for seller_id, token in tokens.items():  # reads as after a transient error
        served = await broker.token(seller_id)
        assert served.status_code == 200
        assert served.json()["access_token"] == token
        assert served.headers.get("broker-token-warning") == "refresh-failing"
    rows = await sql.fetch(
        "SELECT status, refresh_failures, last_refresh_error FROM sellers ORDER BY seller_id"
    )
    assert [tuple(r) for r in rows] == [
        ("linked", 1, "invalid_client"),
        ("linked", 1, "refresh_paused"),
    ]
    # The probe's success closes the breaker; both recover and the warning goes away (from the
    # cache as soon as its listener hears of the store: within a second, on every replica).
    clock.advance(seconds=broker.settings.broker_breaker_probe_seconds + 1)
    for seller_id in tokens:
        assert await broker.refresher.refresh(seller_id) == Outcome.REFRESHED

        async def unwarned(seller_id: str = seller_id) -> bool:
            served = await broker.token(seller_id)
            assert served.status_code == 200
            return "broker-token-warning" not in served.headers

        await wait_until(unwarned, f"{seller_id} served without the warning", 1.0)
        assert await event_types(sql, seller_id) == [
            "seller.linked",
            "token.refresh_failed",
            "seller.recovered",
        ]


@pytest.mark.parametrize(
    "settings_overrides",
    [{"broker_breaker_invalid_grant_threshold": 3, "broker_refresh_concurrency": 1}],
)
async def test_a_burst_of_invalid_grant_pauses_refreshing_before_it_relinks_everyone(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    for n in range(6):
        await link(broker, f"seller-{n}", user_id=9000 + n)
        await simulator.http.post("/_control/revoke", json={"user_id": 9000 + n})
    clock.advance(days=160)
    stop = asyncio.Event()
    loop = asyncio.create_task(broker.refresher.run(stop))
    await wait_for(sql, "SELECT count(*) FROM app_breakers", 1)
    stop.set()
    await loop
    statuses = [r["status"] for r in await sql.fetch("SELECT status FROM sellers")]
    assert statuses.count("relink_required") == 3
    assert statuses.count("linked") == 3
    assert await sql.fetchval("SELECT reason FROM app_breakers") == "invalid_grant_burst"


async def test_a_revoked_grant_becomes_relink_required_revoked(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    await link(broker, user_id=777)
    await simulator.http.post("/_control/revoke", json={"user_id": 777})
    clock.advance(days=160)
    reply = await broker.token(SELLER, min_ttl=MONTH)
    assert reply.status_code == 409
    assert reply.json()["code"] == "relink_required"
    row = await seller_row(sql)
    assert (row["status"], row["status_reason"]) == ("relink_required", "revoked")
    assert row["next_refresh_at"] is None
    # Reads stay useful while the current token is valid, with a warning.
    still = await broker.token(SELLER)
    assert still.status_code == 200
    assert still.headers["broker-token-warning"] == "relink-required"


async def test_a_lost_reply_after_rotation_ends_as_rotation_lost_never_silently(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    await link(broker)
    clock.advance(days=160)
    await simulator.faults(after_rotate="drop", count=1)
    lost = await broker.token(SELLER, min_ttl=MONTH)
    assert lost.status_code == 503
    assert int(lost.headers["retry-after"]) >= 1
    row = await seller_row(sql)
    assert (row["status"], row["attempt_outcome"]) == ("linked", "unknown")
    assert row["next_refresh_at"] > clock.now  # backed off
    # The next attempt tells: the token was rotated and the reply lost.
    clock.advance(seconds=broker.settings.broker_on_read_cooldown_seconds + 1)
    assert (await broker.token(SELLER, min_ttl=MONTH)).status_code == 409
    row = await seller_row(sql)
    assert (row["status"], row["status_reason"]) == ("relink_required", "rotation_lost")


async def test_a_transient_failure_backs_off_and_the_valid_token_is_still_served(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    first = await link(broker)
    clock.advance(days=160)
    await simulator.faults(status=500, count=1)
    assert await broker.refresher.refresh(SELLER) == Outcome.TRANSIENT
    row = await seller_row(sql)
    assert row["refresh_failures"] == 1
    assert row["last_refresh_error"] == "server_error" or row["last_refresh_error"]
    base = broker.settings.broker_backoff_base_seconds
    assert row["next_refresh_at"] >= clock.now + timedelta(seconds=base)
    assert row["lease_owner"] is None
    served = await broker.token(SELLER)
    assert served.status_code == 200
    assert served.json()["access_token"] == first
    assert served.headers["broker-token-warning"] == "refresh-failing"


async def test_a_rate_limited_refresh_is_sent_again_at_once(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    await link(broker)
    clock.advance(days=160)
    await simulator.faults(rate_limited=True, count=1)
    assert await broker.refresher.refresh(SELLER) == Outcome.REFRESHED
    outcomes = [e["outcome"] for e in await simulator.log() if e["grant_type"] == "refresh_token"]
    assert outcomes == ["fault:429", "ok"]


@pytest.mark.parametrize("failing", [False, True], ids=["healthy", "failing"])
async def test_a_reply_without_refresh_token_keeps_the_old_one(
    broker: Broker,
    simulator: Simulator,
    clock: FakeClock,
    sql: asyncpg.Connection,
    failing: bool,
) -> None:
    """Both store paths: the one-statement store of a healthy seller, and the store that
    closes a failing seller's streak."""
    await link(broker)
    old = await stored_refresh_token(broker, sql, SELLER)
    clock.advance(days=160)
    if failing:
        await simulator.faults(status=500, count=1)
        assert await broker.refresher.refresh(SELLER) == Outcome.TRANSIENT
        clock.advance(seconds=broker.settings.broker_backoff_max_seconds + 1)
    await simulator.faults(omit_refresh_token=True)
    assert await broker.refresher.refresh(SELLER) == Outcome.REFRESHED
    assert await stored_refresh_token(broker, sql, SELLER) == old
    row = await seller_row(sql)
    assert (row["version"], row["refresh_failures"]) == (2, 0)
    streak = ["token.refresh_failed", "seller.recovered"] if failing else []
    assert await event_types(sql) == ["seller.linked", *streak]
    await simulator.faults()
    clock.advance(days=160)  # the kept refresh token is the live one: the next refresh works
    assert await broker.refresher.refresh(SELLER) == Outcome.REFRESHED


async def test_a_minimal_refresh_reply_keeps_the_stored_account_fields(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    await link(broker, user_id=5150)
    before = await seller_row(sql)
    clock.advance(days=160)
    await simulator.faults(minimal_refresh_reply=True)
    assert await broker.refresher.refresh(SELLER) == Outcome.REFRESHED
    after = await seller_row(sql)
    assert after["version"] == 2
    assert (after["mp_user_id"], after["public_key"], after["live_mode"]) == (
        5150,
        before["public_key"],
        before["live_mode"],
    )


# -- the background refresher -------------------------------------------------------------------


async def test_the_background_refresher_refreshes_each_due_seller_once(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    for n in range(5):
        await link(broker, f"seller-{n}", user_id=100 + n)
    await link(broker, "not-due", user_id=200)
    await sql.execute(
        "UPDATE sellers SET next_refresh_at = $1 WHERE seller_id = 'not-due'",
        clock.now + timedelta(days=400),
    )
    clock.advance(days=160)
    stop = asyncio.Event()
    loop = asyncio.create_task(broker.refresher.run(stop))
    await wait_for(sql, "SELECT count(*) FROM sellers WHERE version = 2", 5)
    stop.set()
    await loop
    assert await simulator.token_requests("refresh_token") == 5
    assert await sql.fetchval("SELECT version FROM sellers WHERE seller_id = 'not-due'") == 1
    assert await sql.fetchval("SELECT min(next_refresh_at) FROM sellers") > clock.now


@pytest.mark.parametrize("settings_overrides", [{"broker_refresh_concurrency": 2}])
async def test_the_refresher_never_holds_more_sellers_than_free_slots(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    for n in range(5):
        await link(broker, f"seller-{n}", user_id=100 + n)
    clock.advance(days=160)
    await simulator.faults(after_rotate="hold")
    stop = asyncio.Event()
    loop = asyncio.create_task(broker.refresher.run(stop))
    await simulator.wait_until_held(2)
    assert await sql.fetchval("SELECT count(*) FROM sellers WHERE lease_owner IS NOT NULL") == 2
    await simulator.faults()
    await simulator.release()
    await wait_for(sql, "SELECT count(*) FROM sellers WHERE version = 2", 5)
    stop.set()
    await loop
    assert await simulator.token_requests("refresh_token") == 5


async def test_the_due_query_is_served_by_the_partial_index(sql: asyncpg.Connection) -> None:
    await sql.execute("SET enable_seqscan = off")
    plan = "\n".join(
        r[0]
        for r in await sql.fetch(
            "EXPLAIN SELECT seller_id FROM sellers WHERE status = 'linked' AND client_id = 'a' "
            "AND next_refresh_at <= now() ORDER BY next_refresh_at LIMIT 10"
        )
    )
    assert "ix_sellers_client_id_next_refresh_at_linked" in plan


# -- revocation reports -----------------------------------------------------------------------


async def test_a_reported_invalid_token_that_still_works_changes_nothing(
    broker: Broker, sql: asyncpg.Connection
) -> None:
    await link(broker)
    reply = await broker.http.post(f"/sellers/{SELLER}/token/invalid")
    assert reply.status_code == 200
    assert reply.json()["status"] == "linked"
    assert (await seller_row(sql))["status"] == "linked"


async def test_a_reported_invalid_token_that_mercado_pago_refuses_marks_the_seller(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    await link(broker, user_id=31337)
    await simulator.http.post("/_control/revoke", json={"user_id": 31337})
    reply = await broker.http.post(f"/sellers/{SELLER}/token/invalid")
    assert reply.status_code == 200
    body = reply.json()
    assert (body["status"], body["status_reason"]) == ("relink_required", "revoked")
    assert "access_token" not in reply.text


async def test_reports_of_one_token_share_one_check_and_then_cool_down(
    broker: Broker, sql: asyncpg.Connection
) -> None:
    """Fifty reports used to be fifty `/users/me` calls: now the ones at once share a check,
    and the ones after it within the cooldown make none."""
    await link(broker)

    def checks() -> float:
        labels = {"application": "default", "endpoint": "users_me"}
        return sample("broker_upstream_request_duration_seconds_count", **labels)

    before = checks()
    replies = await asyncio.gather(
        *(broker.http.post(f"/sellers/{SELLER}/token/invalid") for _ in range(20))
    )
    assert {r.status_code for r in replies} == {200}
    assert checks() - before == 1
    for _ in range(5):
        assert (await broker.http.post(f"/sellers/{SELLER}/token/invalid")).status_code == 200
    assert checks() - before == 1
    assert (await seller_row(sql))["status"] == "linked"


async def test_reporting_needs_an_api_key(broker: Broker) -> None:
    async with httpx.AsyncClient(base_url=broker.url) as anonymous:
        reply = await anonymous.post(f"/sellers/{SELLER}/token/invalid")
    assert reply.status_code == 401


@pytest.mark.parametrize("settings_overrides", [{"mp_token_url": "http://127.0.0.1:9/oauth/token"}])
async def test_a_refresh_that_could_not_connect_is_known_not_sent(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    await sql.execute(
        "INSERT INTO sellers (seller_id, client_id, mp_user_id, status, access_token, "
        "refresh_token, live_mode, expires_at, linked_at, updated_at) "
        "VALUES ($1, $2, 1, 'linked', 'x', $3, true, $4, $4, $4)",
        SELLER,
        broker.settings.mp_client_id,
        settings_keyring(broker.settings).seal(
            "TG-abc-1",
            context("sellers", SELLER, "refresh_token", broker.settings.mp_client_id or ""),
        ),
        clock.now,
    )
    assert await broker.refresher.refresh(SELLER) == Outcome.TRANSIENT
    row = await seller_row(sql)
    assert (row["attempt_outcome"], row["last_refresh_error"]) == ("not_sent", "ConnectError")


async def test_an_admin_sees_a_sellers_status_and_never_a_secret(
    broker: Broker, simulator: Simulator, clock: FakeClock
) -> None:
    token = await link(broker, user_id=8080)
    reply = await broker.http.get(f"/sellers/{SELLER}")
    assert reply.status_code == 200
    body = reply.json()
    assert (body["status"], body["mp_user_id"], body["refresh_failures"]) == ("linked", 8080, 0)
    assert token not in reply.text
    assert "TG-" not in reply.text
    assert (await broker.http.get("/sellers/nobody")).json()["code"] == "seller_not_found"


async def test_an_admin_sees_a_transient_failure_and_then_the_success(
    broker: Broker, simulator: Simulator, clock: FakeClock
) -> None:
    await link(broker)
    linked_at = clock.now
    clock.advance(days=160)
    await simulator.faults(status=500, count=1)
    assert await broker.refresher.refresh(SELLER) == Outcome.TRANSIENT

    async def status() -> dict[str, object]:
        reply = await broker.http.get(f"/sellers/{SELLER}")
        assert reply.status_code == 200
        body = reply.json()
        for name in ("expires_at", "last_refreshed_at"):
            body[name] = body[name] and datetime.fromisoformat(body[name])
        fields = ("status", "status_reason", "expires_at", "last_refreshed_at")
        return {k: body[k] for k in (*fields, "last_refresh_error", "refresh_failures")}

    assert await status() == {
        "status": "linked",
        "status_reason": None,
        "expires_at": linked_at + timedelta(seconds=SIM_EXPIRES_IN),
        "last_refreshed_at": None,
        "last_refresh_error": "internal_server_error",
        "refresh_failures": 1,
    }
    clock.advance(seconds=broker.settings.broker_backoff_max_seconds + 1)
    assert await broker.refresher.refresh(SELLER) == Outcome.REFRESHED
    assert await status() == {
        "status": "linked",
        "status_reason": None,
        "expires_at": clock.now + timedelta(seconds=SIM_EXPIRES_IN),
        "last_refreshed_at": clock.now,
        "last_refresh_error": None,
        "refresh_failures": 0,
    }


@pytest.mark.parametrize(
    "settings_overrides", [{"mp_client_secret": SecretStr(f"retired-secret,{CLIENT_SECRET}")}]
)
async def test_a_renewed_client_secret_is_tried_before_the_breaker_trips(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    await link(broker)  # the exchange already needed the second secret
    clock.advance(days=160)
    assert await broker.refresher.refresh(SELLER) == Outcome.REFRESHED
    outcomes = [(e["grant_type"], e["outcome"]) for e in await simulator.log()]
    assert outcomes == [
        ("authorization_code", "invalid_client"),
        ("authorization_code", "ok"),
        ("refresh_token", "ok"),  # the secret that works is remembered
    ]
    assert await sql.fetchval("SELECT count(*) FROM app_breakers") == 0


async def test_the_refresh_rate_limit_holds_in_every_second_even_after_the_loop_stalls() -> None:
    """Sixty-four senders at 200/s; the event loop freezes for 0.15 s twice. No second may see
    more than the rate (plus one, for a window's two ends): turns booked ahead of time would
    have let the senders the stall held up go out together with the ones on time."""
    rate, sends = 200.0, 360
    limiter = RateLimiter(rate)
    loop = asyncio.get_running_loop()
    granted: list[float] = []

    async def sender() -> None:
        while len(granted) < sends:
            await limiter.wait()
            granted.append(loop.time())

    for at in (0.4, 1.1):
        loop.call_later(at, time.sleep, 0.15)  # the whole loop stops, as under a heavy load
    await asyncio.wait_for(asyncio.gather(*(sender() for _ in range(64))), 10)

    most = busiest(granted, 1.0)
    assert most <= rate + 1, most
    # and the pace is the rate less its headroom, not far below it: the stalls cost their own
    # time only
    pace = rate * (1 - RateLimiter.HEADROOM)
    assert granted[sends - 1] - granted[0] < (sends - 1) / pace + 2 * 0.15 + 0.2
