"""Owner liveness (service/refresh/owners.py) on a real PostgreSQL: who is taken over, and when.

The kill -9 and SIGSTOP cases with real processes are in test_chaos_crash.py; here the looks
run with a clock the test moves, so that "absent for ABSENT_SECONDS" costs no waiting.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from prometheus_client import REGISTRY

from service.core import db
from service.core.config import Settings
from service.refresh import owners
from tests.support import Simulator, seed_sellers

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)


class Monotonic:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await db.direct_pool(database_url, "tests", 2)
    yield pool
    await pool.close()


@pytest.fixture
async def liveness(database_url: str) -> AsyncIterator[owners.Liveness]:
    live = owners.Liveness(owners.owner_name(), database_url)
    yield live
    await live.close()


async def lease(sql: asyncpg.Connection, sellers: list[str], owner: str) -> None:
    await sql.execute(
        "UPDATE sellers SET lease_owner = $2, lease_until = $3, next_refresh_at = $4,"
        " attempt_outcome = 'sent' WHERE seller_id = ANY($1::text[])",
        sellers,
        owner,
        NOW + timedelta(seconds=60),
        NOW + timedelta(seconds=120),
    )


async def leases(sql: asyncpg.Connection) -> dict[str, str | None]:
    rows = await sql.fetch("SELECT seller_id, lease_owner FROM sellers ORDER BY seller_id")
    return {row["seller_id"]: row["lease_owner"] for row in rows}


def taken_over() -> float:
    return REGISTRY.get_sample_value("broker_leases_taken_over_total") or 0.0


async def test_a_dead_owner_is_taken_over_after_absent_seconds_and_a_live_one_never(
    sql: asyncpg.Connection,
    simulator: Simulator,
    settings: Settings,
    pool: asyncpg.Pool,
    liveness: owners.Liveness,
) -> None:
    s1, s2, s3 = await seed_sellers(sql, simulator, settings, 3, expires_in=3600, due=False)
    dead = owners.owner_name()  # never locked: its process is gone
    await lease(sql, [s1, s2], dead)
    await liveness.ensure()
    await lease(sql, [s3], liveness.owner)
    clock = Monotonic()
    woken: list[int] = []  # the refresher is woken to claim what a takeover made due
    takeover = owners.Takeover(pool, clock, freed=lambda: woken.append(1))
    before = taken_over()

    assert await takeover.look(NOW) == 0  # first seen absent now
    clock.now += owners.ABSENT_SECONDS - 0.5
    assert await takeover.look(NOW) == 0  # not yet
    assert await leases(sql) == {s1: dead, s2: dead, s3: liveness.owner}
    clock.now += 0.5
    assert woken == []
    assert await takeover.look(NOW) == 2
    assert woken == [1]
    assert await leases(sql) == {s1: None, s2: None, s3: liveness.owner}
    assert taken_over() == before + 2
    rows = await sql.fetch(
        "SELECT lease_until, next_refresh_at, attempt_outcome FROM sellers"
        " WHERE seller_id = ANY($1::text[])",
        [s1, s2],
    )
    for row in rows:
        # Due now, and the attempt still says sent: the next one tells a lost rotation.
        assert (row["lease_until"], row["next_refresh_at"], row["attempt_outcome"]) == (
            None,
            NOW,
            "sent",
        )
    clock.now += 3600  # the live owner, however long it holds its lease
    assert await takeover.look(NOW) == 0
    assert (await leases(sql))[s3] == liveness.owner
    assert woken == [1]


async def test_only_an_owner_absent_in_every_look_is_dead_and_old_owners_are_left_alone(
    sql: asyncpg.Connection,
    simulator: Simulator,
    settings: Settings,
    pool: asyncpg.Pool,
    liveness: owners.Liveness,
) -> None:
    s1, s2 = await seed_sellers(sql, simulator, settings, 2, expires_in=3600, due=False)
    await lease(sql, [s1], liveness.owner)  # its lock is not taken yet
    # A release before owner locks named its owners without the suffix: lease and grace only.
    await lease(sql, [s2], "host:123:0badc0de")
    clock = Monotonic()
    takeover = owners.Takeover(pool, clock)
    assert await takeover.look(NOW) == 0  # s1's owner absent since now
    clock.now += 3
    await liveness.ensure()  # back (a database restart dropped every lock, say)
    assert await takeover.look(NOW) == 0
    await liveness.close()  # gone again: counted from here, not from the first look
    clock.now += 1
    assert await takeover.look(NOW) == 0
    clock.now += owners.ABSENT_SECONDS - 0.5
    assert await takeover.look(NOW) == 0
    clock.now += 0.5
    assert await takeover.look(NOW) == 1
    clock.now += 3600
    assert await takeover.look(NOW) == 0
    assert await leases(sql) == {s1: None, s2: "host:123:0badc0de"}


async def test_a_failed_look_vouches_for_nobody(
    sql: asyncpg.Connection,
    simulator: Simulator,
    settings: Settings,
    pool: asyncpg.Pool,
) -> None:
    [s1] = await seed_sellers(sql, simulator, settings, 1, expires_in=3600, due=False)
    dead = owners.owner_name()
    await lease(sql, [s1], dead)
    clock = Monotonic()
    takeover = owners.Takeover(pool, clock)
    assert await takeover.look(NOW) == 0
    clock.now += owners.ABSENT_SECONDS
    await sql.execute("ALTER TABLE sellers RENAME TO sellers_away")  # the look fails
    try:
        assert await takeover.look(NOW) == 0
    finally:
        await sql.execute("ALTER TABLE sellers_away RENAME TO sellers")
    assert takeover.failing
    assert await takeover.look(NOW) == 0  # counting starts over after a failed look
    clock.now += owners.ABSENT_SECONDS
    assert await takeover.look(NOW) == 1
    assert not takeover.failing


async def test_a_live_owner_whose_session_ends_takes_its_lock_again_at_once(
    sql: asyncpg.Connection, liveness: owners.Liveness
) -> None:
    stop = asyncio.Event()
    watch = asyncio.create_task(liveness.watch(stop))
    try:
        pid = await first_lock_pid(sql, liveness.owner, None)
        # The server ends the session (a restart, an idle timeout, an operator): the lock goes.
        assert await sql.fetchval("SELECT pg_terminate_backend($1)", pid)
        assert await first_lock_pid(sql, liveness.owner, pid) != pid
    finally:
        stop.set()
        await watch
    assert liveness.held


async def first_lock_pid(sql: asyncpg.Connection, owner: str, not_pid: int | None) -> int:
    """Bounded wait until a session other than `not_pid` holds `owner`'s lock; its pid."""
    for _ in range(200):  # 10 s at most
        pid = await sql.fetchval(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted"
            " AND (classid::bigint << 32) | objid::bigint = hashtextextended($1, 0)",
            owner,
        )
        if pid is not None and pid != not_pid:
            return int(pid)
        await asyncio.sleep(0.05)
    raise AssertionError(f"nobody took {owner}'s lock")


async def test_a_second_session_of_the_same_owner_cannot_take_its_lock(
    database_url: str, liveness: owners.Liveness
) -> None:
    await liveness.ensure()
    twin = owners.Liveness(liveness.owner, database_url)
    with pytest.raises(RuntimeError, match="held by another session"):
        await twin.ensure()
    assert not twin.held
