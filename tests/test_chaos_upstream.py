"""Upstream chaos: Mercado Pago slow, timing out, failing and rate limiting during a refresh
wave of thousands of sellers, then healthy again.

One `broker refresher` process (concurrency cap and request rate configured) faces a wave of
due sellers while the simulator goes through phases: slow but in time, slower than the
deadline, 503s, 500s, 429 `local_rate_limited`, then healthy. An API replica serves reads of
the same sellers throughout.

The simulator's request log has no timestamps and no in-flight count, so the test puts a
probe between the broker and the simulator (`MP_TOKEN_URL` points at it): a pass-through ASGI
app that notes when each token request arrived, when it was answered or abandoned (the broker
hung up at its deadline), its status and the seller (the user id that ends the simulator's
refresh tokens; the token itself is not kept). From that: requests per second, requests in
flight, and each seller's sequence of attempts (backoff). Run with `-s` for the figures
(docs/RELIABILITY.md, "Upstream").
"""

from __future__ import annotations

import asyncio
import itertools
import random
import signal
import socket
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import asyncpg
import httpx
import pytest
import uvicorn

from service.core.config import Settings
from service.core.crypto import context
from service.ops.cli import QuietServer
from service.simulator.state import fingerprint as simulator_fingerprint
from tests.support import Simulator, busiest, create_api_key, seed_sellers, settings_keyring
from tests.support.processes import api_process, broker_process, enter_all, env_for, free_port

pytestmark = pytest.mark.chaos

T = TypeVar("T")
SELLERS = 2000
CONCURRENCY = 16
# BROKER_REFRESH_RATE_PER_SECOND: low enough to bind on a 2-core machine (without its limiter
# the refresher sends over 250 requests/s there), so the check below can fail.
RATE = 100.0
# MP_TIMEOUT_SECONDS: far above the slow phase's latency and the simulator's lag on a busy
# machine; a reply later than it would (rightly) end as a lost rotation, not a refresh.
TIMEOUT = 2.0
LIFETIME = 3600  # the seeded tokens stay valid for the whole test
BUCKET = 1.0  # the refresher's token bucket at RATE >= 1: one send at once, then 1/RATE s apart
# How much later than it left the limiter a request may be seen arriving at the probe (two
# event loops on a busy 2-core machine): the requests a conforming sender may seem ahead by.
LAG = 0.2

# (name, seconds, fault plan). A reply held back by latency reads the plan current when it
# wakes up: every phase after a slow one fails for longer than that latency, so no request
# is processed (rotated) after the broker gave up on it.
PHASES: list[tuple[str, float, dict[str, Any]]] = [
    ("slow", 1.5, {"latency_ms": 500}),  # answers well within the 2 s deadline
    ("timeouts", 2.0, {"latency_ms": 2500, "status": 503}),  # past the deadline
    # Longer: the slots stay taken by timing-out requests for up to 2 s into it.
    ("503", 3.5, {"status": 503}),
    ("500", 1.5, {"status": 500}),
    ("429", 1.5, {"rate_limited": True}),
]


# -- the probe between the broker and Mercado Pago -----------------------------------------------


@dataclass
class Sent:
    phase: str
    user: int | None
    start: float  # when the whole request had arrived
    end: float = 0.0  # answered, or the broker hung up (its deadline passed)
    status: int | None = None  # None: abandoned by the broker before the reply
    upstream_end: float = 0.0  # when Mercado Pago was done with it (also if abandoned)

    @property
    def broker_end(self) -> float:
        """When the broker stopped waiting: at the reply, and never after its own deadline
        (it starts before the request leaves, so an abandoned request ends by start + T)."""
        return self.end if self.status is not None else min(self.end, self.start + TIMEOUT)


