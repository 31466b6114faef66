"""Process crash: `kill -9` at each step of a refresh, each point reached deterministically.

One test per point. At each point two victims are killed together: a `broker refresher`
refreshing a due seller in the background (seller R), and a `broker serve` replica refreshing
another seller on read, `GET /sellers/{id}/token?min_ttl=...` (seller A). A third process, the
surviving replica, serves reads of other sellers throughout and is the next on-read caller; a
replacement `broker refresher` starts right after the kill, as a supervisor would restart one.

- before_send: both claims have committed (lease and attempt record, one transaction) and
  nothing has been sent. The victim refresher is parked by its rate limiter (0.05 requests/s:
  its first send would wait 19 s, past its lease). The victim replica's refresh waits for the one
  statement between its claim and the POST, the breaker check, on app_breakers, which the test
  holds locked (`LOCK TABLE ... ACCESS EXCLUSIVE`; the on-read claim does not read it; pg_locks
  shows the wait). The simulator has received no refresh request.
- after_rotate: the simulator has rotated the refresh token and holds its reply
  (`after_rotate="hold"`); the broker, still within its deadline, never hears of the new pair.
- at_commit: the reply arrived and the store's commit waits on an advisory lock the test holds
  (a deferred constraint trigger installed in this test's database, which PostgreSQL runs at
  commit time). Killed there, the client is gone but PostgreSQL has the statement: the commit
  lands once the lock is released. A kill after the commit was acknowledged leaves the same
  database state.

Afterwards, for every seller: the refresh token the broker holds is the one the simulator
last issued (same fingerprint), or the seller is `relink_required` with a reason and a
`seller.relink_required` event was delivered. Nobody is left silently broken. Run with `-s` to
see the figures (docs/RELIABILITY.md, "Process crash").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import asyncpg
import httpx
import pytest
from fastapi import FastAPI, Request, Response

from service.core.config import Settings
from service.core.crypto import Keyring, context, fingerprint
from service.lifecycle.sellers import STORE_HEALTHY
from service.refresh import owners
from service.simulator.state import fingerprint as simulator_fingerprint
from tests.support import Loopback, Simulator, create_api_key, seed_sellers, settings_keyring
from tests.support.processes import api_process, broker_process, enter_all, env_for, free_port

pytestmark = pytest.mark.chaos

T = TypeVar("T")
Point = Literal["before_send", "after_rotate", "at_commit"]

HOLD_KEY = 7_270_001  # the advisory lock the test holds to stop a victim at a known step
LIFETIME = 3600  # seeded tokens: valid for an hour, so min_ttl=7200 asks for a refresh
MIN_TTL = 7200
# MP_TIMEOUT_SECONDS per point. A held reply is "after the rotation, before the commit" only
# while the broker still waits for it: there the deadline leaves the test seconds to kill.
# Elsewhere the victims wait on a database lock, and a shorter deadline keeps the lease short
# (not too short: a healthy reply that came too late would be a lost rotation).
TIMEOUTS: dict[Point, int] = {"before_send": 2, "after_rotate": 3, "at_commit": 2}


def lease_seconds(point: Point) -> int:
    # Start-up refuses less than timeout + 6; a send needs timeout + 5 s of lease left, so
    # 2 s for the claim, the breaker check and the attempt record on a busy machine.
    return TIMEOUTS[point] + 5 + 2


SECRET = "chaos-receiver-secret-0123"
REPLICA_SELLERS = 10  # sellers the surviving replica serves throughout


def victim_refresher_env(point: Point) -> dict[str, str]:
    if point == "before_send":
        # Its first send waits 1 / (0.05 x 0.98) - 1 = 19.4 s for the rate limiter (the rate
        # less its headroom, engine.RateLimiter), longer than the lease (then refused as
        # lease_too_short): it is parked between claim and POST.
        return {"BROKER_REFRESH_RATE_PER_SECOND": "0.05"}
    return {}


def broker_env(point: Point, receiver_url: str, *, defaults: bool = False) -> dict[str, str]:
    """The brokers' settings; with `defaults`, the deadline, lease and poll are the shipped
    ones (MP_TIMEOUT_SECONDS 10, BROKER_LEASE_SECONDS 60, BROKER_REFRESH_POLL_SECONDS 1)."""
    env = {
        "BROKER_BACKOFF_BASE_SECONDS": "1",
        "BROKER_BACKOFF_MAX_SECONDS": "4",
        "BROKER_EVENT_SUBSCRIBERS": json.dumps(
            [{"name": "chaos", "url": f"{receiver_url}/events", "secret": SECRET}]
        ),
    }
    if defaults:
        return env
    return env | {
        "MP_TIMEOUT_SECONDS": str(TIMEOUTS[point]),
        "BROKER_LEASE_SECONDS": str(lease_seconds(point)),
        "BROKER_REFRESH_POLL_SECONDS": "0.2",
    }


# -- helpers ---------------------------------------------------------------------------------


@dataclass
class Receiver:
    """An internal service receiving the broker's events."""

    events: list[dict[str, Any]] = field(default_factory=list)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.post("/events")
        async def receive(request: Request) -> Response:
            self.events.append(json.loads(await request.body()))
            return Response(status_code=204)

        return app

    def of(self, seller_id: str, type_: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["seller_id"] == seller_id and e["type"] == type_]


