"""The audit trail: who read which token, every link, refresh, unlink and key change."""

from __future__ import annotations

import asyncio
import socket
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from service.lifecycle import audit
from tests.support import Broker, FakeClock, SellerBrowser, Simulator, create_api_key
from tests.support.processes import base_env, run_cli

SELLER = "billing/seller-1"


async def test_links_refreshes_and_token_reads_are_recorded_and_queryable(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link(SELLER), user_id=99)
    for _ in range(5):
        assert (await broker.token(SELLER)).status_code == 200
    clock.advance(days=160)
    assert (await broker.token(SELLER, min_ttl=30 * 24 * 3600)).status_code == 200
    # Reads are counted in memory, not written one by one.
    assert await sql.fetchval("SELECT count(*) FROM audit_events WHERE action = 'token.read'") == 0
    runtime = broker.app.state.runtime
    assert await runtime.reads.flush(runtime.db.direct) == 2  # two minutes of reads
    reply = await broker.http.get("/audit", params={"seller_id": SELLER})
    assert reply.status_code == 200
    events = [(e["action"], e["count"]) for e in reversed(reply.json())]
    key_name = await sql.fetchval("SELECT name FROM api_keys")
    assert events == [
        ("link.created", 1),
        ("seller.linked", 1),
        ("seller.refreshed", 1),
        ("token.read", 5),
        ("token.read", 1),
    ]
    assert {e["actor"] for e in reply.json() if e["action"] in ("link.created", "token.read")} == {
        key_name
    }
    assert "APP_USR-" not in reply.text


async def test_read_counts_that_could_not_be_written_are_kept_for_the_next_flush(
    broker: Broker, sql: asyncpg.Connection
) -> None:
    counter = audit.ReadCounter()
    minute = broker.app.state.runtime.clock()
    for n in range(2500):  # more than one COPY slice
        counter.add("billing", f"seller-{n % 1250}", "client", minute)
    with socket.socket() as unused:  # a port nothing listens on: the database is unreachable
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    nowhere = await asyncpg.create_pool(host="127.0.0.1", port=port, user="x", min_size=0)
    try:
        assert await counter.flush(nowhere) == 0
    finally:
        await nowhere.close()
    assert await sql.fetchval("SELECT count(*) FROM audit_events WHERE actor = 'billing'") == 0
    assert await counter.flush(broker.app.state.runtime.db.direct) == 1250  # kept, then written
    rows = await sql.fetch("SELECT seller_id, count FROM audit_events WHERE actor = 'billing'")
    assert len(rows) == 1250
    assert {r["count"] for r in rows} == {2}
    assert await counter.flush(broker.app.state.runtime.db.direct) == 0  # nothing twice


async def test_a_namespaced_key_sees_only_its_sellers_audit(
    broker: Broker, database_url: str
) -> None:
    from service.core import db
    from service.serving import apikeys

    engine = db.make_engine(database_url, "tests", pool_size=1)
    async with db.transaction(db.make_sessionmaker(engine)) as session:
        _, secret = await apikeys.create(
            session,
            "billing-admin",
            broker.app.state.runtime.clock(),
            ("sellers:admin",),
            "billing/",
        )
    await engine.dispose()
    async with httpx.AsyncClient(
        base_url=broker.url, headers={"Authorization": f"Bearer {secret}"}
    ) as billing:
        assert (await billing.get("/audit")).status_code == 403
        assert (await billing.get("/audit", params={"seller_id": "other/1"})).status_code == 403
        assert (await billing.get("/audit", params={"seller_id": SELLER})).status_code == 200
    reader = await create_api_key(database_url, scopes=("tokens:read",))
    async with httpx.AsyncClient(
        base_url=broker.url, headers={"Authorization": f"Bearer {reader}"}
    ) as caller:
        assert (await caller.get("/audit")).status_code == 403


