"""Encryption key rotation: a new key deployed, promoted, every row resealed, the old retired."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from pydantic import SecretStr

from service import rekey
from service.config import Settings
from service.crypto import Keyring, SealError, context, generate_key_spec
from tests.conftest import Broker, FakeClock, SellerBrowser, Simulator, seed_sellers
from tests.processes import base_env, run_cli

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
    first = await rekey.reencrypt(runtime.sessions, runtime.keyring, clock)
    assert (first.done, first.skipped_leased) == (4, 1)  # the leased row is left alone

    await simulator.release()
    fresh = (await read).json()["access_token"]
    second = await rekey.reencrypt(runtime.sessions, runtime.keyring, clock)
    assert second.total == 0  # the refresh sealed its pair under the new primary

    row = await sql.fetchrow("SELECT * FROM sellers WHERE seller_id = $1", racing)
    assert row["version"] == 2
    ctx = context("sellers", racing, "access_token", row["client_id"])
    assert Keyring.parse(NEW).open(row["access_token"], ctx) == fresh
    assert (await broker.token(racing)).json()["access_token"] == fresh
    assert await sql.fetchval("SELECT count(*) FROM sellers WHERE access_token LIKE 'v1.k1.%'") == 0