@dataclass
class Probe:
    target: str
    phase: str = "start"
    wall: float = field(default_factory=lambda: time.time() - time.monotonic())
    requests: list[Sent] = field(default_factory=list)
    forwards: set[asyncio.Task[httpx.Response]] = field(default_factory=set)
    http: httpx.AsyncClient = field(
        default_factory=lambda: httpx.AsyncClient(
            timeout=30, limits=httpx.Limits(max_connections=500)
        )
    )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        user = None
        refresh_token = dict(parse_qsl(body.decode())).get("refresh_token", "")
        if refresh_token.startswith("TG-"):
            user = int(refresh_token.rsplit("-", 1)[1])  # the simulator's tokens end in it
        sent = Sent(self.phase, user, time.monotonic())
        self.requests.append(sent)
        headers = {
            k.decode(): v.decode()
            for k, v in scope["headers"]
            if k.lower() in (b"content-type", b"accept")
        }
        forward = asyncio.create_task(
            self.http.post(f"{self.target}{scope['path']}", content=body, headers=headers)
        )
        self.forwards.add(forward)  # Mercado Pago goes on with it even if the broker hangs up

        def done(task: asyncio.Task[httpx.Response]) -> None:
            self.forwards.discard(task)
            sent.upstream_end = time.monotonic()

        forward.add_done_callback(done)
        hangup = asyncio.create_task(receive())  # http.disconnect once the broker gives up
        try:
            await asyncio.wait({forward, hangup}, return_when=asyncio.FIRST_COMPLETED)
            if forward.done():
                reply = forward.result()
                content_type = reply.headers.get("content-type", "application/json")
                await send(
                    {
                        "type": "http.response.start",
                        "status": reply.status_code,
                        "headers": [(b"content-type", content_type.encode())],
                    }
                )
                await send({"type": "http.response.body", "body": reply.content})
                sent.status = reply.status_code
        finally:
            sent.end = time.monotonic()
            hangup.cancel()

    async def drain(self) -> None:
        await asyncio.gather(*self.forwards, return_exceptions=True)
        await self.http.aclose()

    # -- figures ------------------------------------------------------------------------------

    def in_flight(self, broker_view: bool = True) -> int:
        """Most requests in flight at once: as the broker had them (abandoned ones end at its
        deadline), or as Mercado Pago had them (until it answered or saw the hang-up)."""
        edges = []
        for r in self.requests:
            edges += [(r.start, 1), (r.broker_end if broker_view else r.upstream_end, -1)]
        peak = current = 0
        for _, step in sorted(edges):  # an end sorts before a start at the same instant
            current += step
            peak = max(peak, current)
        return peak

    def busiest(self, window: float, phase: str | None = None) -> int:
        """Most requests that arrived within any `window` seconds (of one phase)."""
        return busiest((r.start for r in self.requests if phase in (None, r.phase)), window)

    def over_rate(self) -> float:
        """How far the arrivals ran ahead of a token bucket of RATE per second holding BUCKET
        (the refresher's own limiter), in requests: replayed over what the probe saw."""
        tokens, deficit, previous = BUCKET, 0.0, None
        for t in sorted(r.start for r in self.requests):
            if previous is not None:
                tokens = min(BUCKET, tokens + (t - previous) * RATE)
            previous = t
            tokens -= 1
            deficit = max(deficit, -tokens)
        return deficit


