"""Shutdown is bounded: owned work that cannot finish never holds a process past its budget."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from pathlib import Path

import asyncpg
import pytest

from service.core.config import Settings
from tests.support import Simulator, seed_sellers
from tests.support.processes import broker_process, env_for

pytestmark = pytest.mark.chaos

BUDGET = 4.0  # BROKER_SHUTDOWN_SECONDS for this test (15 by default)
SLACK = 5.0  # the interpreter's own exit, on a 2-core machine running a parallel suite


async def test_a_store_that_cannot_land_holds_shutdown_no_longer_than_its_budget(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    [seller] = await seed_sellers(sql, simulator, settings, 1, expires_in=3600, due=True)
    await simulator.faults(after_rotate="hold")
    env = env_for(settings, database_url, BROKER_SHUTDOWN_SECONDS=str(BUDGET))
    log = tmp_path / "refresher.log"
    async with broker_process(["refresher"], env, None, log) as process:
        await simulator.wait_until_held()  # claimed and sent: Mercado Pago has rotated
        async with sql.transaction():
            # The row is held, so the store of the reply about to arrive waits on it.
            await sql.execute("SELECT 1 FROM sellers WHERE seller_id = $1 FOR UPDATE", seller)
            await simulator.release()
            for _ in range(200):  # bounded: until the store waits on the row
                waiting = await sql.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND application_name = 'broker-refresher'"
                )
                if waiting:
                    break
                await asyncio.sleep(0.025)
            assert waiting, "the store never waited on the held row"
            loop = asyncio.get_running_loop()
            signalled = loop.time()
            process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(process.wait(), BUDGET + 10)
            took = loop.time() - signalled
    assert code == 0
    assert took <= BUDGET + SLACK, f"shutdown took {took:.1f} s against a {BUDGET} s budget"
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    events = {line.get("event"): line for line in lines}
    assert events["shutdown.undrained"]["in_flight"] == 1
    assert events["shutdown.done"]["seconds"] <= BUDGET + 0.5  # + terminating the pool
    print(f"shutdown with a stuck store: {took:.2f} s (budget {BUDGET} s)")
