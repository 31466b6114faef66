"""A dump of every table, after links, a refresh and a failure, holds no secret in clear."""

from __future__ import annotations

import asyncpg

from service.core.crypto import context
from tests.support import Broker, FakeClock, SellerBrowser, Simulator, query_of, settings_keyring


async def dump_every_table(sql: asyncpg.Connection) -> str:
    tables = await sql.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )
    lines = []
    for table in tables:
        for row in await sql.fetch(f'SELECT * FROM "{table["table_name"]}"'):  # noqa: S608
            lines.append(" ".join(str(value) for value in row.values()))
    return "\n".join(lines)


async def test_no_token_verifier_state_or_key_is_stored_in_clear(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    async with SellerBrowser() as browser:
        callback = await browser.authorize(await broker.start_link("seller-1"), 4242)
        assert (await browser.callback(callback)).status_code == 200
        await simulator.faults(status=500, count=1)
        failed = await browser.authorize(await broker.start_link("seller-2"), 4343)
        assert (await browser.callback(failed)).status_code == 503  # a failed exchange
        left_open = await browser.open_link(await broker.start_link("seller-3"))  # not answered
    first = (await broker.token("seller-1")).json()["access_token"]
    clock.advance(days=170)
    second = (await broker.token("seller-1", min_ttl=30 * 24 * 3600)).json()["access_token"]
    assert first != second  # refreshed

    ring = settings_keyring(broker.settings)
    row = await sql.fetchrow("SELECT * FROM sellers WHERE seller_id = 'seller-1'")
    refresh_token = ring.open(
        row["refresh_token"], context("sellers", "seller-1", "refresh_token", row["client_id"])
    )
    verifiers = [
        ring.open(
            r["code_verifier"], context("link_attempts", r["id"], "code_verifier", r["client_id"])
        )
        for r in await sql.fetch("SELECT * FROM link_attempts")
    ]
    assert len(verifiers) == 3
    states = {query_of(url)["state"] for url in (callback, failed, left_open)}
    assert len(states) == 3

    dump = await dump_every_table(sql)
    secrets = {
        "first access token": first,
        "refreshed access token": second,
        "refresh token": refresh_token,
        "state of the linked attempt": query_of(callback)["state"],
        "state of the failed attempt": query_of(failed)["state"],
        "state of the open attempt": query_of(left_open)["state"],
        "code of the linked attempt": query_of(callback)["code"],
        "code of the failed attempt": query_of(failed)["code"],
        "api key": broker.api_key,
        **{f"verifier {n}": v for n, v in enumerate(verifiers)},
    }
    assert [name for name, value in secrets.items() if value in dump] == []
    # (The public key, APP_USR-<uuid>, is public by design and may be stored in clear.)
    assert f"APP_USR-{broker.settings.mp_client_id}-" not in dump
    assert "TG-" not in dump
