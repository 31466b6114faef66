"""`GET /applications`, `broker applications list`, keys limited to applications from the
command line, and the per-application database gauges, with two applications configured."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY
from pydantic import SecretStr

from bench.seed import copy_rows
from bench.seed import row as sealed_row
from service.core import db, metrics
from service.core.config import Settings
from service.core.metrics import queue_query
from service.refresh import breaker
from service.serving import apikeys
from tests.support import (
    CLIENT_ID,
    CLIENT_SECRET,
    Broker,
    FakeClock,
    assert_problem,
    calling_with,
    new_key,
    settings_keyring,
)
from tests.support.db import plan
from tests.support.processes import env_for, run_cli

BR_CLIENT_ID = "2234567890123456"
BR_SECRET = "br-secret-value"
# Never called: these tests read and count, they link and refresh nothing.
BR_APP = {
    "name": "br",
    "client_id": BR_CLIENT_ID,
    "client_secret": BR_SECRET,
    "redirect_uri": "https://broker.example/oauth/callback/br",
    "auth_url": "https://auth.example/br/authorization",
    "token_url": "http://127.0.0.1:9/oauth/token",
    "api_url": "http://127.0.0.1:9",
    "pkce": "off",
}
BR_APPLICATIONS = json.dumps([BR_APP])
TWO_APPS = pytest.mark.parametrize(
    "settings_overrides", [{"broker_applications": SecretStr(BR_APPLICATIONS)}]
)


async def seed(
    sql: asyncpg.Connection,
    settings: Settings,
    client_id: str,
    status: str,
    next_refresh_at: datetime,
) -> str:
    """One seller of `client_id` in `status`, sealed the broker's way."""
    seller_id = f"{client_id[:2]}-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)
    row = sealed_row(
        settings_keyring(settings),
        client_id,
        seller_id,
        10_000,
        f"APP_USR-{seller_id}",
        f"TG-{seller_id}",
        now,
        now + timedelta(days=150),
        next_refresh_at,
    )
    await copy_rows(sql, [row])
    if status != "linked":
        await sql.execute("UPDATE sellers SET status = $2 WHERE seller_id = $1", seller_id, status)
    return seller_id


async def seed_both(sql: asyncpg.Connection, settings: Settings, now: datetime) -> None:
    """default: 3 linked (2 due), 1 relink_required; br: 1 linked (not due), 2 unlinked.
    Sellers that are not linked are overdue: they must count in no backlog."""
    for due in (now - timedelta(minutes=10), now - timedelta(minutes=1), now + timedelta(days=2)):
        await seed(sql, settings, CLIENT_ID, "linked", due)
    await seed(sql, settings, CLIENT_ID, "relink_required", now - timedelta(hours=1))
    await seed(sql, settings, BR_CLIENT_ID, "linked", now + timedelta(hours=1))
    for _ in range(2):
        await seed(sql, settings, BR_CLIENT_ID, "unlinked", now - timedelta(hours=2))


async def trip_br(database_url: str, now: datetime) -> None:
    engine = db.make_engine(database_url, "tests", pool_size=1)
    try:
        await breaker.trip(db.make_sessionmaker(engine), BR_CLIENT_ID, "invalid_client", now, 300)
    finally:
        await engine.dispose()


