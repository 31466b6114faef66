"""Database failover: SIGKILL the primary under a refresh wave and reads, promote its streaming
replica, and check every seller against Mercado Pago (the simulator) afterwards.

Two API replicas and a refresher run on a multi-host DATABASE_URL
(`?host=primary&host=replica&target_session_attrs=read-write`), as behind Patroni, RDS or Cloud
SQL. A wave of due sellers is being refreshed (at a capped rate, so that it spans the failover)
and both replicas serve reads throughout.

- synchronous: every commit waited for the replica, so the promoted one has every rotation.
- asynchronous: the primary's WAL sender is stopped (SIGSTOP) for a stretch of the wave before
  the kill, so the promoted replica misses the last rotations for sure (on loopback the lag
  would otherwise be too small to lose any). The processes that stored them notice the new
  server and store them again (service/refresh/failover.py).

Either way: only 200 and 503 meanwhile, serving again within 5 s of the promotion, and
afterwards every seller holds the refresh token the simulator last issued, each rotated exactly
once, no invalid_grant. Run with -s for the figures (docs/RELIABILITY.md, "Database failover").
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from service.core.config import Settings
from service.ops.cli import migrate
from tests.support import Simulator, create_api_key, seed_sellers, settings_keyring
from tests.support.db import admin_connect, execute
from tests.support.processes import api_process, broker_process, enter_all, env_for, free_port
from tests.support.replication import Pair
from tests.test_chaos_crash import grants, stored

pytestmark = pytest.mark.chaos

SELLERS = 240
RATE = 40  # refreshes a second: the wave lasts about 6 s
BEFORE_KILL = 60  # rotations stored before the primary dies
UNREPLICATED = 25  # asynchronous: rotations stored while the replica hears nothing
SERVE_AGAIN_SECONDS = 5.0


@pytest.fixture(params=[True, False], ids=["synchronous", "asynchronous"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    servers = Pair(synchronous=request.param)
    try:
        servers.start()
        yield servers
    finally:
        servers.close()


class Reads:
    """Bounded read loops through every API replica; (replica, monotonic, status) each."""

    def __init__(self, http: httpx.AsyncClient, urls: list[str], sellers: list[str]) -> None:
        self.http, self.urls, self.sellers = http, urls, sellers
        self.replies: list[tuple[int, float, int]] = []
        self.stop = asyncio.Event()

    async def run(self, replica: int) -> None:
        pick = random.Random(replica)
        for _ in range(20_000):  # bounded in count as well as by `stop`
            if self.stop.is_set():
                return
            seller = pick.choice(self.sellers)
            try:
                reply = await self.http.get(f"{self.urls[replica]}/sellers/{seller}/token")
                status = reply.status_code
            except httpx.TransportError:
                status = 0  # no answer at all
            self.replies.append((replica, time.monotonic(), status))
            await asyncio.sleep(0.01)

    async def close(self, loops: list[asyncio.Task[None]]) -> None:
        self.stop.set()
        await asyncio.gather(*loops, return_exceptions=True)  # their outcomes: the replies

    def statuses(self) -> Counter[int]:
        return Counter(status for _, _, status in self.replies)

    def serving_again(self, replica: int, after: float) -> float:
        """Seconds from `after` to the replica's first 200 answered after it."""
        for who, at, status in self.replies:
            if who == replica and at > after and status == 200:
                return at - after
        return float("inf")


async def versions(url: str) -> dict[str, int]:
    sql = await admin_connect(url)
    try:
        rows = await sql.fetch("SELECT seller_id, version FROM sellers")
    finally:
        await sql.close()
    return {row["seller_id"]: row["version"] for row in rows}


async def count_rotated(simulator: Simulator) -> int:
    return sum(1 for e in await simulator.log() if e["grant_type"] == "refresh_token")


async def until(what: str, check: object, seconds: float) -> None:
    """Bounded wait until the coroutine function `check` returns true."""
    deadline = time.monotonic() + seconds
    while not await check():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.05)


