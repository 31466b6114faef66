"""Exactly once across processes: several brokers and refreshers on one database, the
simulator over real HTTP, every wait bounded."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
from pathlib import Path

import asyncpg
import httpx

from service.core.config import Settings
from tests.support import Simulator, create_api_key, seed_sellers
from tests.support.processes import api_process, broker_process, env_for, free_port

SIMULATED_LIFETIME = 3600


def refreshed_in(log: Path) -> list[str]:
    """The sellers whose new pair this process stored, from its JSON log lines."""
    sellers = []
    for line in log.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("event") in ("refresh.refreshed", "refresh.recovered"):
            sellers.append(entry["seller_id"])
    return sellers


async def test_fifty_reads_through_three_brokers_make_exactly_one_refresh(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    await simulator.http.post("/_control/config", json={"expires_in": SIMULATED_LIFETIME})
    [seller] = await seed_sellers(
        sql, simulator, settings, 1, expires_in=SIMULATED_LIFETIME, due=False
    )
    await simulator.faults(latency_ms=300)  # the refresh is in flight while reads pile up
    api_key = await create_api_key(database_url)
    sockets[0].close()
    ports = [free_port() for _ in range(3)]
    async with (
        api_process(settings, database_url, ports[0], tmp_path / "a.log"),
        api_process(settings, database_url, ports[1], tmp_path / "b.log"),
        api_process(settings, database_url, ports[2], tmp_path / "c.log"),
        httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as http,
    ):
        # Every token lives an hour; two hours are asked for: each read wants a refresh.
        replies = await asyncio.gather(
            *(
                http.get(
                    f"http://127.0.0.1:{ports[n % 3]}/sellers/{seller}/token",
                    params={"min_ttl": 7200},
                )
                for n in range(50)
            )
        )
    assert [r.status_code for r in replies] == [200] * 50
    assert len({r.json()["access_token"] for r in replies}) == 1
    assert await simulator.token_requests("refresh_token") == 1
    assert await sql.fetchval("SELECT version FROM sellers") == 2


async def test_two_refreshers_and_on_read_refreshes_refresh_a_thousand_sellers_once_each(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    # Not due yet: every process is up before the first seller comes due, so they all race.
    sellers = await seed_sellers(sql, simulator, settings, 1000, expires_in=3600, due=False)
    api_key = await create_api_key(database_url)
    sockets[0].close()
    port = free_port()
    fast = {"BROKER_REFRESH_RATE_PER_SECOND": "1000", "BROKER_REFRESH_CONCURRENCY": "32"}
    async with (
        broker_process(
            ["refresher"],
            env_for(settings, database_url, **fast),
            None,
            tmp_path / "r1.log",
        ),
        broker_process(
            ["refresher"],
            env_for(settings, database_url, **fast),
            None,
            tmp_path / "r2.log",
        ),
        api_process(settings, database_url, port, tmp_path / "api.log", **fast),
        httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as http,
    ):
        await sql.execute("UPDATE sellers SET next_refresh_at = now() - interval '1 second'")
        picked = random.sample(sellers, 200)
        for start in range(0, len(picked), 50):  # on-read refreshes racing the refreshers
            replies = await asyncio.gather(
                *(
                    http.get(
                        f"http://127.0.0.1:{port}/sellers/{seller}/token",
                        params={"min_ttl": 7200},
                    )
                    for seller in picked[start : start + 50]
                )
            )
            failed = [r.text for r in replies if r.status_code != 200]
            assert not failed, failed
        for _ in range(1200):  # at most 120 s
            if await sql.fetchval("SELECT count(*) FROM sellers WHERE version = 2") == 1000:
                break
            await asyncio.sleep(0.1)
        # The connection budget holds whatever the concurrency (docs/RUNBOOK.md): pools keep
        # what a wave opened, so this counts the most each refresher needed.
        opened = await sql.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'broker-refresher'"
        )
        assert opened <= 2 * (20 + settings.broker_db_direct_connections), opened
        print(f"\ntwo refreshers at concurrency 32 held {opened} connections")
    assert await sql.fetchval("SELECT count(*) FROM sellers WHERE version = 2") == 1000
    assert await sql.fetchval("SELECT count(*) FROM sellers WHERE status <> 'linked'") == 0
    grants = (await simulator.http.get("/_control/grants")).json()
    assert sorted(g["refreshes"] for g in grants.values()) == [1] * 1000
    outcomes = [e["outcome"] for e in await simulator.log() if e["grant_type"] == "refresh_token"]
    assert outcomes == ["ok"] * 1000
    # Shared, and still once: each seller's pair was stored by exactly one process, and every
    # process (both refreshers, and the replica's on-read refreshes) stored some.
    by_process = {name: refreshed_in(tmp_path / f"{name}.log") for name in ("r1", "r2", "api")}
    stored = sorted(s for refreshed in by_process.values() for s in refreshed)
    assert stored == sorted(sellers)
    shares = {name: len(refreshed) for name, refreshed in by_process.items()}
    print(f"refreshes stored per process: {shares}")
    assert all(shares.values()), shares


async def test_sigterm_waits_for_the_refresh_in_flight_to_store_its_pair(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    [seller] = await seed_sellers(sql, simulator, settings, 1, expires_in=3600, due=False)
    await simulator.faults(after_rotate="hold")
    api_key = await create_api_key(database_url)
    sockets[0].close()
    port = free_port()
    async with (
        api_process(settings, database_url, port, tmp_path / "api.log") as process,
        httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as http,
    ):
        read = asyncio.create_task(
            http.get(f"http://127.0.0.1:{port}/sellers/{seller}/token", params={"min_ttl": 7200})
        )
        await simulator.wait_until_held()
        process.send_signal(signal.SIGTERM)  # Mercado Pago has rotated; the reply is coming
        await simulator.release()
        reply = await read
        assert await asyncio.wait_for(process.wait(), 30) == 0
    assert reply.status_code == 200
    assert await sql.fetchval("SELECT version FROM sellers") == 2