@dataclass
class ReplicaLoad:
    """A bounded read loop against the surviving replica, for sellers nobody refreshes."""

    http: httpx.AsyncClient
    url: str
    sellers: list[str]
    replies: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, status)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        for n in range(20_000):  # bounded in count as well as by `stop`
            if self.stop.is_set():
                return
            seller = self.sellers[n % len(self.sellers)]
            try:
                status = (await self.http.get(f"{self.url}/sellers/{seller}/token")).status_code
            except httpx.TransportError:
                status = 0  # no answer at all
            self.replies.append((time.monotonic(), status))
            await asyncio.sleep(0.02)

    def statuses(self, start: float = 0.0, end: float = float("inf")) -> Counter[int]:
        return Counter(status for t, status in self.replies if start <= t < end)


async def settle(task: asyncio.Task[Any]) -> None:
    """On the way out (also after a failure): no task of the test is left running."""
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # its outcome was asserted elsewhere


async def stop_together(processes: list[asyncio.subprocess.Process]) -> None:
    """SIGINT every process still running at once; their context managers then only reap."""
    running = [p for p in processes if p.returncode is None]
    for process in running:
        process.send_signal(signal.SIGINT)
    await asyncio.gather(*(asyncio.wait_for(p.wait(), 30) for p in running), return_exceptions=True)


def resume(process: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):  # it has already exited
        process.send_signal(signal.SIGCONT)


async def stored(sql: asyncpg.Connection, ring: Keyring, seller_id: str) -> dict[str, Any]:
    row = await sql.fetchrow("SELECT * FROM sellers WHERE seller_id = $1", seller_id)
    assert row is not None

    def opened(column: str) -> str:
        return ring.open(row[column], context("sellers", seller_id, column, row["client_id"]))

    refresh_token = opened("refresh_token")
    return dict(row) | {
        "access": opened("access_token"),
        "refresh_fingerprint": simulator_fingerprint(refresh_token),  # as `/_control/grants`
        "refresh_token_fingerprint_broker": fingerprint(refresh_token),  # what an attempt records
    }


async def grants(simulator: Simulator) -> dict[str, dict[str, Any]]:
    reply = await simulator.http.get("/_control/grants")
    reply.raise_for_status()
    result: dict[str, dict[str, Any]] = reply.json()
    return result


async def silently_broken(
    sql: asyncpg.Connection, simulator: Simulator, ring: Keyring, receiver: Receiver
) -> list[str]:
    """Sellers that are neither holding the live refresh token nor marked (with a reason and
    a delivered event): the invariant of the issue, over every seller."""
    live = await grants(simulator)
    broken = []
    for seller_id in await sql.fetch("SELECT seller_id FROM sellers ORDER BY seller_id"):
        row = await stored(sql, ring, seller_id["seller_id"])
        holds_live = (
            row["refresh_fingerprint"]
            == (live[str(row["mp_user_id"])]["refresh_token_fingerprint"])
        )
        marked = (
            row["status"] == "relink_required"
            and row["status_reason"] is not None
            and any(
                e["data"]["reason"] == row["status_reason"]
                for e in receiver.of(row["seller_id"], "seller.relink_required")
            )
        )
        if not ((row["status"] == "linked" and holds_live) or marked):
            broken.append(row["seller_id"])
    return broken


