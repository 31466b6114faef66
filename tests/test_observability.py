"""/metrics, /readyz, request ids, and the operator's global refresh switch."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from service.core import metrics
from service.core.config import Settings
from service.core.logs import JsonFormatter
from service.core.runtime import Runtime
from service.main import create_app
from service.ops import cli
from tests.support import (
    Broker,
    FakeClock,
    Loopback,
    SellerBrowser,
    Simulator,
    create_api_key,
    execute,
    seed_sellers,
    with_database,
)
from tests.support.netproxy import proxied
from tests.support.processes import base_env, env_for, run_cli

TOKEN_ROUTE = "/sellers/{seller_id:path}/token"
QUICK = pytest.mark.parametrize(
    "settings_overrides",
    [{"broker_db_check_seconds": 0.05, "broker_metrics_db_seconds": 0.05}],
)


async def scrape(http: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = await http.get("/metrics")
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(reply.text)
        for sample in family.samples
    }


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def wait_for(check: Any, what: str, seconds: float = 10.0) -> None:
    """Poll a condition the broker reaches by itself (a periodic job), bounded in time."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.05)


@QUICK
async def test_metrics_count_requests_links_and_stored_state(broker: Broker) -> None:
    before = await scrape(broker.http)
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link("seller-1"), user_id=11)
    for _ in range(3):
        assert (await broker.token("seller-1")).status_code == 200
    assert (await broker.token("nobody")).status_code == 404
    after = await scrape(broker.http)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("broker_http_requests_total", route=TOKEN_ROUTE, status="200") == 3
    assert delta("broker_http_requests_total", route=TOKEN_ROUTE, status="404") == 1
    assert delta("broker_http_request_duration_seconds_count", route=TOKEN_ROUTE) == 4
    app = {"application": "default"}
    assert delta("broker_link_attempts_total", **app, outcome="linked") == 1
    assert delta("broker_token_exchanges_total", **app, outcome="linked") == 1
    assert (
        delta("broker_upstream_request_duration_seconds_count", **app, endpoint="oauth_token") == 1
    )
    assert delta("broker_events_emitted_total", **app, type="seller.linked") == 1

    async def counted() -> bool:
        samples = await scrape(broker.http)
        return value(samples, "broker_sellers", application="default", status="linked") == 1

    await wait_for(counted, "the periodic gauges count the linked seller")

    async def up() -> bool:  # one check of 0.05 s may miss its deadline on a loaded machine
        return value(await scrape(broker.http), "broker_database_up") == 1

    await wait_for(up, "a database check answered")
    samples = await scrape(broker.http)
    assert value(samples, "broker_tokens_expiring", application="default", within="7d") == 0
    assert value(samples, "broker_refresher_lag_seconds", application="default") == 0