@asynccontextmanager
async def serving(app: Any) -> AsyncIterator[str]:
    sock = socket.socket()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    server = QuietServer(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started or task.done():
                break
            await asyncio.sleep(0.01)
        assert server.started, "the probe did not start"
        host, port = sock.getsockname()
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        await task
        sock.close()


# -- helpers ---------------------------------------------------------------------------------


async def stop_together(processes: list[asyncio.subprocess.Process]) -> None:
    """SIGINT every process still running at once; their context managers then only reap."""
    running = [p for p in processes if p.returncode is None]
    for process in running:
        process.send_signal(signal.SIGINT)
    await asyncio.gather(*(asyncio.wait_for(p.wait(), 30) for p in running), return_exceptions=True)


async def backoffs_now(sql: asyncpg.Connection, probe: Probe) -> list[tuple[int, str, float]]:
    """(failures, error, seconds) of every seller backing off now: how long after the reply to
    its last request (seen by the probe) it is due again."""
    taken = time.monotonic()
    rows = await sql.fetch(
        "SELECT mp_user_id, refresh_failures, last_refresh_error, "
        "extract(epoch FROM next_refresh_at) AS due FROM sellers "
        "WHERE refresh_failures > 0 AND version = 1 AND lease_owner IS NULL"
    )
    last: dict[int | None, Sent] = {}
    for r in probe.requests:
        if r.start < taken:
            last[r.user] = r
    return [
        (
            row["refresh_failures"],
            row["last_refresh_error"],
            float(row["due"]) - (last[row["mp_user_id"]].broker_end + probe.wall),
        )
        for row in rows
    ]


@dataclass
class Reads:
    """Bounded reads of the wave's sellers through the API replica, without min_ttl."""

    http: httpx.AsyncClient
    url: str
    sellers: list[str]
    replies: Counter[int] = field(default_factory=Counter)
    warned: int = 0  # served with Broker-Token-Warning: refresh-failing
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def reader(self) -> None:
        for _ in range(50_000):
            if self.stop.is_set():
                return
            try:
                reply = await self.http.get(
                    f"{self.url}/sellers/{random.choice(self.sellers)}/token"
                )
            except httpx.TransportError:
                self.replies[0] += 1
                continue
            self.replies[reply.status_code] += 1
            if reply.status_code == 200:
                assert reply.json()["access_token"]
                if reply.headers.get("broker-token-warning") == "refresh-failing":
                    self.warned += 1
            await asyncio.sleep(0.05)


# -- the test ----------------------------------------------------------------------------------


async def test_a_refresh_wave_through_an_upstream_outage_stays_capped_and_catches_up(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    sellers = await seed_sellers(sql, simulator, settings, SELLERS, expires_in=LIFETIME, due=False)
    api_key = await create_api_key(database_url)
    sockets[0].close()
    probe = Probe(simulator.url)
    env = {
        "MP_TIMEOUT_SECONDS": str(TIMEOUT),
        "BROKER_REFRESH_CONCURRENCY": str(CONCURRENCY),
        "BROKER_REFRESH_RATE_PER_SECOND": str(RATE),
        "BROKER_BACKOFF_BASE_SECONDS": "1",
        "BROKER_BACKOFF_MAX_SECONDS": "4",
        "BROKER_REFRESH_POLL_SECONDS": "0.2",
    }
    port = free_port()
    timeline: dict[str, float] = {}
    backoffs: list[tuple[int, str, float]] = []
    async with AsyncExitStack() as stack:
        stack.push_async_callback(probe.drain)
        probe_url = await stack.enter_async_context(serving(probe))
        via_probe = settings.model_copy(update={"mp_token_url": f"{probe_url}/oauth/token"})
        http = await stack.enter_async_context(
            httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
        )
        replica, refresher = await enter_all(
            stack,
            api_process(via_probe, database_url, port, tmp_path / "api.log", **env),
            broker_process(
                ["refresher"],
                env_for(via_probe, database_url, **env),
                None,
                tmp_path / "refresher.log",
            ),
        )
        stack.push_async_callback(stop_together, [replica, refresher])
        reads = Reads(http, f"http://127.0.0.1:{port}", sellers)
        readers = [asyncio.create_task(reads.reader()) for _ in range(2)]
        await simulator.faults(**PHASES[0][2])
        probe.phase = PHASES[0][0]
        # The wave: every seller due at once, while reads are being served.
        await sql.execute("UPDATE sellers SET next_refresh_at = now() - interval '1 second'")
        started = time.monotonic()
        try:
            for n, (name, seconds, _) in enumerate(PHASES):
                timeline[name] = time.monotonic() - started
                await asyncio.sleep(seconds)
                if n + 1 < len(PHASES):
                    await simulator.faults(**PHASES[n + 1][2])
                    probe.phase = PHASES[n + 1][0]
                if name == "500":  # the backoffs chosen after the fast failures
                    backoffs = await backoffs_now(sql, probe)
            await simulator.faults()  # healthy
            probe.phase = "healthy"
            recovered = time.monotonic()
            timeline["healthy"] = recovered - started
            for _ in range(1200):  # 120 s at most
                done = await sql.fetchval("SELECT count(*) FROM sellers WHERE version = 2")
                if done == SELLERS:
                    break
                await asyncio.sleep(0.25)
            caught_up = time.monotonic() - recovered
            await asyncio.sleep(1.0)  # a second refresh of anyone would show up meanwhile
        finally:
            reads.stop.set()
            await asyncio.gather(*readers, return_exceptions=True)
    await asyncio.gather(*readers)  # a failed assertion inside a reader fails the test

    # -- figures ----------------------------------------------------------------------------
    by_phase: dict[str, Counter[str]] = {}
    for r in probe.requests:
        outcome = str(r.status) if r.status is not None else "abandoned"
        by_phase.setdefault(r.phase, Counter())[outcome] += 1
    print(f"\n== upstream chaos: {SELLERS} due sellers, cap {CONCURRENCY}, rate {RATE:g}/s ==")
    for name, at in timeline.items():
        print(
            f"  {at:6.2f} s  {name:9} busiest 1 s: {probe.busiest(1.0, name):3} requests,"
            f" by outcome {dict(by_phase.get(name, {}))}"
        )
    print(
        f"  caught up {caught_up:.2f} s after the upstream recovered;"
        f" {len(probe.requests)} token requests in all"
    )
    print(
        f"  busiest 1 s: {probe.busiest(1.0)} requests, busiest 5 s: {probe.busiest(5.0)}, "
        f"ahead of a {RATE:g}/s bucket by {probe.over_rate():.1f} requests at most; "
        f"in flight at most {probe.in_flight()} (Mercado Pago's view: "
        f"{probe.in_flight(broker_view=False)})"
    )
    print(f"  replica reads: {dict(reads.replies)}, {reads.warned} flagged refresh-failing")
    for failures in sorted({f for f, _, _ in backoffs}):
        chosen = [seconds for f, _, seconds in backoffs if f == failures]
        print(
            f"  backoff after failure #{failures}: {len(chosen)} sellers,"
            f" {min(chosen):.2f}..{max(chosen):.2f} s, stdev {statistics.pstdev(chosen):.2f}"
        )

    # -- the upstream saw at most the configured rate, and at most the cap at once -----------
    for window in (1.0, 5.0):
        assert probe.busiest(window) <= BUCKET + RATE * (window + LAG), window
    assert probe.over_rate() <= RATE * LAG
    assert probe.in_flight() <= CONCURRENCY
    assert probe.in_flight() == CONCURRENCY  # the slow phase filled every slot
    # -- every phase was really seen by the broker ----------------------------------------------
    assert by_phase.get("slow", Counter())["200"] > 0
    assert by_phase.get("timeouts", Counter())["abandoned"] > 0
    assert by_phase.get("500", Counter())["500"] > 0
    assert by_phase.get("503", Counter())["503"] > 0
    assert by_phase.get("429", Counter())["429"] > 0
    # -- backoff with jitter, and only a not-sent request (429) is sent again at once ----------
    fast = [b for b in backoffs if b[1] in ("internal_server_error", "service_unavailable")]
    assert len(fast) > 50
    for failures, error, seconds in fast:
        ceiling = min(4, 2**failures)  # BROKER_BACKOFF_BASE_SECONDS * 2^failures, capped at 4
        # Measured from the reply the probe sent; the broker reads its clock a little later
        # (after a row lock and, on a busy machine, its event loop's lag).
        assert ceiling / 2 - 0.05 <= seconds <= ceiling + 1.0, (failures, error, seconds)
    first = [seconds for failures, _, seconds in fast if failures == 1]
    assert statistics.pstdev(first) > 0.15  # spread over [1, 2] s, not one instant
    attempts: dict[int, list[Sent]] = {}
    for r in probe.requests:
        assert r.user is not None
        attempts.setdefault(r.user, []).append(r)
    for user, sends in attempts.items():
        resends = 0
        for previous, following in itertools.pairwise(sends):
            gap = following.start - previous.broker_end
            if previous.status == 429 and gap < 0.9:
                resends += 1  # not sent, so sent again at once: at most twice per claim
                assert resends <= 2, (user, [(s.phase, s.status) for s in sends])
            else:
                resends = 0
                assert gap >= 0.9, (user, previous, following)  # backed off at least 1 s
    # -- caught up: every seller refreshed exactly once, no grant burnt --------------------------
    assert done == SELLERS
    grants = (await simulator.http.get("/_control/grants")).json()
    assert Counter(g["refreshes"] for g in grants.values()) == {1: SELLERS}
    outcomes = Counter(e["outcome"] for e in await simulator.log())
    assert outcomes["ok"] == SELLERS
    assert "invalid_grant" not in outcomes
    ring = settings_keyring(settings)
    rows = await sql.fetch("SELECT * FROM sellers")
    assert Counter((r["status"], r["version"], r["refresh_failures"]) for r in rows) == {
        ("linked", 2, 0): SELLERS
    }
    for row in rows:
        token = ring.open(
            row["refresh_token"],
            context("sellers", row["seller_id"], "refresh_token", row["client_id"]),
        )
        live = grants[str(row["mp_user_id"])]["refresh_token_fingerprint"]
        assert simulator_fingerprint(token) == live
    # -- tokens still valid were served throughout --------------------------------------------
    assert set(reads.replies) == {200}, reads.replies
    assert reads.replies[200] > 100
    assert reads.warned > 0  # the replica told its callers that refreshing was failing