async def backends_gone(sql: asyncpg.Connection, pids: Sequence[int]) -> None:
    """Bounded wait until the killed processes' database sessions have ended."""
    for _ in range(200):
        if not await sql.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", list(pids)
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the sessions {pids} of killed processes never ended")


async def hold_commits(sql: asyncpg.Connection) -> None:
    """Make the store's commit wait on HOLD_KEY, which the test then holds: a deferred
    constraint trigger runs inside COMMIT (or at the end of an autocommit statement), after
    the UPDATE; only the store moves `version` up."""
    await sql.execute(
        "CREATE FUNCTION chaos_hold() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
        f"PERFORM pg_advisory_xact_lock({HOLD_KEY}); RETURN NEW; END $$"
    )
    await sql.execute(
        "CREATE CONSTRAINT TRIGGER chaos_hold_commit AFTER UPDATE ON sellers "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
        "WHEN (NEW.version > OLD.version) EXECUTE FUNCTION chaos_hold()"
    )
    await sql.execute("SELECT pg_advisory_lock($1)", HOLD_KEY)


async def waiter(sql: asyncpg.Connection, application: str, *queries: str) -> asyncpg.Record:
    """Bounded wait until a session of `application` waits on a lock in a statement that
    starts with one of `queries`; returns its pg_stat_activity row."""
    for _ in range(400):  # 20 s at most
        rows = await sql.fetch(
            "SELECT pid, application_name, wait_event, query FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock' "
            "AND application_name = $1",
            application,
        )
        for row in rows:
            if row["query"].lstrip().startswith(queries):
                return row
        await asyncio.sleep(0.05)
    sessions = await sql.fetch(
        "SELECT a.pid, application_name, state, wait_event_type, wait_event, "
        "left(query, 120) AS query, l.relation::regclass::text AS rel, l.mode, l.granted "
        "FROM pg_stat_activity a LEFT JOIN pg_locks l ON l.pid = a.pid AND NOT l.granted "
        "WHERE datname = current_database() AND a.pid <> pg_backend_pid()"
    )
    raise AssertionError(
        f"no {application} session ever waited on a lock in {queries}: "
        f"{[dict(row) for row in sessions]}"
    )


async def let_go(sql: asyncpg.Connection, table_lock: Any, simulator: Simulator) -> None:
    """Release every hold of the test (idempotent)."""
    with contextlib.suppress(asyncpg.InterfaceError):  # not started, or already rolled back
        await table_lock.rollback()
    await sql.execute("SELECT pg_advisory_unlock_all()")
    await simulator.release()


async def relation_waiter(sql: asyncpg.Connection, application: str, table: str) -> None:
    """Bounded wait until a session of `application` waits for a lock on `table`."""
    for _ in range(400):  # 20 s at most
        if await sql.fetchval(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
            "WHERE NOT l.granted AND l.relation = $2::regclass AND a.application_name = $1",
            application,
            table,
        ):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"no {application} session ever waited for {table}")


async def attempts(sql: asyncpg.Connection, sellers: Sequence[str]) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await sql.fetch(
        "SELECT seller_id, lease_owner, attempt_outcome, attempt_fingerprint, version "
        "FROM sellers WHERE seller_id = ANY($1::text[]) ORDER BY seller_id",
        list(sellers),
    )
    return rows


@dataclass
class Recovery:
    seconds: float  # kill -> the surviving replica serves the fresh token, or says relink
    outcome: str  # "refreshed" | "relink_required"
    statuses: Counter[int]  # what the caller polling the survivor saw meanwhile