async def test_retention_prunes_old_events_and_old_link_attempts_only(
    broker: Broker, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    async with SellerBrowser() as browser:
        await browser.open_link(await broker.start_link(SELLER))
    old = clock.now - timedelta(days=400)
    await sql.execute(
        "INSERT INTO audit_events (at, actor, action, count) VALUES ($1, 'x', 'token.read', 1)", old
    )
    await sql.execute("UPDATE link_attempts SET created_at = $1", clock.now - timedelta(days=31))
    await broker.start_link("seller-2")  # a link that expired 31 days ago, and a live one
    await sql.execute(
        "UPDATE links SET expires_at = $1 WHERE seller_id = 'seller-2'",
        clock.now - timedelta(days=31),
    )
    runtime = broker.app.state.runtime
    events, attempts, links = await audit.prune(runtime.db.sessions, clock.now, 365, 30)
    assert (events, attempts, links) == (1, 1, 1)
    assert await sql.fetchval("SELECT seller_id FROM links") == SELLER
    kept = {r["action"] for r in await sql.fetch("SELECT action FROM audit_events")}
    assert kept == {"key.created", "link.created"}


async def aged_rows(sql: asyncpg.Connection, now: datetime) -> None:
    """Audit events, link attempts and webhook receipts either side of 10 and 3 days."""
    for actor, days in (("past-audit-retention", 11), ("within-audit-retention", 9)):
        await sql.execute(
            "INSERT INTO audit_events (at, actor, action, count) VALUES ($1, $2, 'token.read', 1)",
            now - timedelta(days=days),
            actor,
        )
    attempts = [r["id"] for r in await sql.fetch("SELECT id FROM link_attempts ORDER BY id")]
    assert len(attempts) == 2
    for attempt, days in zip(attempts, (4, 2), strict=True):
        await sql.execute(
            "UPDATE link_attempts SET created_at = $2 WHERE id = $1",
            attempt,
            now - timedelta(days=days),
        )
    for request_id, days in (("old-receipt", 4), ("recent-receipt", 2)):
        await sql.execute(
            "INSERT INTO webhook_receipts (request_id, received_at) VALUES ($1, $2)",
            request_id,
            now - timedelta(days=days),
        )


async def left_after_pruning(sql: asyncpg.Connection, now: datetime) -> dict[str, object]:
    return {
        "actors": {r["actor"] for r in await sql.fetch("SELECT actor FROM audit_events")}
        & {"past-audit-retention", "within-audit-retention"},
        "attempt ages": sorted(
            (now - r["created_at"]).days for r in await sql.fetch("SELECT * FROM link_attempts")
        ),
        "receipts": {r["request_id"] for r in await sql.fetch("SELECT * FROM webhook_receipts")},
    }


PRUNED = {
    "actors": {"within-audit-retention"},
    "attempt ages": [2],
    "receipts": {"recent-receipt"},
}
RETENTION = {"broker_audit_retention_days": 10, "broker_attempt_retention_days": 3}


@pytest.mark.parametrize("settings_overrides", [RETENTION])
async def test_the_refreshers_job_prunes_by_the_retention_settings(
    broker: Broker, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    async with SellerBrowser() as browser:
        for n in range(2):
            await browser.open_link(await broker.start_link(f"seller-{n}"))
    await aged_rows(sql, clock.now)
    stop = asyncio.Event()
    job = asyncio.create_task(broker.refresher.run(stop))  # prunes as it starts, then hourly
    try:

        async def pruned() -> bool:
            return await left_after_pruning(sql, clock.now) == PRUNED

        for _ in range(200):  # bounded: 10 s
            if await pruned() or job.done():
                break
            await asyncio.sleep(0.05)
        assert await left_after_pruning(sql, clock.now) == PRUNED
    finally:
        stop.set()
        await asyncio.wait_for(job, 10)


async def test_broker_audit_prune_enforces_the_retention_settings_now(
    broker: Broker, database_url: str, sql: asyncpg.Connection
) -> None:
    async with SellerBrowser() as browser:
        for n in range(2):
            await browser.open_link(await broker.start_link(f"seller-{n}"))
    now = datetime.now(UTC)  # the command's own clock
    await aged_rows(sql, now)
    env = base_env(
        DATABASE_URL=database_url,
        BROKER_AUDIT_RETENTION_DAYS="10",
        BROKER_ATTEMPT_RETENTION_DAYS="3",
    )
    code, out, err = await run_cli("audit", "prune", env=env)
    assert code == 0, err
    assert out.strip() == "pruned 1 audit event(s), 1 link attempt(s), 0 link(s)"
    assert await left_after_pruning(sql, now) == PRUNED
