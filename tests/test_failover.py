"""Rotations stored again after a failover (service/refresh/failover.py), in process.

The failover itself, with a promoted streaming replica, is test_chaos_failover.py; here the
"lost commit" is the seller's row put back as it was before the store, and the "new server" a
start time the watch has not seen.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import asyncpg
from prometheus_client import REGISTRY

from service.core import db
from service.lifecycle import sellers
from service.refresh import failover
from tests.support import Broker, FakeClock, Simulator
from tests.test_refresh import MONTH, SELLER, link

COLUMNS = "version, access_token, refresh_token, expires_at, next_refresh_at, last_refreshed_at"
ROW = f"SELECT {COLUMNS} FROM sellers WHERE seller_id = $1"  # noqa: S608 (constants)


def restored_total() -> float:
    return REGISTRY.get_sample_value("broker_rotations_restored_total") or 0.0


async def test_a_rotation_the_new_server_lost_is_stored_again_and_one_it_has_is_not(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    await link(broker)
    before = await sql.fetchrow(ROW, SELLER)
    clock.advance(days=160)
    refreshed = await broker.token(SELLER, min_ttl=MONTH)
    assert refreshed.status_code == 200
    after = await sql.fetchrow(ROW, SELLER)
    assert after["version"] == before["version"] + 1
    # The failover lost the store: the promoted server holds the row as it was before.
    await sql.execute(
        "UPDATE sellers SET version = $2, access_token = $3, refresh_token = $4,"
        " expires_at = $5, next_refresh_at = $6, last_refreshed_at = $7 WHERE seller_id = $1",
        SELLER,
        *before.values(),
    )
    watch = broker.refresher.failover
    counted = restored_total()
    async with db.direct(broker.refresher.db.direct) as connection:
        assert await watch.check(connection) == 0  # the same server: nothing to do
        assert watch.server is not None
        watch.server -= timedelta(hours=1)  # pretend it saw another server until now
        assert await watch.check(connection) == 1
    row = await sql.fetchrow(ROW, SELLER)
    assert dict(row) == dict(after)  # the pair Mercado Pago issued, back where it belongs
    assert restored_total() == counted + 1
    served = await broker.token(SELLER)
    assert served.json()["access_token"] == refreshed.json()["access_token"]

    # The journal was taken: a second new server finds nothing left to store. And a pair the
    # new server already has is superseded, never stored twice.
    clock.advance(days=160)
    assert (await broker.token(SELLER, min_ttl=MONTH)).status_code == 200
    async with db.direct(broker.refresher.db.direct) as connection:
        assert watch.server is not None
        watch.server -= timedelta(hours=1)
        assert await watch.check(connection) == 0
        watch.server -= timedelta(hours=1)
        assert await watch.check(connection) == 0
    assert restored_total() == counted + 1
    assert await simulator.token_requests("refresh_token") == 2


def test_the_journal_forgets_a_store_only_once_the_same_server_outlived_it_by_the_window() -> None:
    now = datetime.now(UTC)
    pair = sellers.Pair("sealed-a", "sealed-r", now, now, None, None, None)
    journal = failover.Journal()
    journal.keep("s1", "default", 1, pair)
    # The database was last seen (the same server) less than the window after s1's store:
    # s1 may not have replicated yet, whatever the clock says now (an outage stops the checks).
    journal.confirmed_at = time.monotonic() + failover.JOURNAL_SECONDS - 5
    journal.keep("s2", "default", 1, pair)
    assert [kept.seller_id for kept in journal.kept] == ["s1", "s2"]
    journal.confirmed_at = time.monotonic() + failover.JOURNAL_SECONDS + 5
    journal.keep("s3", "default", 1, pair)
    assert [kept.seller_id for kept in journal.kept] == ["s3"]
    assert [kept.seller_id for kept in journal.take()] == ["s3"]
    assert not journal.kept