async def recover(
    http: httpx.AsyncClient, replica: str, seller_id: str, old_access: str, killed_at: float
) -> Recovery:
    """Poll the survivor with plain reads (nobody asks for a refresh): the next attempt is the
    background refresher's, also for seller A, whose on-read claim left it due at the end of
    the dead owner's lease."""
    seen: Counter[int] = Counter()
    for _ in range(900):  # 45 s at most
        reply = await http.get(f"{replica}/sellers/{seller_id}/token")
        seen[reply.status_code] += 1
        if reply.status_code == 200 and reply.json()["access_token"] != old_access:
            return Recovery(time.monotonic() - killed_at, "refreshed", seen)
        if reply.headers.get("broker-token-warning") == "relink-required":
            return Recovery(time.monotonic() - killed_at, "relink_required", seen)
        await asyncio.sleep(0.05)
    raise AssertionError(f"{seller_id} was neither refreshed nor marked: {seen}")


# -- the scenario ----------------------------------------------------------------------------


async def crash(
    point: Point,
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
    *,
    defaults: bool = False,
) -> dict[str, Any]:
    """Run one crash point end to end; returns what happened, for the test's assertions."""
    sellers = await seed_sellers(
        sql, simulator, settings, 2 + REPLICA_SELLERS, expires_in=LIFETIME, due=False
    )
    seller_r, seller_a, others = sellers[0], sellers[1], sellers[2:]
    ring = settings_keyring(settings)
    before = {s: await stored(sql, ring, s) for s in (seller_r, seller_a)}
    api_key = await create_api_key(database_url)
    if point == "after_rotate":
        await simulator.faults(after_rotate="hold", count=2)  # the two victims' requests only
    if point == "at_commit":
        await hold_commits(sql)
    sockets[0].close()
    receiver = Receiver()
    result: dict[str, Any] = {"point": point}

    async with AsyncExitStack() as stack:
        hook_sock = socket.socket()
        stack.callback(hook_sock.close)
        hook_sock.bind(("127.0.0.1", 0))
        hooks = await stack.enter_async_context(Loopback(receiver.app(), hook_sock))
        env = broker_env(point, hooks.url, defaults=defaults)
        victim_port, replica_port = free_port(), free_port()
        victim_api, victim_refresher, survivor = await enter_all(
            stack,
            api_process(settings, database_url, victim_port, tmp_path / "victim-api.log", **env),
            broker_process(
                ["refresher"],
                env_for(settings, database_url, **(env | victim_refresher_env(point))),
                None,
                tmp_path / "victim-refresher.log",
            ),
            api_process(settings, database_url, replica_port, tmp_path / "replica.log", **env),
        )
        http = await stack.enter_async_context(
            httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
        )
        table_lock = sql.transaction()
        # Whatever happens, nothing stays held while the processes are stopped.
        stack.push_async_callback(let_go, sql, table_lock, simulator)
        replica = f"http://127.0.0.1:{replica_port}"
        load = ReplicaLoad(http, replica, others)
        load_task = asyncio.create_task(load.run())
        stack.push_async_callback(settle, load_task)
        for _ in range(100):  # the replica answers before anything happens
            if len(load.replies) >= 5:
                break
            await asyncio.sleep(0.05)
        served_before_kill = len(load.replies)
        # Now (every process is up) seller R comes due for the victim refresher, and seller A
        # is refreshed on read by the victim replica.
        await sql.execute(
            "UPDATE sellers SET next_refresh_at = now() - interval '1 second' WHERE seller_id = $1",
            seller_r,
        )
        if point == "before_send":
            # R's claim commits (lease + attempt record, one transaction), then its refresh
            # waits for the rate limiter. Then the test locks app_breakers: A's on-read claim
            # (which does not read it) commits, and its breaker check, the one statement
            # between the claim and the POST, waits.
            for _ in range(200):
                if (await attempts(sql, [seller_r]))[0]["lease_owner"] is not None:
                    break
                await asyncio.sleep(0.05)
            await table_lock.start()
            await sql.execute("LOCK TABLE app_breakers IN ACCESS EXCLUSIVE MODE")
        victim_read = asyncio.create_task(
            http.get(
                f"http://127.0.0.1:{victim_port}/sellers/{seller_a}/token",
                params={"min_ttl": MIN_TTL},
            )
        )
        stack.push_async_callback(settle, victim_read)

        # -- reach the point, and prove it --------------------------------------------------
        zombies: list[int] = []
        if point == "after_rotate":
            await simulator.wait_until_held(2)
            during = await grants(simulator)
            for s in (seller_r, seller_a):
                user = str(before[s]["mp_user_id"])
                assert during[user]["refreshes"] == 1  # Mercado Pago rotated ...
                # ... and the broker still holds the token it just spent.
                assert (
                    during[user]["refresh_token_fingerprint"]
                    != ((await stored(sql, ring, s))["refresh_fingerprint"])
                )
        elif point == "before_send":
            # A's claim committed; its breaker check is the next statement and needs
            # app_breakers: a broker-api session waits for it (pg_stat_activity shows such a
            # session as idle, in Parse, with its previous query; pg_locks says what it wants).
            for _ in range(200):
                if (await attempts(sql, [seller_a]))[0]["lease_owner"] is not None:
                    break
                await asyncio.sleep(0.05)
            await relation_waiter(sql, "broker-api", "app_breakers")
            assert await simulator.token_requests("refresh_token") == 0  # nothing left
        else:
            # The store: one autocommit statement (its commit at its end), or a COMMIT.
            store = (STORE_HEALTHY.tag, "COMMIT")
            blocked_r = await waiter(sql, "broker-refresher", *store)
            blocked_a = await waiter(sql, "broker-api", *store)
            for blocked in (blocked_r, blocked_a):
                assert blocked["wait_event"] == "advisory", blocked
            zombies = [blocked_r["pid"], blocked_a["pid"]]
            assert await simulator.token_requests("refresh_token") == 2
            for row in await attempts(sql, [seller_r, seller_a]):
                assert row["version"] == 1  # not committed yet
        # Still there: both leases held, both attempts recorded (no deadline has passed).
        for row in await attempts(sql, [seller_r, seller_a]):
            assert row["lease_owner"] is not None, dict(row)
            assert row["attempt_outcome"] == "sent", dict(row)
            held = before[row["seller_id"]]["refresh_token_fingerprint_broker"]
            assert row["attempt_fingerprint"] == held, dict(row)

        # -- kill -9 both victims, then let the held step go ----------------------------------
        victim_api.kill()
        victim_refresher.kill()
        await asyncio.gather(victim_api.wait(), victim_refresher.wait())
        killed_at = time.monotonic()
        if point == "after_rotate":
            await simulator.release()  # the replies go to dead sockets
        if point == "before_send":
            await table_lock.rollback()
        if point == "at_commit":
            await sql.execute("SELECT pg_advisory_unlock($1)", HOLD_KEY)
            await backends_gone(sql, zombies)  # each finished the commit it had been sent
            await sql.execute("DROP TRIGGER chaos_hold_commit ON sellers")
        try:
            answered: httpx.Response | None = await victim_read
        except httpx.TransportError:
            answered = None
        assert answered is None, "the killed replica answered"
        # A supervisor restarts the refresher (it starts while the dead owner's lease runs).
        replacement = asyncio.create_task(
            stack.enter_async_context(
                broker_process(
                    ["refresher"],
                    env_for(settings, database_url, **env),
                    None,
                    tmp_path / "replacement-refresher.log",
                )
            )
        )
        stack.push_async_callback(settle, replacement)
        if point == "at_commit":  # the COMMIT PostgreSQL had received landed after the kill
            for s in (seller_r, seller_a):
                assert (await stored(sql, ring, s))["version"] == 2

        # -- recovery -----------------------------------------------------------------------
        recovered_r, recovered_a = await asyncio.gather(
            recover(http, replica, seller_r, before[seller_r]["access"], killed_at),
            recover(http, replica, seller_a, before[seller_a]["access"], killed_at),
        )
        recovered_at = time.monotonic()
        stack.push_async_callback(
            stop_together, [victim_api, victim_refresher, survivor, await replacement]
        )
        await asyncio.sleep(1.5)  # the replacement polls every 0.2 s (1 s): time for a 2nd
        result["served"] = {
            s: (await http.get(f"{replica}/sellers/{s}/token")) for s in (seller_r, seller_a)
        }
        # A's caller asks the survivor again, with the min_ttl it asked the dead replica for.
        result["on_read"] = await http.get(
            f"{replica}/sellers/{seller_a}/token", params={"min_ttl": MIN_TTL}
        )
        if point == "after_rotate":  # the events reach the receiver (delivery polls each 1 s)
            for _ in range(150):
                if all(receiver.of(s, "seller.relink_required") for s in (seller_r, seller_a)):
                    break
                await asyncio.sleep(0.1)
        load.stop.set()
        await load_task

    # The first refresh request after the kill: the dead owners' sellers were taken over.
    log = [e for e in await simulator.log() if e["grant_type"] == "refresh_token"]
    resent = [e["at"] - killed_at for e in log if e["at"] > killed_at]
    result |= {
        "resent_after": min(resent, default=float("nan")),
        "sellers": (seller_r, seller_a),
        "before": before,
        "after": {s: await stored(sql, ring, s) for s in (seller_r, seller_a)},
        "recovery": {"refresher": recovered_r, "replica": recovered_a},
        "grants": await grants(simulator),
        "log": Counter(e["outcome"] for e in log),
        "events": await sql.fetch(
            "SELECT seller_id, data->>'reason' AS reason FROM events "
            "WHERE type = 'seller.relink_required' ORDER BY seller_id"
        ),
        "receiver": receiver,
        "broken": await silently_broken(sql, simulator, ring, receiver),
        "load": load.statuses(),
        "load_before_kill": served_before_kill,
        "load_crash_window": load.statuses(killed_at, recovered_at),
        "load_after_kill": load.statuses(killed_at),
    }
    users = {str(before[s]["mp_user_id"]) for s in (seller_r, seller_a)}
    result["other_refreshes"] = sum(
        g["refreshes"] for user, g in result["grants"].items() if user not in users
    )
    report(result)
    return result