async def test_a_request_id_is_echoed_and_stamped_on_every_log_line_of_its_request(
    broker: Broker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reply = await broker.http.get(
        "/oauth/callback", params={"state": "x" * 43, "code": "c"}, headers={"X-Request-ID": "r-1"}
    )
    assert reply.headers["x-request-id"] == "r-1"
    lines = [json.loads(JsonFormatter().format(r)) for r in caplog.records]
    refused = [line for line in lines if line["event"] == "callback.refused"]
    assert refused
    assert {line["request_id"] for line in refused} == {"r-1"}

    forged = await broker.http.get("/healthz", headers={"X-Request-ID": "a b\tc"})
    assert forged.headers["x-request-id"] != "a b\tc"
    assert len(forged.headers["x-request-id"]) == 32  # one of ours instead
    fresh = await broker.http.get("/healthz")
    assert fresh.headers["x-request-id"] != forged.headers["x-request-id"]


async def test_not_ready_while_the_schema_is_behind_the_code(
    settings: Settings, server_url: str, sockets: tuple[socket.socket, socket.socket]
) -> None:
    name = f"broker_empty_{uuid.uuid4().hex[:8]}"
    await execute(server_url, f'CREATE DATABASE "{name}"')
    try:
        quick = settings.model_copy(update={"broker_db_check_seconds": 0.05})
        app = create_app(quick, database_url=with_database(server_url, name))
        async with (
            Loopback(app, sockets[0]) as server,
            httpx.AsyncClient(base_url=server.url) as http,
        ):
            for _ in range(5):
                reply = await http.get("/readyz")
                assert (reply.status_code, reply.json()) == (503, {"status": "schema_behind"})
                await asyncio.sleep(0.05)
            assert (await http.get("/healthz")).status_code == 200
    finally:
        await execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.parametrize(
    ("revision", "ready"),
    [("0009", False), ("9999_a_newer_release", True)],
    ids=["an older revision: behind", "a revision this code does not know: ahead"],
)
async def test_ready_on_a_schema_a_newer_release_migrated_not_on_an_older_one(
    settings: Settings,
    database_url: str,
    sql: asyncpg.Connection,
    sockets: tuple[socket.socket, socket.socket],
    revision: str,
    ready: bool,
) -> None:
    """A rolling upgrade runs `broker migrate` while the previous release still serves: its
    replicas must stay in the balancer (migrations only expand), not drop out all at once."""
    await sql.execute("UPDATE alembic_version SET version_num = $1", revision)
    quick = settings.model_copy(update={"broker_db_check_seconds": 0.05})
    app = create_app(quick, database_url=database_url)
    async with Loopback(app, sockets[0]) as server, httpx.AsyncClient(base_url=server.url) as http:
        # Each check takes 0.05 s: 20 replies span several, the last one after the first.
        replies = []
        for _ in range(20):
            reply = await http.get("/readyz")
            replies.append((reply.status_code, reply.json()["status"]))
            await asyncio.sleep(0.02)
        expected = (200, "ok") if ready else (503, "schema_behind")
        assert replies[-5:] == [expected] * 5, replies


async def test_a_database_blip_shorter_than_the_grace_keeps_the_replica_ready(
    settings: Settings,
    database_url: str,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
) -> None:
    tuned = settings.model_copy(
        update={
            "broker_db_check_seconds": 0.05,
            "broker_metrics_db_seconds": 60,
            "broker_readiness_grace_seconds": 1.5,
        }
    )
    async with proxied(database_url) as proxy:
        app = create_app(tuned, database_url=proxy.url)
        async with (
            Loopback(app, sockets[0]) as server,
            httpx.AsyncClient(base_url=server.url) as http,
        ):

            async def ready() -> bool:
                return (await http.get("/readyz")).status_code == 200

            async def database(up: float) -> bool:
                return value(await scrape(http), "broker_database_up") == up

            await wait_for(ready, "ready once the schema is checked")
            await proxy.cut()
            await wait_for(lambda: database(0), "the blip shows in broker_database_up")
            assert await ready()  # within the grace: still in the balancer
            await wait_for(lambda: _not_ready(http), "not ready once the grace is over")
            await proxy.restore()
            await wait_for(lambda: database(1), "the database is seen back")
            await wait_for(ready, "ready again")


async def _not_ready(http: httpx.AsyncClient) -> bool:
    reply = await http.get("/readyz")
    return reply.status_code == 503 and reply.json() == {"status": "database_unreachable"}


async def test_pause_stops_every_refresh_until_resume_and_the_cli_drives_it(
    broker: Broker,
    simulator: Simulator,
    settings: Settings,
    database_url: str,
    sql: asyncpg.Connection,
    clock: FakeClock,
) -> None:
    sellers = await seed_sellers(sql, simulator, settings, 2, expires_in=3600, due=True)
    env = env_for(settings, database_url)
    code, out, _ = await run_cli("refresher", "pause", "--reason", "incident 42", env=env)
    assert (code, out.strip()) == (
        0,
        "paused: no process refreshes until `broker refresher resume`",
    )
    code, out, _ = await run_cli("refresher", "status", env=env)
    assert "paused since" in out
    assert "incident 42" in out

    runtime: Runtime = broker.app.state.runtime
    assert (await broker.refresher._claim_round(10))[0] == []  # the background loop claims nothing
    assert await broker.refresher.refresh(sellers[0], on_read=True) == "paused"
    served = await broker.token(sellers[0])  # still valid (1 h left): still served
    assert served.status_code == 200
    assert await simulator.token_requests("refresh_token") == 0
    async with runtime.db.sessions() as session:
        await metrics.collect_database_gauges(session, clock(), 7, settings.apps)
    assert REGISTRY.get_sample_value("broker_refresh_paused") == 1

    code, out, _ = await run_cli("refresher", "resume", env=env)
    assert (code, out.strip()) == (0, "resumed: due sellers are refreshed again")
    assert await broker.refresher.refresh(sellers[0]) == "refreshed"
    assert len((await broker.refresher._claim_round(10))[0]) == 1  # the other one, due all along
    code, out, _ = await run_cli("refresher", "status", env=env)
    assert out.strip() == "running"


def commands(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser, str | None]]:
    """Every command the parser knows (leaves and groups), with the help its parent shows."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {choice.dest: choice.help for choice in action._choices_actions}
            for name, sub in action.choices.items():
                yield (*path, name), sub, helps.get(name)
                yield from commands(sub, (*path, name))


def test_every_command_has_help() -> None:
    found = list(commands(cli.parser()))
    names = {" ".join(path) for path, _, _ in found}
    assert {"run", "serve", "refresher", "api-keys create", "sellers unlink"} <= names
    for path, sub, summary in found:
        assert summary, path  # listed with a line of help in its parent's --help
        assert sub.format_help().startswith(f"usage: broker {' '.join(path)}"), path


async def test_help_runs_without_a_database_or_settings() -> None:
    code, out, _ = await run_cli("sellers", "unlink", "--help", env=base_env())
    assert code == 0
    assert out.startswith("usage: broker sellers unlink")


async def test_sellers_cli_lists_shows_and_unlinks(
    simulator: Simulator, settings: Settings, database_url: str, sql: asyncpg.Connection
) -> None:
    await seed_sellers(sql, simulator, settings, 3, expires_in=3600, due=False)
    await create_api_key(database_url)
    env = env_for(settings, database_url)
    code, out, _ = await run_cli("sellers", "list", "--status", "linked", "--limit", "2", env=env)
    assert code == 0
    assert [line.split("\t")[0] for line in out.splitlines()] == [
        "seller-00000",
        "seller-00001",
        "... more than 2; use --limit or GET /sellers with a cursor",
    ]
    code, out, _ = await run_cli("sellers", "show", "seller-00001", env=env)
    shown = json.loads(out)
    assert (shown["seller_id"], shown["status"], shown["mp_user_id"]) == (
        "seller-00001",
        "linked",
        10_001,
    )
    assert "token" not in {k for k in shown if k.endswith("_token")}
    code, out, _ = await run_cli("sellers", "unlink", "seller-00001", env=env)
    assert (code, out.strip()) == (0, "unlinked seller-00001")
    row = await sql.fetchrow("SELECT * FROM sellers WHERE seller_id = 'seller-00001'")
    assert (row["status"], row["access_token"], row["refresh_token"]) == ("unlinked", None, None)
    assert await sql.fetchval("SELECT type FROM events") == "seller.unlinked"
    code, _, _ = await run_cli("sellers", "unlink", "seller-00001", env=env)
    assert code == 1


def test_request_counts_export_what_a_prometheus_counter_and_histogram_would() -> None:
    """`metrics.Requests` replaces a Counter and a Histogram on the hot path: same samples."""
    seconds = [0.0004, 0.001, 0.0011, 0.003, 0.02, 0.7, 2.5, 9.0]
    ours = metrics.Requests(metrics.FAST)
    registry = CollectorRegistry()
    counter = Counter("broker_http_requests", "d", ["route", "status"], registry=registry)
    histogram = Histogram(
        "broker_http_request_duration_seconds", "d", ["route"], buckets=metrics.FAST,
        registry=registry,
    )  # fmt: skip
    for n, value in enumerate(seconds):
        status = 200 if n % 3 else 404
        ours.record(TOKEN_ROUTE, status, value)
        counter.labels(TOKEN_ROUTE, str(status)).inc()
        histogram.labels(TOKEN_ROUTE).observe(value)

    def samples(families: Any) -> set[tuple[str, tuple[tuple[str, str], ...], float]]:
        return {
            (s.name, tuple(sorted(s.labels.items())), round(s.value, 9))
            for family in families
            for s in family.samples
            if not s.name.endswith("_created")
        }

    assert samples(ours.collect()) == samples(registry.collect())