def parsed(reply_json: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The reply with its timestamps as datetimes (compared exactly, not as strings)."""
    for app in reply_json:
        if app["next_refresh_at"] is not None:
            app["next_refresh_at"] = datetime.fromisoformat(app["next_refresh_at"])
        for field in ("tripped_at", "probe_after"):
            if field in app["breaker"]:
                app["breaker"][field] = datetime.fromisoformat(app["breaker"][field])
    return reply_json


@TWO_APPS
async def test_applications_show_each_ones_sellers_breaker_and_queue(
    broker: Broker, settings: Settings, database_url: str, sql: asyncpg.Connection, clock: FakeClock
) -> None:
    now = clock()
    await seed_both(sql, settings, now)
    await trip_br(database_url, now)

    reply = await broker.http.get("/applications")

    assert reply.status_code == 200, reply.text
    assert CLIENT_SECRET not in reply.text
    assert BR_SECRET not in reply.text
    assert parsed(reply.json()) == [
        {
            "name": "default",
            "client_id": CLIENT_ID,
            "auth_url": settings.mp_auth_url,
            "pkce": "S256",
            "sellers": {"linked": 3, "relink_required": 1, "unlinked": 0},
            "breaker": {"state": "closed"},
            "refresh_backlog": 2,
            "next_refresh_at": now - timedelta(minutes=10),
        },
        {
            "name": "br",
            "client_id": BR_CLIENT_ID,
            "auth_url": BR_APP["auth_url"],
            "pkce": "off",
            "sellers": {"linked": 1, "relink_required": 0, "unlinked": 2},
            "breaker": {
                "state": "open",
                "reason": "invalid_client",
                "tripped_at": now,
                "probe_after": now + timedelta(seconds=300),
            },
            "refresh_backlog": 0,
            "next_refresh_at": now + timedelta(hours=1),
        },
    ]


@TWO_APPS
async def test_an_application_without_linked_sellers_has_no_next_refresh(
    broker: Broker, settings: Settings, sql: asyncpg.Connection, clock: FakeClock
) -> None:
    await seed(sql, settings, BR_CLIENT_ID, "relink_required", clock() - timedelta(hours=1))
    by_name = {app["name"]: app for app in (await broker.http.get("/applications")).json()}
    assert by_name["br"]["sellers"] == {"linked": 0, "relink_required": 1, "unlinked": 0}
    assert (by_name["br"]["refresh_backlog"], by_name["br"]["next_refresh_at"]) == (0, None)
    assert by_name["default"]["sellers"] == {"linked": 0, "relink_required": 0, "unlinked": 0}


@TWO_APPS
async def test_a_key_limited_to_an_application_sees_only_that_one(
    broker: Broker, settings: Settings, database_url: str, sql: asyncpg.Connection, clock: FakeClock
) -> None:
    await seed_both(sql, settings, clock())
    async with calling_with(
        broker, await new_key(database_url, client_ids=[BR_CLIENT_ID])
    ) as caller:
        reply = await caller.get("/applications")
    assert reply.status_code == 200, reply.text
    assert [(app["name"], app["sellers"]["unlinked"]) for app in reply.json()] == [("br", 2)]


@TWO_APPS
async def test_applications_need_the_admin_scope_and_no_namespace(
    broker: Broker, database_url: str
) -> None:
    async with calling_with(broker, await new_key(database_url, ("tokens:read",))) as caller:
        assert_problem(await caller.get("/applications"), 403, "forbidden")
    namespaced = await new_key(database_url, apikeys.SCOPES, "billing/")
    async with calling_with(broker, namespaced) as caller:
        assert_problem(await caller.get("/applications"), 403, "forbidden")
    async with calling_with(broker, "mpb_00000000_" + "x" * 43) as caller:
        assert_problem(await caller.get("/applications"), 401, "unauthorized")


def table(out: str) -> list[list[str]]:
    """`broker applications list` as rows of cells (columns are 2+ spaces apart)."""
    return [re.split(r"\s{2,}", line.strip()) for line in out.splitlines()]


@TWO_APPS
async def test_cli_lists_both_applications(
    settings: Settings, database_url: str, sql: asyncpg.Connection, clock: FakeClock
) -> None:
    now = clock()
    await seed_both(sql, settings, now)
    await trip_br(database_url, now)
    env = env_for(settings, database_url, BROKER_APPLICATIONS=BR_APPLICATIONS)

    code, out, err = await run_cli("applications", "list", env=env)

    assert code == 0, err
    due = now - timedelta(minutes=10)
    later = now + timedelta(hours=1)
    assert table(out) == [
        [
            "NAME",
            "CLIENT_ID",
            "LINKED",
            "RELINK_REQUIRED",
            "UNLINKED",
            "BREAKER",
            "BACKLOG",
            "NEXT_DUE",
        ],
        ["default", CLIENT_ID, "3", "1", "0", "closed", "2", f"{due:%Y-%m-%d %H:%M}Z"],
        [
            "br",
            BR_CLIENT_ID,
            "1",
            "0",
            "2",
            "open (invalid_client)",
            "0",
            f"{later:%Y-%m-%d %H:%M}Z",
        ],
    ]


@TWO_APPS
async def test_cli_creates_keys_limited_to_named_applications(
    broker: Broker, settings: Settings, database_url: str, sql: asyncpg.Connection
) -> None:
    env = env_for(settings, database_url, BROKER_APPLICATIONS=BR_APPLICATIONS)
    keys_before = await sql.fetchval("SELECT count(*) FROM api_keys")

    code, out, err = await run_cli("api-keys", "create", "k-nope", "--application", "nope", env=env)
    assert code != 0
    assert "unknown application(s): nope (configured: default, br)" in err
    assert out == ""
    assert await sql.fetchval("SELECT count(*) FROM api_keys") == keys_before

    code, out, err = await run_cli("api-keys", "create", "k-br", "--application", "br", env=env)
    assert code == 0, err
    secret = out.strip()
    stored = await sql.fetchval("SELECT client_ids FROM api_keys WHERE name = 'k-br'")
    assert stored == [BR_CLIENT_ID]
    async with calling_with(broker, secret) as caller:
        reply = await caller.get("/applications")
    assert [app["name"] for app in reply.json()] == ["br"]

    code, out, _ = await run_cli("api-keys", "list", env=env)
    assert code == 0
    reach = {line.split("\t")[0]: line.split("\t")[4] for line in out.splitlines()}
    assert reach["k-br"] == "br"
    assert set(reach.values()) == {"br", "*"}  # the fixture's own key reaches every application


@TWO_APPS
async def test_database_gauges_are_per_application(
    settings: Settings, database_url: str, sql: asyncpg.Connection
) -> None:
    now = datetime.now(UTC)
    await seed_both(sql, settings, now)
    await trip_br(database_url, now)
    engine = db.make_engine(database_url, "tests", pool_size=1)
    try:
        async with db.make_sessionmaker(engine)() as session:
            await metrics.collect_database_gauges(session, now, 7, settings.apps)
    finally:
        await engine.dispose()

    def sample(name: str, **labels: str) -> float | None:
        return REGISTRY.get_sample_value(name, labels)

    sellers = {
        (app, status): sample("broker_sellers", application=app, status=status)
        for app in ("default", "br")
        for status in ("linked", "relink_required", "unlinked")
    }
    assert sellers == {
        ("default", "linked"): 3,
        ("default", "relink_required"): 1,
        ("default", "unlinked"): 0,
        ("br", "linked"): 1,
        ("br", "relink_required"): 0,
        ("br", "unlinked"): 2,
    }
    assert sample("broker_breakers_open", application="br") == 1
    assert sample("broker_breakers_open", application="default") == 0
    assert sample("broker_refresh_backlog", application="default") == 2
    assert sample("broker_refresh_backlog", application="br") == 0


async def test_the_queue_of_an_application_is_read_from_the_work_queue_index(
    database_url: str, sql: asyncpg.Connection
) -> None:
    # Cheap rows (placeholder ciphertexts: only the plan matters), two applications, a few due.
    await sql.execute(
        """
        INSERT INTO sellers (seller_id, client_id, mp_user_id, status, access_token,
            refresh_token, live_mode, expires_at, next_refresh_at, version, linked_at,
            updated_at)
        SELECT 'seller-' || n, CASE WHEN n % 2 = 0 THEN $1::text ELSE $2::text END, n,
               CASE WHEN n % 50 = 0 THEN 'unlinked' ELSE 'linked' END, 'x', 'x', true,
               now() + interval '150 days', now() + (n % 1000) * interval '1 hour'
               - interval '10 hours', 1, now(), now()
        FROM generate_series(1, 50000) AS n
        """,
        CLIENT_ID,
        BR_CLIENT_ID,
    )
    await sql.execute("ANALYZE sellers")
    engine = db.make_engine(database_url, "tests", pool_size=1)  # its dialect compiles
    compiled = queue_query(BR_CLIENT_ID, datetime.now(UTC)).compile(
        dialect=engine.dialect, compile_kwargs={"render_postcompile": True}
    )
    await engine.dispose()
    params = [compiled.params[name] for name in compiled.positiontup or ()]
    queue_plan = await plan(sql, str(compiled), *params)
    assert queue_plan.count("ix_sellers_client_id_next_refresh_at_linked") == 2, queue_plan
    assert "Seq Scan" not in queue_plan, queue_plan
