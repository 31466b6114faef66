"""SIGTERM during load: in-flight work finishes, leases are given back, a replacement goes on."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from pathlib import Path

import asyncpg
import httpx
import pytest

from service.core.config import Settings
from tests.support import Simulator, create_api_key, seed_sellers
from tests.support.processes import api_process, broker_process, env_for, free_port

pytestmark = pytest.mark.chaos

WAVE = 300


async def refreshed(sql: asyncpg.Connection) -> int:
    count: int = await sql.fetchval("SELECT count(*) FROM sellers WHERE version = 2")
    return count


async def test_sigterm_mid_wave_releases_leases_and_a_replacement_picks_up_at_once(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    sellers = await seed_sellers(sql, simulator, settings, WAVE, expires_in=86400, due=True)
    await simulator.faults(latency_ms=100)
    api_key = await create_api_key(database_url)
    sockets[0].close()
    port = free_port()
    slow = {"BROKER_REFRESH_CONCURRENCY": "8", "BROKER_REFRESH_RATE_PER_SECOND": "40"}
    env = env_for(settings, database_url, **slow)
    reads: list[int] = []
    unthrottled = {"BROKER_RATE_LIMIT_PER_KEY_PER_SECOND": "1000000"}  # reads as fast as served
    async with (
        api_process(settings, database_url, port, tmp_path / "api.log", **unthrottled),
        httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as http,
    ):
        stop_reading = asyncio.Event()

        async def read() -> None:
            for n in range(10_000):  # bounded
                if stop_reading.is_set():
                    return
                reply = await http.get(f"http://127.0.0.1:{port}/sellers/{sellers[n % WAVE]}/token")
                reads.append(reply.status_code)

        reader = asyncio.create_task(read())
        async with broker_process(["refresher"], env, None, tmp_path / "r1.log") as first:
            for _ in range(300):  # at most 30 s: let the wave get going
                if await refreshed(sql) >= 40:
                    break
                await asyncio.sleep(0.1)
            first.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(first.wait(), 30) == 0
        done_by_first = await refreshed(sql)
        assert 40 <= done_by_first < WAVE
        # Nothing it claimed is left leased: in-flight refreshes stored, the rest given back.
        assert await sql.fetchval("SELECT count(*) FROM sellers WHERE lease_owner IS NOT NULL") == 0
        assert (
            await sql.fetchval("SELECT count(*) FROM sellers WHERE attempt_outcome = 'sent'") == 0
        )

        async with broker_process(["refresher"], env, None, tmp_path / "r2.log"):
            # From the moment it says it started (its interpreter's start-up is no part of the
            # claim, and on a loaded machine it took seconds): it claims at once, not after a
            # lease (60 s) and its late-reply grace lapse.
            started = time.monotonic()
            for _ in range(300):  # at most 15 s, so that a miss says how long it took
                if await refreshed(sql) > done_by_first:
                    break
                await asyncio.sleep(0.05)
            picked_up = time.monotonic() - started
            for _ in range(600):  # at most 60 s for the rest of the wave
                if await refreshed(sql) == WAVE:
                    break
                await asyncio.sleep(0.1)
        stop_reading.set()
        await reader
    assert await refreshed(sql) == WAVE
    grants = (await simulator.http.get("/_control/grants")).json()
    assert sorted(g["refreshes"] for g in grants.values()) == [1] * WAVE  # exactly once
    assert reads
    assert set(reads) == {200}  # valid tokens served throughout
    assert picked_up < 5.0, f"the replacement took {picked_up:.1f} s"  # far below the lease
    print(
        f"\nSIGTERM mid-wave: first refresher did {done_by_first}/{WAVE}, exited 0, no lease "
        f"left; replacement refreshing {picked_up:.1f} s after it started; "
        f"{len(reads)} reads served, all 200"
    )


async def test_sigterm_lets_every_request_in_flight_finish(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    sellers = await seed_sellers(sql, simulator, settings, 20, expires_in=3600, due=False)
    await simulator.faults(latency_ms=800)  # every read below waits on a refresh upstream
    api_key = await create_api_key(database_url)
    sockets[0].close()
    port = free_port()
    async with (
        api_process(settings, database_url, port, tmp_path / "api.log") as process,
        httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as http,
    ):
        in_flight = [
            asyncio.create_task(
                http.get(
                    f"http://127.0.0.1:{port}/sellers/{seller}/token", params={"min_ttl": 7200}
                )
            )
            for seller in sellers
        ]
        for _ in range(200):  # bounded: until the refreshes are at the simulator
            if await simulator.token_requests("refresh_token") >= len(sellers):
                break
            await asyncio.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        replies = await asyncio.gather(*in_flight)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    assert [r.status_code for r in replies] == [200] * len(sellers)
    assert await sql.fetchval("SELECT count(*) FROM sellers WHERE version = 2") == len(sellers)
    assert await sql.fetchval("SELECT count(*) FROM sellers WHERE lease_owner IS NOT NULL") == 0


async def test_sigterm_lets_a_background_refresh_inside_serve_store_its_pair(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    """No request waits on this refresh, so uvicorn would not: only the process owning the
    task keeps Mercado Pago's new pair, rotated and on its way, from being lost at exit."""
    [seller] = await seed_sellers(sql, simulator, settings, 1, expires_in=86400, due=True)
    await simulator.faults(after_rotate="hold", count=1)
    sockets[0].close()
    log = tmp_path / "api.log"
    async with api_process(
        settings, database_url, free_port(), log, BROKER_SERVE_REFRESHER="true"
    ) as process:
        await simulator.wait_until_held()  # the refresher inside serve sent it; held
        process.send_signal(signal.SIGTERM)
        for _ in range(300):  # bounded (15 s): until shutdown waits on the refresh it owns
            if "shutdown.draining" in log.read_text():
                break
            await asyncio.sleep(0.05)
        assert "shutdown.draining" in log.read_text()
        assert process.returncode is None
        await simulator.release()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    row = await sql.fetchrow(
        "SELECT version, status, lease_owner FROM sellers WHERE seller_id = $1", seller
    )
    assert (row["version"], row["status"], row["lease_owner"]) == (2, "linked", None)
    assert await simulator.token_requests("refresh_token") == 1