def report(result: dict[str, Any]) -> None:
    """The figures of docs/RELIABILITY.md, "Process crash" (shown with pytest -s)."""
    load: Counter[int] = result["load"]
    window: Counter[int] = result["load_crash_window"]
    print(f"\n== crash point {result['point']} ==")
    for victim, rec in result["recovery"].items():
        print(
            f"  {victim:9} victim: {rec.outcome:15} recovered {rec.seconds:5.2f} s after kill -9"
            f" (plain reads meanwhile: {dict(rec.statuses)})"
        )
    print(
        f"  surviving replica: {sum(load.values())} reads of other sellers, by status"
        f" {dict(load)}; {sum(window.values())} between the kill and the recovery, {dict(window)}"
    )
    on_read = result["on_read"]
    print(f"  A's caller asking the survivor again with min_ttl: {on_read.status_code}")
    print(f"  upstream refresh requests by outcome: {dict(result['log'])}")
    print(f"  first refresh request after the kill: {result['resent_after']:.2f} s")
    print(f"  sellers silently broken: {len(result['broken'])}")


def assert_replica_kept_serving(result: dict[str, Any]) -> None:
    load: Counter[int] = result["load"]
    assert set(load) == {200}, load
    assert result["load_before_kill"] >= 5
    assert sum(result["load_after_kill"].values()) >= 5  # and it went on answering after it
    assert result["other_refreshes"] == 0
    assert result["broken"] == []