async def test_a_failover_under_a_refresh_wave_loses_no_rotation(
    pair: Pair,
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    tmp_path: Path,
) -> None:
    await execute(pair.primary.url("postgres"), "CREATE DATABASE broker")
    await asyncio.to_thread(migrate, pair.primary.url("broker"))
    sql = await admin_connect(pair.primary.url("broker"))
    try:
        sellers = await seed_sellers(sql, simulator, settings, SELLERS, expires_in=3600, due=False)
    finally:
        await sql.close()
    ring = settings_keyring(settings)
    api_key = await create_api_key(pair.primary.url("broker"))
    url = pair.url("broker")
    sockets[0].close()
    env = {"BROKER_REFRESH_RATE_PER_SECOND": str(RATE), "BROKER_REFRESH_POLL_SECONDS": "0.2"}
    ports = [free_port(), free_port()]
    async with AsyncExitStack() as stack:
        processes = await enter_all(
            stack,
            *(
                api_process(settings, url, port, tmp_path / f"api-{n}.log", **env)
                for n, port in enumerate(ports)
            ),
            broker_process(
                ["refresher"], env_for(settings, url, **env), None, tmp_path / "refresher.log"
            ),
        )
        http = await stack.enter_async_context(
            httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
        )
        reads = Reads(http, [f"http://127.0.0.1:{port}" for port in ports], sellers)
        loops = [asyncio.create_task(reads.run(n)) for n in range(len(ports))]
        stack.push_async_callback(reads.close, loops)  # on the way out too (a failure)
        sql = await admin_connect(pair.primary.url("broker"))
        await sql.execute("UPDATE sellers SET next_refresh_at = now() - interval '1 second'")
        await sql.close()

        async def rotated_before_kill() -> bool:
            return await count_rotated(simulator) >= BEFORE_KILL

        await until("the wave started", rotated_before_kill, 30)
        unheard: set[str] = set()  # rotated on the primary only
        if not pair.synchronous:
            # The primary's WAL sender, not the replica's receiver: what the sender had written
            # would wait in the kernel's socket buffer and reach a resumed receiver after all.
            sender = pair.primary.child("walsender")
            heard = await versions(pair.replica.url("broker"))
            pair_before = await versions(pair.primary.url("broker"))
            stopped_at = await count_rotated(simulator)
            os.kill(sender, signal.SIGSTOP)

            async def rotated_unheard() -> bool:
                on_primary = await versions(pair.primary.url("broker"))
                return sum(on_primary[s] > pair_before[s] for s in sellers) >= UNREPLICATED

            await until("rotations the replica never heard of", rotated_unheard, 30)
            on_primary = await versions(pair.primary.url("broker"))
            unheard = {s for s in sellers if on_primary[s] > heard[s]}
            assert await count_rotated(simulator) > stopped_at
        await asyncio.to_thread(pair.primary.kill)
        killed_at = time.monotonic()
        await asyncio.to_thread(pair.replica.promote)
        promoted_at = time.monotonic()

        async def wave_done() -> bool:
            sql = await admin_connect(pair.replica.url("broker"))
            try:
                return not await sql.fetchval(
                    "SELECT count(*) FROM sellers WHERE version < 2 AND status = 'linked'"
                )
            finally:
                await sql.close()

        await until("every seller refreshed or marked", wave_done, 60)
        await asyncio.sleep(1.5)  # a second refresh would come within the refresher's polls
        reads.stop.set()
        await asyncio.gather(*loops)
        live = await grants(simulator)
        sql = await admin_connect(pair.replica.url("broker"))
        try:
            holding = {s: await stored(sql, ring, s) for s in sellers}
            statuses = Counter(r["status"] for r in await sql.fetch("SELECT status FROM sellers"))
        finally:
            await sql.close()
        log = Counter(
            e["outcome"] for e in await simulator.log() if e["grant_type"] == "refresh_token"
        )
        restored = sum(
            (tmp_path / name).read_text().count('"failover.restored"')
            for name in ("api-0.log", "api-1.log", "refresher.log")
        )
        for process in processes:
            assert process.returncode is None  # no process died of it

    mode = "synchronous" if pair.synchronous else "asynchronous"
    again = [reads.serving_again(n, promoted_at) for n in range(len(ports))]
    print(
        f"\n== failover, {mode} replication ==\n"
        f"  promoted {promoted_at - killed_at:.2f} s after the kill; replicas serving again"
        f" {', '.join(f'{s:.2f}' for s in again)} s after the promotion\n"
        f"  reads by status: {dict(reads.statuses())}\n"
        f"  rotations stored while the replica heard nothing: {len(unheard)},"
        f" stored again after the promotion: {restored}\n"
        f"  upstream refresh requests by outcome: {dict(log)}; sellers by status {dict(statuses)}"
    )
    assert set(reads.statuses()) <= {200, 503}, reads.statuses()
    assert max(again) <= SERVE_AGAIN_SECONDS
    assert log == {"ok": SELLERS}  # each exactly once, and no spent token ever sent
    for s, row in holding.items():  # what the promoted primary holds is what Mercado Pago issued
        issued = live[str(row["mp_user_id"])]["refresh_token_fingerprint"]
        assert row["refresh_fingerprint"] == issued, s
    assert statuses == {"linked": SELLERS}
    if pair.synchronous:
        assert restored == 0  # nothing acknowledged was ever lost
    else:
        # What the replica had not heard was lost with the primary (some of it may have been
        # in flight to it), and each lost rotation was stored again, none twice.
        assert 0 < restored <= len(unheard)
