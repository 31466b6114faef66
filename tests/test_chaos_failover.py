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
import signal
import socket
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from service.core.config import Settings
from service.ops.cli import migrate
from tests.support import Simulator, create_api_key, seed_sellers, settings_keyring
from tests.support.balancer import Balancer
from tests.support.db import admin_connect, execute
from tests.support.processes import (
    api_process,
    broker_process,
    enter_all,
    env_for,
    free_port,
    run_cli,
)
from tests.support.replication import Pair
from tests.test_chaos_crash import grants, stored

pytestmark = pytest.mark.chaos

SELLERS = 240
RATE = 40  # refreshes a second: the wave lasts about 6 s
BEFORE_KILL = 60  # rotations stored before the primary dies
UNREPLICATED = 25  # asynchronous: rotations stored while the replica hears nothing
SERVE_AGAIN_SECONDS = 5.0
REFRESH = "refresh_token"


@pytest.fixture(params=[True, False], ids=["synchronous", "asynchronous"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    servers = Pair(synchronous=request.param)
    try:
        servers.start()
        yield servers
    finally:
        servers.close()


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


@dataclass
class Cluster:
    """The brokers on the pair, its sellers due, reads running (`up`)."""

    pair: Pair
    settings: Settings
    simulator: Simulator
    tmp_path: Path
    stack: AsyncExitStack
    sellers: list[str] = field(default_factory=list)
    processes: list[asyncio.subprocess.Process] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    async def up(self, sockets: tuple[socket.socket, socket.socket], **env: str) -> Balancer:
        primary = self.pair.primary.url("broker")
        await execute(self.pair.primary.url("postgres"), "CREATE DATABASE broker")
        await asyncio.to_thread(migrate, primary)
        sql = await admin_connect(primary)
        try:
            self.sellers = await seed_sellers(
                sql, self.simulator, self.settings, SELLERS, expires_in=3600, due=False
            )
        finally:
            await sql.close()
        api_key = await create_api_key(primary)
        sockets[0].close()
        self.env = {
            "BROKER_REFRESH_RATE_PER_SECOND": str(RATE),
            "BROKER_REFRESH_POLL_SECONDS": "0.2",
            **env,
        }
        ports = [free_port(), free_port()]
        self.processes = await enter_all(
            self.stack,
            *(
                api_process(self.settings, self.url, port, self.log(f"api-{n}"), **self.env)
                for n, port in enumerate(ports)
            ),
            self.refresher("refresher"),
        )
        http = await self.stack.enter_async_context(
            httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
        )
        reads = Balancer(http, self.sellers, [f"http://127.0.0.1:{port}" for port in ports])
        reads.start()
        self.stack.push_async_callback(reads.close)  # on the way out too (a failure)
        sql = await admin_connect(primary)
        await sql.execute("UPDATE sellers SET next_refresh_at = now() - interval '1 second'")
        await sql.close()

        async def rotated_before_kill() -> bool:
            return await count_rotated(self.simulator) >= BEFORE_KILL

        await until("the wave started", rotated_before_kill, 30)
        return reads

    @property
    def url(self) -> str:
        return self.pair.url("broker")

    def log(self, name: str) -> Path:
        return self.tmp_path / f"{name}.log"

    def refresher(self, name: str) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
        return broker_process(
            ["refresher"], env_for(self.settings, self.url, **self.env), None, self.log(name)
        )

    async def cut_replication(self) -> set[str]:
        """Asynchronous: stop the primary's WAL sender until UNREPLICATED more rotations were
        committed on the primary alone; the sellers the replica has not heard of. (Not the
        replica's receiver: what the sender had written would wait in the kernel's socket
        buffer and reach a resumed receiver after all.)"""
        sender = self.pair.primary.child("walsender")
        heard = await versions(self.pair.replica.url("broker"))
        before = await versions(self.pair.primary.url("broker"))
        os.kill(sender, signal.SIGSTOP)

        async def rotated_unheard() -> bool:
            now = await versions(self.pair.primary.url("broker"))
            return sum(now[s] > before[s] for s in self.sellers) >= UNREPLICATED

        await until("rotations the replica never heard of", rotated_unheard, 30)
        on_primary = await versions(self.pair.primary.url("broker"))
        return {s for s in self.sellers if on_primary[s] > heard[s]}

    async def settled(self) -> None:
        """Bounded wait until no linked seller is left unrefreshed and no lease is held."""

        async def done() -> bool:
            sql = await admin_connect(self.pair.replica.url("broker"))
            try:
                return not await sql.fetchval(
                    "SELECT count(*) FROM sellers WHERE (version < 2 AND status = 'linked')"
                    " OR lease_owner IS NOT NULL"
                )
            finally:
                await sql.close()

        await until("every seller refreshed or marked", done, 60)
        await asyncio.sleep(1.5)  # a second refresh would come within the refresher's polls

    def restored(self) -> int:
        return sum(
            path.read_text().count('"failover.restored"') for path in self.tmp_path.glob("*.log")
        )


@dataclass
class Outcome:
    """Every seller afterwards, against what Mercado Pago (the simulator) last issued."""

    silent: list[str]  # linked, but not holding the live refresh token
    marked: dict[str, str | None]  # relink_required: seller -> reason
    events: dict[str, str]  # seller.relink_required events: seller -> reason
    statuses: Counter[str]
    log: Counter[str]


async def outcome(cluster: Cluster) -> Outcome:
    live = await grants(cluster.simulator)
    ring = settings_keyring(cluster.settings)
    sql = await admin_connect(cluster.pair.replica.url("broker"))
    try:
        rows = [await stored(sql, ring, s) for s in cluster.sellers]
        events = await sql.fetch(
            "SELECT seller_id, data->>'reason' AS reason FROM events"
            " WHERE type = 'seller.relink_required'"
        )
    finally:
        await sql.close()
    return Outcome(
        silent=[
            row["seller_id"]
            for row in rows
            if row["status"] == "linked"
            and row["refresh_fingerprint"]
            != live[str(row["mp_user_id"])]["refresh_token_fingerprint"]
        ],
        marked={
            r["seller_id"]: r["status_reason"] for r in rows if r["status"] == "relink_required"
        },
        events={e["seller_id"]: e["reason"] for e in events},
        statuses=Counter(row["status"] for row in rows),
        log=Counter(
            e["outcome"]
            for e in await cluster.simulator.log()
            if e["grant_type"] == "refresh_token"
        ),
    )


async def test_a_failover_under_a_refresh_wave_loses_no_rotation(
    pair: Pair,
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    tmp_path: Path,
) -> None:
    async with AsyncExitStack() as stack:
        cluster = Cluster(pair, settings, simulator, tmp_path, stack)
        reads = await cluster.up(sockets)
        unheard = set() if pair.synchronous else await cluster.cut_replication()
        await asyncio.to_thread(pair.primary.kill)
        killed_at = time.monotonic()
        await asyncio.to_thread(pair.replica.promote)
        promoted_at = time.monotonic()
        await cluster.settled()
        await reads.close()
        after = await outcome(cluster)
        restored = cluster.restored()
        for process in cluster.processes:
            assert process.returncode is None  # no process died of it

    mode = "synchronous" if pair.synchronous else "asynchronous"
    again = [reads.serving_again(backend, promoted_at) for backend in reads.backends]
    print(
        f"\n== failover, {mode} replication ==\n"
        f"  promoted {promoted_at - killed_at:.2f} s after the kill; replicas serving again"
        f" {', '.join(f'{s:.2f}' for s in again)} s after the promotion\n"
        f"  reads by status: {dict(reads.statuses())}\n"
        f"  rotations stored while the replica heard nothing: {len(unheard)},"
        f" stored again after the promotion: {restored}\n"
        f"  upstream refresh requests by outcome: {dict(after.log)};"
        f" sellers by status {dict(after.statuses)}"
    )
    assert set(reads.statuses()) <= {200, 503}, reads.statuses()
    assert max(again) <= SERVE_AGAIN_SECONDS
    assert after.log == {"ok": SELLERS}  # each exactly once, and no spent token ever sent
    assert after.silent == []  # what the promoted primary holds is what Mercado Pago issued
    assert after.statuses == {"linked": SELLERS}
    if pair.synchronous:
        assert restored == 0  # nothing acknowledged was ever lost
    else:
        # What the replica had not heard was lost with the primary (some of it may have been
        # in flight to it), and each lost rotation was stored again, none twice.
        assert 0 < restored <= len(unheard)


@pytest.mark.parametrize("pair", [False], ids=["asynchronous"], indirect=True)
async def test_a_refresher_killed_with_the_primary_leaves_its_lost_rotations_to_the_runbook(
    pair: Pair,
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    tmp_path: Path,
) -> None:
    """The same host took the primary and the refresher with it: the rotations the refresher
    stored in the lost window exist nowhere. The runbook (docs/RELIABILITY.md, "Failover
    runbook"): pause, `broker sellers mark-restored`, a refresher, resume. Every seller whose
    rotation was lost ends `relink_required` / `rotation_lost` with its event; 0 silent."""
    async with AsyncExitStack() as stack:
        cluster = Cluster(pair, settings, simulator, tmp_path, stack)
        # The re-validation sends every lost seller's spent token: that burst is the runbook's
        # to expect (it closes the breaker by hand); here the breaker waits it out.
        reads = await cluster.up(sockets, BROKER_BREAKER_INVALID_GRANT_THRESHOLD="1000")
        unheard = await cluster.cut_replication()
        victim = cluster.processes[2]
        victim.kill()
        await asyncio.gather(victim.wait(), asyncio.to_thread(pair.primary.kill))
        await asyncio.to_thread(pair.replica.promote)
        # Lost: rotated at Mercado Pago, unknown to the promoted primary (in the window the
        # replica missed, or in flight when the refresher died). Nothing refreshes until the
        # runbook's refresher: this is the set it must mark, exactly.
        lost = set((await outcome(cluster)).silent)
        env = env_for(settings, cluster.url, **cluster.env)
        for command in (
            ("refresher", "pause", "--reason", "failover"),
            ("sellers", "mark-restored", "--spread-minutes", "0.1"),
        ):
            code, out, err = await run_cli(*command, env=env)
            assert code == 0, out + err
        await stack.enter_async_context(cluster.refresher("replacement"))
        code, out, err = await run_cli("refresher", "resume", env=env)
        assert code == 0, out + err
        await cluster.settled()
        await reads.close()
        after = await outcome(cluster)

    print(
        f"\n== failover, asynchronous, the refresher killed with the primary ==\n"
        f"  rotations stored while the replica heard nothing: {len(unheard)}; lost after the"
        f" promotion: {len(lost)}; after the runbook: {len(after.marked)} relink_required"
        f" {dict(Counter(after.marked.values()))},"
        f" {dict(after.statuses)}\n"
        f"  reads by status: {dict(reads.statuses())};"
        f" upstream refresh requests by outcome: {dict(after.log)}"
    )
    assert lost  # the kill lost some for sure
    assert after.silent == []
    assert set(after.marked) == lost  # every lost one, and none but them
    assert set(after.marked.values()) == {"rotation_lost"}
    assert after.events == after.marked  # each with its event
    assert set(reads.statuses()) <= {200, 503}, reads.statuses()
