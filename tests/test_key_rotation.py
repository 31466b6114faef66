"""Encryption key rotation: a new key deployed, promoted, every row resealed, the old retired."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import asyncpg
import pytest
from pydantic import SecretStr

from service.core.config import Settings
from service.core.crypto import Keyring, SealError, context, generate_key_spec
from service.core.db import transaction
from service.core.models import Seller
from service.lifecycle import rekey, sellers
from tests.support import (
    Broker,
    FakeClock,
    SellerBrowser,
    Simulator,
    admin_connect,
    seed_sellers,
)
from tests.support.processes import base_env, run_cli

OLD, NEW = generate_key_spec("k1"), generate_key_spec("k2")


async def sealed_values(sql: asyncpg.Connection) -> list[tuple[str, str]]:
    """(context, sealed value) of every sealed value in the database."""
    values = []
    sellers = "SELECT seller_id, client_id, access_token, refresh_token FROM sellers"
    for row in await sql.fetch(sellers):
        for column in ("access_token", "refresh_token"):
            ctx = context("sellers", row["seller_id"], column, row["client_id"])
            values.append((ctx, row[column]))
    attempts = (
        "SELECT id, client_id, code_verifier FROM link_attempts WHERE code_verifier IS NOT NULL"
    )
    for row in await sql.fetch(attempts):
        ctx = context("link_attempts", row["id"], "code_verifier", row["client_id"])
        values.append((ctx, row["code_verifier"]))
    return values


@pytest.mark.parametrize("settings_overrides", [{"broker_encryption_keys": SecretStr(OLD)}])
async def test_after_reencryption_the_retired_key_can_be_removed(
    broker: Broker, database_url: str, sql: asyncpg.Connection
) -> None:
    tokens = {}
    async with SellerBrowser() as browser:
        for n in range(3):
            await browser.link(await broker.start_link(f"seller-{n}"), user_id=700 + n)
            tokens[f"seller-{n}"] = (await broker.token(f"seller-{n}")).json()["access_token"]
        await browser.open_link(await broker.start_link("half-way"))  # an attempt in progress
    before = await sealed_values(sql)
    assert {v.split(".")[1] for _, v in before} == {"k1"}

    # Phase 2 done (the new key promoted everywhere): reseal, then retire the old key.
    env = base_env(DATABASE_URL=database_url, BROKER_ENCRYPTION_KEYS=f"{NEW},{OLD}")
    code, out, err = await run_cli("keys", "reencrypt", "--batch-size", "2", env=env)
    assert code == 0, err
    assert "re-encrypted 7 row(s) under the primary key; 0 left" in out  # 3 sellers, 4 attempts
    assert "[##############################] 7/7" in err  # the progress bar
    after = await sealed_values(sql)
    assert {v.split(".")[1] for _, v in after} == {"k2"}
    retired = Keyring.parse(NEW)  # OLD is gone
    for ctx, sealed in after:
        retired.open(sealed, ctx)
    for seller_id, token in tokens.items():
        ctx = context("sellers", seller_id, "access_token", broker.settings.mp_client_id or "")
        sealed = await sql.fetchval(
            "SELECT access_token FROM sellers WHERE seller_id = $1", seller_id
        )
        assert retired.open(sealed, ctx) == token
    with pytest.raises(SealError):
        Keyring.parse(OLD).open(after[0][1], after[0][0])
    assert await sql.fetchval("SELECT max(version) FROM sellers") == 1  # not a rotation
    # A second run has nothing left to do.
    code, out, _ = await run_cli("keys", "reencrypt", env=env)
    assert "re-encrypted 0 row(s)" in out


@pytest.mark.parametrize(
    "settings_overrides", [{"broker_encryption_keys": SecretStr(f"{NEW},{OLD}")}]
)
async def test_reencryption_racing_a_refresh_loses_nothing(
    broker: Broker,
    simulator: Simulator,
    settings: Settings,
    clock: FakeClock,
    sql: asyncpg.Connection,
) -> None:
    sellers = await seed_sellers(
        sql, simulator, settings, 5, expires_in=3600, due=False, keyring=Keyring.parse(OLD)
    )
    racing = sellers[0]
    await simulator.faults(after_rotate="hold")
    read = asyncio.create_task(broker.token(racing, min_ttl=7200))
    await simulator.wait_until_held()  # Mercado Pago rotated; the new pair is on its way

    runtime = broker.app.state.runtime
    first = await rekey.reencrypt(runtime.db.sessions, runtime.keyring, clock)
    assert (first.done, first.skipped_leased) == (4, 1)  # the leased row is left alone

    await simulator.release()
    fresh = (await read).json()["access_token"]
    second = await rekey.reencrypt(runtime.db.sessions, runtime.keyring, clock)
    assert second.total == 0  # the refresh sealed its pair under the new primary

    row = await sql.fetchrow("SELECT * FROM sellers WHERE seller_id = $1", racing)
    assert row["version"] == 2
    ctx = context("sellers", racing, "access_token", row["client_id"])
    assert Keyring.parse(NEW).open(row["access_token"], ctx) == fresh
    assert (await broker.token(racing)).json()["access_token"] == fresh
    assert await sql.fetchval("SELECT count(*) FROM sellers WHERE access_token LIKE 'v1.k1.%'") == 0


def now() -> datetime:
    return datetime.now(UTC)


async def open_pair(sql: asyncpg.Connection, ring: Keyring, seller_id: str) -> tuple[str, str]:
    row = await sql.fetchrow("SELECT * FROM sellers WHERE seller_id = $1", seller_id)
    return (
        ring.open(
            row["access_token"], context("sellers", seller_id, "access_token", row["client_id"])
        ),
        ring.open(
            row["refresh_token"], context("sellers", seller_id, "refresh_token", row["client_id"])
        ),
    )


async def refresh_stores(
    sql: asyncpg.Connection, seller_id: str, pair: tuple[str, str], version: int
) -> None:
    """What a refresh's store does: a new pair under the primary key, guarded by and bumping
    the rotation `version` (service/refresh/engine.py)."""
    ring = Keyring.parse(f"{NEW},{OLD}")
    client_id = await sql.fetchval("SELECT client_id FROM sellers WHERE seller_id = $1", seller_id)
    written = await sql.execute(
        "UPDATE sellers SET access_token = $2, refresh_token = $3, version = version + 1 "
        "WHERE seller_id = $1 AND version = $4",
        seller_id,
        ring.seal(pair[0], context("sellers", seller_id, "access_token", client_id)),
        ring.seal(pair[1], context("sellers", seller_id, "refresh_token", client_id)),
        version,
    )
    assert written == "UPDATE 1"


async def test_a_version_bump_between_reencryptions_read_and_write_is_never_written_over(
    broker: Broker, simulator: Simulator, settings: Settings, sql: asyncpg.Connection
) -> None:
    [seller_id] = await seed_sellers(
        sql, simulator, settings, 1, expires_in=3600, due=False, keyring=Keyring.parse(OLD)
    )
    sessions, ring = broker.app.state.runtime.db.sessions, Keyring.parse(f"{NEW},{OLD}")
    async with sessions() as session:  # re-encryption's read of the row (version 1)
        read = await session.get(Seller, seller_id)
        assert read is not None
        assert read.version == 1
    fresh = ("APP_USR-fresh-access", "TG-fresh-refresh")
    await refresh_stores(sql, seller_id, fresh, version=1)  # lands before the write

    async with transaction(sessions) as session:
        assert await sellers.reseal(session, ring, read) is False
    assert await open_pair(sql, Keyring.parse(NEW), seller_id) == fresh  # not the old pair
    assert await sql.fetchval("SELECT version FROM sellers WHERE seller_id = $1", seller_id) == 2


async def test_reencryption_skips_a_row_a_refresh_is_storing_and_the_refresh_keeps_its_pair(
    broker: Broker,
    simulator: Simulator,
    settings: Settings,
    sql: asyncpg.Connection,
    database_url: str,
) -> None:
    sellers = await seed_sellers(
        sql, simulator, settings, 3, expires_in=3600, due=False, keyring=Keyring.parse(OLD)
    )
    storing = sellers[1]
    sessions, ring = broker.app.state.runtime.db.sessions, Keyring.parse(f"{NEW},{OLD}")
    refresh = await admin_connect(database_url)
    try:
        # A refresh in the middle of its store: it holds the row until it commits.
        store = refresh.transaction()
        await store.start()
        await refresh.execute("SELECT 1 FROM sellers WHERE seller_id = $1 FOR UPDATE", storing)
        progress = await asyncio.wait_for(rekey.reencrypt(sessions, ring, now), 10)
        assert (progress.total, progress.done) == (3, 2)  # did not wait for, nor touch, it
        assert await sql.fetchval(
            "SELECT access_token LIKE 'v1.k1.%' FROM sellers WHERE seller_id = $1", storing
        )
        fresh = ("APP_USR-fresh-access", "TG-fresh-refresh")
        await refresh_stores(refresh, storing, fresh, version=1)
        await store.commit()
    finally:
        await refresh.close()
    assert await open_pair(sql, Keyring.parse(NEW), storing) == fresh
    assert (await rekey.reencrypt(sessions, ring, now)).total == 0


@pytest.mark.parametrize("settings_overrides", [{"broker_encryption_keys": SecretStr(OLD)}])
async def test_an_interrupted_reencryption_resumes_with_only_the_rest_then_the_old_key_goes(
    broker: Broker, simulator: Simulator, settings: Settings, sql: asyncpg.Connection
) -> None:
    sellers = await seed_sellers(
        sql, simulator, settings, 5, expires_in=3600, due=False, keyring=Keyring.parse(OLD)
    )
    async with SellerBrowser() as browser:
        await browser.open_link(await broker.start_link("half-way"))  # an attempt in progress
    pairs = {s: await open_pair(sql, Keyring.parse(OLD), s) for s in sellers}
    sessions, ring = broker.app.state.runtime.db.sessions, Keyring.parse(f"{NEW},{OLD}")

    reports: list[int] = []

    def interrupt_after_the_first_batch(progress: rekey.Progress) -> None:
        reports.append(progress.done)
        task.cancel()  # like Ctrl-C: the next await (inside the next batch) raises

    task = asyncio.create_task(
        rekey.reencrypt(sessions, ring, now, 2, interrupt_after_the_first_batch)
    )
    with pytest.raises(asyncio.CancelledError):
        await task
    assert reports == [2]
    first_batch = await sql.fetch(
        "SELECT seller_id, access_token, refresh_token FROM sellers "
        "WHERE access_token LIKE 'v1.k2.%' ORDER BY seller_id"
    )
    assert [r["seller_id"] for r in first_batch] == sellers[:2]
    assert await rekey.pending(sessions, ring) == 4  # 3 sellers, 1 attempt

    second = await rekey.reencrypt(sessions, ring, now, 2)
    assert (second.total, second.done, second.skipped_leased) == (4, 4, 0)
    again = await sql.fetch(
        "SELECT seller_id, access_token, refresh_token FROM sellers "
        "WHERE seller_id = ANY($1::text[]) ORDER BY seller_id",
        sellers[:2],
    )
    assert again == first_batch  # the first batch was not rewritten (a reseal has a new nonce)

    retired = Keyring.parse(NEW)  # OLD removed
    values = await sealed_values(sql)
    assert len(values) == 11
    for ctx, sealed in values:
        retired.open(sealed, ctx)
    assert {s: await open_pair(sql, retired, s) for s in sellers} == pairs
    assert await sql.fetchval("SELECT max(version) FROM sellers") == 1