def assert_refreshed_once(result: dict[str, Any]) -> None:
    """Both sellers refreshed exactly once and served with the new pair."""
    for s in result["sellers"]:
        before, after = result["before"][s], result["after"][s]
        user = str(before["mp_user_id"])
        assert result["grants"][user]["refreshes"] == 1
        assert after["status"] == "linked"
        assert after["version"] == 2
        assert after["refresh_fingerprint"] == result["grants"][user]["refresh_token_fingerprint"]
        served = result["served"][s]
        assert served.status_code == 200
        assert served.json()["access_token"] == after["access"] != before["access"]
        assert "broker-token-warning" not in served.headers
    assert [rec.outcome for rec in result["recovery"].values()] == ["refreshed", "refreshed"]
    assert result["events"] == []
    # The new pair lives 180 days: A's caller gets it without another refresh.
    on_read = result["on_read"]
    assert on_read.status_code == 200
    assert on_read.json()["access_token"] == result["after"][result["sellers"][1]]["access"]


# -- the tests ---------------------------------------------------------------------------------


async def test_kill_9_before_the_upstream_call_then_the_next_owner_refreshes_once(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    result = await crash("before_send", settings, sockets, simulator, database_url, sql, tmp_path)
    assert_refreshed_once(result)
    assert result["log"] == {"ok": 2}  # only the next owners' requests ever left
    # The dead owners' leases were taken over (their owner locks had gone with their sessions)
    # long before the lease and the late-reply grace after it (18 s here) could have lapsed.
    for rec in result["recovery"].values():
        assert rec.seconds < owners.ABSENT_SECONDS + 8 < 2 * lease_seconds("before_send")
    assert_replica_kept_serving(result)


async def test_kill_9_after_the_upstream_rotated_marks_rotation_lost_and_keeps_serving(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    result = await crash("after_rotate", settings, sockets, simulator, database_url, sql, tmp_path)
    # Mercado Pago rotated once per seller; the next attempt (the replacement refresher for
    # R, the surviving replica's on-read refresh for A) sent the spent token: invalid_grant.
    assert result["log"] == {"ok": 2, "invalid_grant": 2}
    assert [(r["seller_id"], r["reason"]) for r in result["events"]] == [
        (s, "rotation_lost") for s in sorted(result["sellers"])
    ]
    for s in result["sellers"]:
        before, after = result["before"][s], result["after"][s]
        assert result["grants"][str(before["mp_user_id"])]["refreshes"] == 1
        assert (after["status"], after["status_reason"]) == ("relink_required", "rotation_lost")
        assert after["version"] == 1
        assert after["last_refresh_error"] == "invalid_grant"
        [event] = result["receiver"].of(s, "seller.relink_required")
        assert event["data"]["reason"] == "rotation_lost"
        # Served on: the still-valid access token, flagged; Mercado Pago still accepts it.
        served = result["served"][s]
        assert served.status_code == 200
        assert served.headers["broker-token-warning"] == "relink-required"
        assert served.json()["access_token"] == before["access"]
        me = await simulator.http.get(
            "/users/me", headers={"Authorization": f"Bearer {before['access']}"}
        )
        assert me.status_code == 200
    # A caller needing more than the old token has left is told to have the seller relink.
    assert result["on_read"].status_code == 409
    assert result["on_read"].json()["code"] == "relink_required"
    assert [rec.outcome for rec in result["recovery"].values()] == [
        "relink_required",
        "relink_required",
    ]
    assert_replica_kept_serving(result)


async def test_kill_9_at_the_commit_keeps_the_new_pair_and_refreshes_no_more(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    result = await crash("at_commit", settings, sockets, simulator, database_url, sql, tmp_path)
    assert_refreshed_once(result)
    assert result["log"] == {"ok": 2}  # no second refresh by the replacement or the replica
    for s in result["sellers"]:
        assert result["after"][s]["lease_owner"] is None  # the store's commit freed the lease
    assert_replica_kept_serving(result)


async def test_kill_9_at_default_settings_is_taken_over_within_seconds_not_minutes(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    """The shipped lease (60 s) and deadline (10 s): before owner liveness, a seller whose
    rotation died with its owner waited out the lease and the grace, 117 s after the restart."""
    result = await crash(
        "after_rotate", settings, sockets, simulator, database_url, sql, tmp_path, defaults=True
    )
    assert result["log"] == {"ok": 2, "invalid_grant": 2}
    assert result["resent_after"] < 10  # taken over: the next attempt left within 10 s
    for rec in result["recovery"].values():
        assert rec.outcome == "relink_required"
        assert rec.seconds < 15
    assert [r["reason"] for r in result["events"]] == ["rotation_lost", "rotation_lost"]
    assert_replica_kept_serving(result)


PAUSE_TIMEOUT, PAUSE_LEASE = 1, 8  # the shortest lease start-up accepts, and 1 s to claim


async def test_an_owner_paused_past_its_lease_is_not_taken_over_and_nothing_is_sent_twice(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    """SIGSTOP: alive but slow. Its session (so its owner lock) stays, so no looker calls it
    dead, and the late-reply grace keeps everyone off its seller while its reply may land."""
    [seller] = await seed_sellers(sql, simulator, settings, 1, expires_in=LIFETIME, due=False)
    ring = settings_keyring(settings)
    before = await stored(sql, ring, seller)
    await simulator.faults(after_rotate="hold", count=1)
    sockets[0].close()
    receiver = Receiver()
    async with AsyncExitStack() as stack:
        hook_sock = socket.socket()
        stack.callback(hook_sock.close)
        hook_sock.bind(("127.0.0.1", 0))
        hooks = await stack.enter_async_context(Loopback(receiver.app(), hook_sock))
        env = env_for(
            settings,
            database_url,
            **broker_env("after_rotate", hooks.url, defaults=True),
            MP_TIMEOUT_SECONDS=str(PAUSE_TIMEOUT),
            BROKER_LEASE_SECONDS=str(PAUSE_LEASE),
        )
        owner = await stack.enter_async_context(
            broker_process(["refresher"], env, None, tmp_path / "owner.log")
        )
        stack.push_async_callback(simulator.release)
        await sql.execute(
            "UPDATE sellers SET next_refresh_at = now() - interval '1 second' WHERE seller_id = $1",
            seller,
        )
        await simulator.wait_until_held(1)  # rotated at Mercado Pago, the reply on its way
        owner.send_signal(signal.SIGSTOP)
        stack.callback(resume, owner)  # on the way out too, so that it can be stopped
        paused_at = time.monotonic()
        leased = await sql.fetchrow(
            "SELECT lease_owner, lease_until FROM sellers WHERE seller_id = $1", seller
        )
        assert leased["lease_owner"] is not None
        other = await stack.enter_async_context(
            broker_process(["refresher"], env, None, tmp_path / "other.log")
        )
        await simulator.release()  # the reply waits in the paused owner's socket
        # Past the lease, and long enough after it for the other refresher to have called the
        # owner dead had its lock gone (ABSENT_SECONDS and two looks), yet inside the grace.
        lapse = (leased["lease_until"] - datetime.now(UTC)).total_seconds()
        watch_until = paused_at + max(lapse, 0) + owners.ABSENT_SECONDS + 2 * owners.LOOK_SECONDS
        assert watch_until - paused_at < 2 * PAUSE_LEASE - 1  # still inside the grace
        while time.monotonic() < watch_until:  # bounded: a few seconds past the lease
            assert await simulator.token_requests("refresh_token") == 1
            row = await sql.fetchrow("SELECT lease_owner FROM sellers WHERE seller_id = $1", seller)
            assert row["lease_owner"] == leased["lease_owner"], "a live owner was taken over"
            await asyncio.sleep(0.2)
        resume(owner)
        # Awake, the owner stores the reply it was sent, or (its deadline passed while it
        # slept) the next attempt after the grace learns the token was spent: never silent.
        for _ in range(300):  # 30 s at most
            row = await stored(sql, ring, seller)
            if row["version"] == 2 or receiver.of(seller, "seller.relink_required"):
                break
            await asyncio.sleep(0.1)
        assert await silently_broken(sql, simulator, ring, receiver) == []
        log = [e for e in await simulator.log() if e["grant_type"] == "refresh_token"]
        assert Counter(e["outcome"] for e in log) in ({"ok": 1}, {"ok": 1, "invalid_grant": 1})
        if len(log) == 2:  # the second send came only once the grace had run
            assert log[1]["at"] - paused_at > PAUSE_LEASE
        assert row["access"] != before["access"] or row["status"] == "relink_required"
        outcomes = dict(Counter(e["outcome"] for e in log))
        print(
            f"\n== owner paused (SIGSTOP) for {watch_until - paused_at:.1f} s, its lease lapsed"
            f" {max(lapse, 0):.1f} s in: taken over no; refresh requests {outcomes};"
            f" after SIGCONT the seller is {row['status']} at version {row['version']}"
        )
        await stop_together([owner, other])
