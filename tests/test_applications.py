"""Several Mercado Pago applications in one broker (one per country): linking, refreshing,
webhooks and API keys each stay within a seller's own application.

Real PostgreSQL, the simulator over loopback serving every application's client, no mocks.
Two applications: `ar` (PKCE S256, required by its simulator client, on the shared
`/oauth/callback`) and `br` (PKCE off, on its own `/oauth/callback/br`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from alembic import command
from alembic.config import Config
from prometheus_client import REGISTRY
from pydantic import SecretStr, ValidationError

from bench.seed import copy_rows
from bench.seed import row as sealed_row
from service.core import db
from service.core.config import Settings
from service.core.crypto import generate_key_spec
from service.lifecycle.webhooks import signature
from service.serving import apikeys
from service.simulator import SimulatorClient, SimulatorConfig, create_simulator_app
from tests.support import (
    CLIENT_ID,
    CLIENT_SECRET,
    ROOT,
    SIM_EXPIRES_IN,
    Broker,
    FakeClock,
    Loopback,
    SellerBrowser,
    Simulator,
    assert_problem,
    bound_socket,
    calling_with,
    create_api_key,
    query_of,
    settings_keyring,
    wait_until,
)
from tests.support.servers import serve_broker, url_of
from tests.test_browser import (  # the Chromium helpers, and its fixture
    CHROMEDRIVER,
    CHROMIUM,
    Launch,
    decide,
    launch,  # noqa: F401
    open_consent,
)
from tests.test_observability import scrape, value

NO_CHROMIUM = "REAL-BROWSER TEST NOT RUN: install Debian's chromium and chromium-driver"

AR_ID, AR_SECRET = "7100000000000001", "ar-client-secret-0123456789"
BR_ID, BR_SECRET = "7200000000000002", "br-client-secret-0123456789"
AR_HOOK, BR_HOOK = "whsec-ar-0123456789abcdef", "whsec-br-0123456789abcdef"
KEYS = generate_key_spec("k1")
ALLOWLIST = ["https://platform.example/sellers/"]
DUE_AFTER_DAYS = 160  # past 5/6 of the simulator's 182.5-day tokens: every seller is due


def declared(broker: str, sim: str) -> list[dict[str, Any]]:
    """`ar` and `br` as BROKER_APPLICATIONS declares them, both on one simulator."""
    common = {"auth_url": f"{sim}/authorization", "token_url": f"{sim}/oauth/token"}
    return [
        {
            "name": "ar",
            "client_id": AR_ID,
            "client_secret": AR_SECRET,
            "redirect_uri": f"{broker}/oauth/callback",
            "country": "ar",
            "api_url": sim,
            "pkce": "S256",
            "webhook_secret": AR_HOOK,
            **common,
        },
        {
            "name": "br",
            "client_id": BR_ID,
            "client_secret": BR_SECRET,
            "redirect_uri": f"{broker}/oauth/callback/br",
            "country": "br",
            "api_url": sim,
            "pkce": "off",
            "webhook_secret": BR_HOOK,
            **common,
        },
    ]


def base(broker: str, **fields: Any) -> Settings:
    return Settings(
        _env_file=None,
        broker_env="dev",
        broker_public_url=broker,
        mp_timeout_seconds=2.0,
        broker_encryption_keys=SecretStr(KEYS),
        broker_return_url_allowlist=ALLOWLIST,
        **fields,
    )


def mp_fields(broker: str, sim: str) -> dict[str, Any]:
    """The single application of the MP_* settings, as conftest's `settings` has it."""
    return {
        "mp_client_id": CLIENT_ID,
        "mp_client_secret": SecretStr(CLIENT_SECRET),
        "mp_redirect_uri": f"{broker}/oauth/callback",
        "mp_auth_url": f"{sim}/authorization",
        "mp_token_url": f"{sim}/oauth/token",
        "mp_api_url": sim,
    }


def as_env(specs: list[dict[str, Any]]) -> SecretStr:
    return SecretStr(json.dumps(specs))


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def spec_changes() -> dict[str, dict[str, Any]]:
    """Parametrize this to change one application's declaration (by name) in the broker."""
    return {}


@pytest.fixture
def apps_settings(
    sockets: tuple[socket.socket, socket.socket],
    spec_changes: dict[str, dict[str, Any]],
    settings_overrides: dict[str, Any],
) -> Settings:
    broker, sim = url_of(sockets[0]), url_of(sockets[1])
    specs = [spec | spec_changes.get(spec["name"], {}) for spec in declared(broker, sim)]
    return base(broker, broker_applications=as_env(specs), **settings_overrides)


@pytest.fixture
async def apps_simulator(sockets: tuple[socket.socket, socket.socket]) -> AsyncIterator[Simulator]:
    """One simulator with every client the tests use, with the right secrets whatever the
    broker is told: the MP_* one (conftest's), `ar` (PKCE required) and `br` (PKCE off)."""
    broker = url_of(sockets[0])
    config = SimulatorConfig(
        clients=[
            SimulatorClient(CLIENT_ID, CLIENT_SECRET, (f"{broker}/oauth/callback",)),
            SimulatorClient(AR_ID, AR_SECRET, (f"{broker}/oauth/callback",), pkce_required=True),
            SimulatorClient(
                BR_ID, BR_SECRET, (f"{broker}/oauth/callback/br",), pkce_required=False
            ),
        ],
        expires_in=SIM_EXPIRES_IN,
    )
    async with (
        Loopback(create_simulator_app(config), sockets[1]) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        yield Simulator(server.url, http)
        await http.post("/_control/release")


@asynccontextmanager
async def serving(
    settings: Settings, sock: socket.socket, database_url: str, clock: FakeClock
) -> AsyncIterator[Broker]:
    """A broker on `sock` (closed when it stops), called with a key for every application."""
    key = await create_api_key(database_url)
    async with serve_broker(settings, sock, database_url, clock, key) as broker:
        yield broker


@pytest.fixture
async def apps_broker(
    apps_settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    database_url: str,
    clock: FakeClock,
    apps_simulator: Simulator,
) -> AsyncIterator[Broker]:
    async with serving(apps_settings, sockets[0], database_url, clock) as broker:
        yield broker


# -- the browser flow, in a real Chromium ---------------------------------------------------


@pytest.mark.browser
@pytest.mark.skipif(not (CHROMIUM.is_file() and CHROMEDRIVER.is_file()), reason=NO_CHROMIUM)
async def test_a_seller_links_through_each_application_in_one_chromium(
    apps_broker: Broker,
    apps_simulator: Simulator,
    launch: Launch,  # noqa: F811 (the fixture imported above)
) -> None:
    """One browser, two countries: `ar` with PKCE on the shared callback URL, `br` without
    PKCE on its own; each seller ends with its own application's grant."""
    chromium = await asyncio.to_thread(launch, "pt-BR")
    for seller_id, application, callback in (
        ("shop/ar", "ar", "/oauth/callback"),
        ("shop/br", "br", "/oauth/callback/br"),
    ):
        url = await apps_broker.start_link(seller_id, application=application)
        await asyncio.to_thread(open_consent, chromium, url)
        page = await asyncio.to_thread(decide, chromium, "allow", apps_broker.url, callback)
        assert page.title == "Sua conta foi vinculada"
    for seller_id, client_id in (("shop/ar", AR_ID), ("shop/br", BR_ID)):
        served = await apps_broker.token(seller_id)
        assert served.status_code == 200
        assert served.json()["access_token"].startswith(f"APP_USR-{client_id}-")  # its grant
    exchanges = [e for e in await apps_simulator.log() if e["grant_type"] == "authorization_code"]
    assert [(e["client_id"], e["has_code_verifier"], e["outcome"]) for e in exchanges] == [
        (AR_ID, True, "ok"),
        (BR_ID, False, "ok"),
    ]


# -- helpers ----------------------------------------------------------------------------------


async def link(
    broker: Broker, seller_id: str, application: str | None, user_id: int
) -> httpx.Response:
    body = {} if application is None else {"application": application}
    async with SellerBrowser() as browser:
        return await browser.link(await broker.start_link(seller_id, **body), user_id=user_id)


async def seed(
    sql: asyncpg.Connection,
    simulator: Simulator,
    settings: Settings,
    clock: FakeClock,
    client_id: str,
    prefix: str,
    user_id: int,
    count: int,
) -> list[str]:
    """Linked, due sellers of one application whose grants exist at the simulator."""
    reply = await simulator.http.post(
        "/_control/issue", json={"client_id": client_id, "user_id": user_id, "count": count}
    )
    reply.raise_for_status()
    ring, now = settings_keyring(settings), clock.now
    rows = [
        sealed_row(
            ring,
            client_id,
            f"{prefix}-{n}",
            grant["user_id"],
            grant["access_token"],
            grant["refresh_token"],
            now,
            now + timedelta(seconds=SIM_EXPIRES_IN),
            now - timedelta(seconds=1),
        )
        for n, grant in enumerate(reply.json())
    ]
    await copy_rows(sql, rows)
    return [row[0] for row in rows]


async def wave(broker: Broker, done: Callable[[], Awaitable[bool]], what: str) -> None:
    """One run of the background refresher until `done` holds, then stopped."""
    stop = asyncio.Event()
    loop = asyncio.create_task(broker.refresher.run(stop))
    try:
        await wait_until(done, what, 5.0)
    finally:
        stop.set()
        await loop


async def count(sql: asyncpg.Connection, query: str, *args: object) -> int:
    value = await sql.fetchval(query, *args)
    assert isinstance(value, int)
    return value


def refreshes(log: list[dict[str, Any]]) -> list[tuple[str | None, int | None, str]]:
    """The refresh requests that reached the simulator: (client_id, user_id, outcome)."""
    entries = [e for e in log if e["grant_type"] == "refresh_token"]
    return sorted(
        ((e["client_id"], e["user_id"], e["outcome"]) for e in entries),
        key=lambda e: (str(e[0]), e[1] or 0, e[2]),
    )


async def limited_key(database_url: str, client_ids: list[str]) -> str:
    engine = db.make_engine(database_url, "tests", pool_size=1)
    try:
        async with db.transaction(db.make_sessionmaker(engine)) as session:
            _, secret = await apikeys.create(
                session, "ar-only", datetime.now(UTC), apikeys.SCOPES, None, client_ids
            )
    finally:
        await engine.dispose()
    return secret


# -- 1. linking and refreshing through two applications ---------------------------------------


async def test_two_applications_link_and_refresh_each_seller_with_its_own_credentials(
    apps_broker: Broker,
    apps_simulator: Simulator,
    clock: FakeClock,
    sql: asyncpg.Connection,
) -> None:
    broker, simulator = apps_broker, apps_simulator
    before = await scrape(broker.http)
    async with SellerBrowser() as browser:
        authorization = await browser.open_link(await broker.start_link("ar-1", application="ar"))
        params = query_of(authorization)
        assert (params["client_id"], params["code_challenge_method"]) == (AR_ID, "S256")
        assert params["redirect_uri"] == f"{broker.url}/oauth/callback"
        page = await browser.callback(await browser.consent(authorization, "allow", 1001))
        assert page.status_code == 200, page.text
        assert "Your account is linked" in page.text
    async with SellerBrowser() as browser:
        authorization = await browser.open_link(await broker.start_link("br-1", application="br"))
        params = query_of(authorization)
        assert params["client_id"] == BR_ID
        assert "code_challenge" not in params
        callback = await browser.consent(authorization, "allow", 2002)
        assert callback.startswith(f"{broker.url}/oauth/callback/br?")
        page = await browser.callback(callback)
        assert page.status_code == 200, page.text
        assert "Your account is linked" in page.text

    rows = await sql.fetch("SELECT seller_id, client_id, mp_user_id FROM sellers ORDER BY 1")
    assert [tuple(r) for r in rows] == [("ar-1", AR_ID, 1001), ("br-1", BR_ID, 2002)]
    exchanges = [e for e in await simulator.log() if e["grant_type"] == "authorization_code"]
    assert sorted((e["client_id"], e["has_code_verifier"], e["outcome"]) for e in exchanges) == [
        (AR_ID, True, "ok"),
        (BR_ID, False, "ok"),
    ]
    for seller_id, name in (("ar-1", "ar"), ("br-1", "br")):
        status = (await broker.http.get(f"/sellers/{seller_id}")).json()
        assert status["application"] == name

    clock.advance(days=DUE_AFTER_DAYS)

    async def both_refreshed() -> bool:
        return await count(sql, "SELECT count(*) FROM sellers WHERE version = 2") == 2

    await wave(broker, both_refreshed, "both sellers refreshed")
    # Each at the simulator exactly once, with its own application's credentials (a wrong
    # client_id/secret pair would have been answered invalid_client).
    assert refreshes(await simulator.log()) == [(AR_ID, 1001, "ok"), (BR_ID, 2002, "ok")]
    grants = (await simulator.http.get("/_control/grants")).json()
    assert (grants["1001"]["client_id"], grants["1001"]["refreshes"]) == (AR_ID, 1)
    assert (grants["2002"]["client_id"], grants["2002"]["refreshes"]) == (BR_ID, 1)
    for seller_id in ("ar-1", "br-1"):
        reply = await broker.token(seller_id)
        assert reply.status_code == 200, reply.text
    assert await count(sql, "SELECT count(*) FROM app_breakers") == 0
    # Each application's counters count its own seller: one of each, under its name.
    after = await scrape(broker.http)
    for name in ("ar", "br"):
        for metric, labels in (
            ("broker_link_attempts_total", {"outcome": "linked"}),
            ("broker_token_exchanges_total", {"outcome": "linked"}),
            ("broker_refreshes_total", {"outcome": "refreshed", "reason": ""}),
            ("broker_events_emitted_total", {"type": "seller.linked"}),
            ("broker_upstream_request_duration_seconds_count", {"endpoint": "oauth_token"}),
        ):
            counted = value(after, metric, application=name, **labels)
            counted -= value(before, metric, application=name, **labels)
            expected = 2 if metric.startswith("broker_upstream") else 1  # exchange + refresh
            assert counted == expected, (name, metric, labels)


async def test_a_read_that_needs_a_fresh_token_refreshes_with_its_sellers_application(
    apps_broker: Broker,
    apps_simulator: Simulator,
    apps_settings: Settings,
    clock: FakeClock,
    sql: asyncpg.Connection,
) -> None:
    [seller] = await seed(sql, apps_simulator, apps_settings, clock, BR_ID, "br", 5300, 1)
    clock.advance(seconds=SIM_EXPIRES_IN - 60)  # a minute of validity left
    reply = await apps_broker.token(seller, min_ttl=600)
    assert reply.status_code == 200, reply.text
    assert refreshes(await apps_simulator.log()) == [(BR_ID, 5300, "ok")]
    assert await sql.fetchval("SELECT version FROM sellers") == 2


async def test_an_applications_own_callback_url_takes_only_its_own_attempts(
    apps_broker: Broker, apps_simulator: Simulator, sql: asyncpg.Connection
) -> None:
    async with SellerBrowser() as browser:
        callback = await browser.authorize(
            await apps_broker.start_link("ar-2", application="ar"), user_id=1002
        )
        assert callback.startswith(f"{apps_broker.url}/oauth/callback?")
        elsewhere = callback.replace("/oauth/callback?", "/oauth/callback/br?")
        refused = await browser.callback(elsewhere)
        assert refused.status_code == 400
        assert await apps_simulator.token_requests() == 0  # the code was not spent
        assert await sql.fetchval("SELECT consumed_at FROM link_attempts") is None
        page = await browser.callback(callback)
        assert page.status_code == 200, page.text
    assert await sql.fetchval("SELECT client_id FROM sellers") == AR_ID


async def test_a_refused_callback_counts_for_the_attempts_application(
    apps_broker: Broker, apps_simulator: Simulator
) -> None:
    """On the shared callback URL the application is known once the state names the attempt:
    a refusal after that (here another browser's) is counted for it, not for "" ."""

    def refused(application: str) -> float:
        labels = {"application": application, "outcome": "unbound_browser"}
        return REGISTRY.get_sample_value("broker_link_attempts_total", labels) or 0.0

    before = refused("ar"), refused("")
    async with SellerBrowser() as browser, SellerBrowser() as stranger:
        callback = await browser.authorize(
            await apps_broker.start_link("ar-3", application="ar"), user_id=1003
        )
        assert (await stranger.callback(callback)).status_code == 403
    assert (refused("ar"), refused("")) == (before[0] + 1, before[1])
    assert await apps_simulator.token_requests() == 0


@pytest.mark.parametrize("spec_changes", [{"ar": {"refresh_rate_per_second": 4}}])
@pytest.mark.parametrize("settings_overrides", [{"broker_refresh_concurrency": 16}])
async def test_each_application_refreshes_within_its_own_rate_limit(
    apps_broker: Broker,
    apps_simulator: Simulator,
    apps_settings: Settings,
    clock: FakeClock,
    sql: asyncpg.Connection,
) -> None:
    """ar's limit (4/s, no burst) spaces ar's sends; br's (the default) does not
    wait for ar's: both applications' sellers come due in one wave."""
    await seed(sql, apps_simulator, apps_settings, clock, AR_ID, "ar", 7000, 8)
    await seed(sql, apps_simulator, apps_settings, clock, BR_ID, "br", 8000, 8)

    async def settled() -> bool:
        return await count(sql, "SELECT count(*) FROM sellers WHERE version = 2") == 16

    await wave(apps_broker, settled, "every seller of both applications refreshed")
    sent = [e for e in await apps_simulator.log() if e["grant_type"] == "refresh_token"]
    ar = sorted(e["at"] for e in sent if e["client_id"] == AR_ID)
    br = sorted(e["at"] for e in sent if e["client_id"] == BR_ID)
    assert (len(ar), len(br)) == (8, 8)
    # One at once, then one every 0.25 s: never ahead of the limit, the 8th 1.75 s after the
    # first. 60 ms for the loop's jitter (the first may reach the simulator late); with a
    # burst they would come together, unlimited all at 0.
    for k in range(1, 8):
        assert ar[k] - ar[0] >= k * 0.25 - 0.06, [round(t - ar[0], 3) for t in ar]
    assert br[-1] < ar[5]  # br at its own rate (default 10/s: 0.7 s for 8), not ar's 4/s


# -- 2. one application's breaker does not pause another's ------------------------------------


@pytest.mark.parametrize("spec_changes", [{"br": {"client_secret": "br-wrong-secret-987654"}}])
@pytest.mark.parametrize("settings_overrides", [{"broker_refresh_concurrency": 1}])
async def test_a_broken_secret_trips_only_its_applications_breaker(
    apps_broker: Broker,
    apps_simulator: Simulator,
    apps_settings: Settings,
    clock: FakeClock,
    sql: asyncpg.Connection,
) -> None:
    # One slot: one refresh at a time, so whichever application claims first, at least three
    # of ar's four sellers are sent after br's breaker has tripped, in this same wave.
    ar = await seed(sql, apps_simulator, apps_settings, clock, AR_ID, "ar", 5000, 4)
    br = await seed(sql, apps_simulator, apps_settings, clock, BR_ID, "br", 6000, 2)

    async def settled() -> bool:
        refreshed = await count(
            sql, "SELECT count(*) FROM sellers WHERE version = 2 AND client_id = $1", AR_ID
        )
        tripped = await count(sql, "SELECT count(*) FROM app_breakers")
        leased = await count(sql, "SELECT count(*) FROM sellers WHERE lease_owner IS NOT NULL")
        return refreshed == len(ar) and tripped == 1 and leased == 0

    await wave(apps_broker, settled, "ar refreshed and br's breaker tripped")

    breakers = await sql.fetch("SELECT client_id, reason FROM app_breakers")
    assert [tuple(r) for r in breakers] == [(BR_ID, "invalid_client")]
    rows = await sql.fetch(
        "SELECT seller_id, status, status_reason, version FROM sellers WHERE client_id = $1",
        BR_ID,
    )
    assert sorted(tuple(r) for r in rows) == [(sid, "linked", None, 1) for sid in br]
    log = [e for e in await apps_simulator.log() if e["grant_type"] == "refresh_token"]
    assert sorted((e["client_id"], e["user_id"], e["outcome"]) for e in log) == [
        (AR_ID, 5000 + n, "ok") for n in range(4)
    ] + [(BR_ID, None, "invalid_client")]  # one br request: after it, br is not even claimed
    tripped_at = next(n for n, e in enumerate(log) if e["client_id"] == BR_ID)
    assert sum(1 for e in log[tripped_at:] if e["client_id"] == AR_ID) >= 3
    grants = (await apps_simulator.http.get("/_control/grants")).json()
    assert [grants[str(6000 + n)]["refreshes"] for n in range(2)] == [0, 0]
    assert [grants[str(5000 + n)]["refreshes"] for n in range(4)] == [1, 1, 1, 1]


# -- 3. webhooks verified with their own application's secret ---------------------------------


async def deliver(
    broker: Broker, application_id: str, user_id: int, secret: str, request_id: str
) -> httpx.Response:
    body = {
        "id": 12345,
        "live_mode": True,
        "type": "mp-connect",
        "date_created": "2026-11-28T12:00:00Z",
        "application_id": application_id,
        "user_id": user_id,
        "version": 1,
        "api_version": "v1",
        "action": "application.deauthorized",
        "data": {"id": str(user_id)},
    }
    stamp = str(int(datetime.now(UTC).timestamp()))
    v1 = signature(secret, str(user_id), request_id, stamp)
    async with httpx.AsyncClient(base_url=broker.url) as mercadopago:
        return await mercadopago.post(
            "/webhooks/mercadopago",
            params={"data.id": str(user_id), "type": "mp-connect"},
            content=json.dumps(body),
            headers={
                "content-type": "application/json",
                "x-signature": f"ts={stamp},v1={v1}",
                "x-request-id": request_id,
            },
        )


async def test_a_notification_is_verified_with_its_applications_secret_only(
    apps_broker: Broker,
    apps_simulator: Simulator,
    apps_settings: Settings,
    clock: FakeClock,
    sql: asyncpg.Connection,
) -> None:
    # One Mercado Pago account linked in both countries; it deauthorizes everything.
    await seed(sql, apps_simulator, apps_settings, clock, AR_ID, "ar", 3003, 1)
    await seed(sql, apps_simulator, apps_settings, clock, BR_ID, "br", 3003, 1)
    await apps_simulator.http.post("/_control/revoke", json={"user_id": 3003})
    before = await sql.fetch("SELECT * FROM sellers ORDER BY seller_id")

    forged = await deliver(apps_broker, BR_ID, 3003, AR_HOOK, "req-ar-secret")
    assert_problem(forged, 401, "invalid_signature")
    assert await sql.fetch("SELECT * FROM sellers ORDER BY seller_id") == before

    reply = await deliver(apps_broker, BR_ID, 3003, BR_HOOK, "req-br-secret")
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"action": "unlinked"}
    rows = await sql.fetch("SELECT seller_id, status, status_reason FROM sellers ORDER BY 1")
    assert [tuple(r) for r in rows] == [
        ("ar-0", "linked", None),  # ar's own notification would be needed for it
        ("br-0", "unlinked", "deauthorized"),
    ]


# -- 4. a seller stays in the application it was linked through -------------------------------


async def test_a_seller_linked_through_one_application_is_not_relinked_through_another(
    apps_broker: Broker, apps_simulator: Simulator, sql: asyncpg.Connection
) -> None:
    broker, seller = apps_broker, "seller-x"
    stale_br_link = await broker.start_link(seller, application="br")  # before it was linked
    consented_br_link = await broker.start_link(seller, application="br")
    async with SellerBrowser() as late:
        br_callback = await late.authorize(consented_br_link, user_id=4004)
        page = await link(broker, seller, "ar", 4004)
        assert page.status_code == 200, page.text
        linked = await sql.fetchrow("SELECT * FROM sellers WHERE seller_id = $1", seller)
        assert linked["client_id"] == AR_ID
        links_before = await count(sql, "SELECT count(*) FROM links")
        attempts_before = await sql.fetch("SELECT * FROM link_attempts ORDER BY created_at, id")
        log_before = await apps_simulator.log()

        refused = await broker.http.post(
            "/link/start", json={"seller_id": seller, "application": "br"}
        )
        assert_problem(refused, 409, "application_mismatch")
        assert await count(sql, "SELECT count(*) FROM links") == links_before

        opened = await late.http.get(stale_br_link)
        assert opened.status_code == 409
        assert "linked in another country" in opened.text
        came_back = await late.callback(br_callback)
        assert came_back.status_code == 409
        assert "linked in another country" in came_back.text

    # No new attempt, the consented one untouched, nothing sent, the seller as it was.
    assert await sql.fetch("SELECT * FROM link_attempts ORDER BY created_at, id") == attempts_before
    assert [a["client_id"] for a in attempts_before].count(BR_ID) == 1
    assert await apps_simulator.log() == log_before
    assert [e["client_id"] for e in log_before] == [AR_ID]
    assert await sql.fetchrow("SELECT * FROM sellers WHERE seller_id = $1", seller) == linked


@pytest.mark.parametrize("settings_overrides", [{"broker_allow_account_change": True}])
async def test_with_account_changes_allowed_a_seller_moves_to_another_application(
    apps_broker: Broker, apps_simulator: Simulator, sql: asyncpg.Connection
) -> None:
    broker, seller = apps_broker, "seller-y"
    assert (await link(broker, seller, "ar", 4005)).status_code == 200
    page = await link(broker, seller, "br", 4005)
    assert page.status_code == 200, page.text
    row = await sql.fetchrow("SELECT client_id, version, status FROM sellers")
    assert tuple(row) == (BR_ID, 2, "linked")
    assert (await broker.http.get(f"/sellers/{seller}")).json()["application"] == "br"
    token = await broker.token(seller)
    assert token.status_code == 200, token.text
    assert token.json()["access_token"].startswith(f"APP_USR-{BR_ID}-")
    exchanges = [(e["client_id"], e["outcome"]) for e in await apps_simulator.log()]
    assert exchanges == [(AR_ID, "ok"), (BR_ID, "ok")]


# -- 5. keys limited to applications ----------------------------------------------------------


async def test_a_key_limited_to_one_application_acts_only_within_it(
    apps_broker: Broker,
    apps_simulator: Simulator,
    apps_settings: Settings,
    clock: FakeClock,
    database_url: str,
    sql: asyncpg.Connection,
) -> None:
    [ar_seller] = await seed(sql, apps_simulator, apps_settings, clock, AR_ID, "ar", 5100, 1)
    [br_seller] = await seed(sql, apps_simulator, apps_settings, clock, BR_ID, "br", 5200, 1)
    key = await limited_key(database_url, [AR_ID])
    async with calling_with(apps_broker, key) as caller:
        other_app = await caller.post("/link/start", json={"seller_id": "new", "application": "br"})
        assert_problem(other_app, 403, "forbidden")
        assert await count(sql, "SELECT count(*) FROM links") == 0
        own_app = await caller.post("/link/start", json={"seller_id": "new", "application": "ar"})
        assert own_app.status_code == 201, own_app.text

        other_seller = await caller.get(f"/sellers/{br_seller}/token")
        assert_problem(other_seller, 403, "forbidden")
        unknown_seller = await caller.get("/sellers/nobody-at-all/token")
        assert_problem(unknown_seller, 403, "forbidden")
        assert unknown_seller.json() == other_seller.json()  # nothing learnt about br's sellers

        own_seller = await caller.get(f"/sellers/{ar_seller}/token")
        assert own_seller.status_code == 200, own_seller.text
        assert own_seller.json()["mp_user_id"] == 5100

        # Nothing of the other applications, not even their names: one that does not exist
        # is the same 403 as br, and the list offered holds the key's own only.
        no_such_app = await caller.post(
            "/link/start", json={"seller_id": "new", "application": "mx"}
        )
        assert_problem(no_such_app, 403, "forbidden")
        assert no_such_app.json() == other_app.json()
        unnamed = await caller.post("/link/start", json={"seller_id": "new"})
        assert_problem(unnamed, 422, "unknown_application")
        assert "ar" in unnamed.json()["detail"]
        assert "br" not in unnamed.json()["detail"]

        # Every other route that names a seller or an application: br's are out of reach.
        for method, path in (
            ("GET", f"/sellers/{br_seller}"),
            ("DELETE", f"/sellers/{br_seller}"),
            ("POST", f"/sellers/{br_seller}/token/invalid"),
            ("GET", f"/audit?seller_id={br_seller}"),
            ("GET", "/audit?application=br"),
            ("GET", "/audit"),
        ):
            refused = await caller.request(method, path)
            assert_problem(refused, 403, "forbidden")
        assert await count(sql, "SELECT count(*) FROM sellers WHERE status = 'linked'") == 2
        listed = await caller.get("/sellers")
        assert [s["seller_id"] for s in listed.json()["items"]] == [ar_seller]
        assert [a["name"] for a in (await caller.get("/applications")).json()] == ["ar"]
        assert (await caller.get(f"/sellers/{ar_seller}")).json()["application"] == "ar"

        # Its own application's audit holds its token reads, each under its application.
        runtime = apps_broker.app.state.runtime
        await runtime.reads.flush(runtime.db.direct)
        entries = (await caller.get("/audit?application=ar")).json()
        reads = [e for e in entries if e["action"] == "token.read"]
        assert [(e["seller_id"], e["application"]) for e in reads] == [(ar_seller, "ar")]
    # A key for every application still reads both.
    assert (await apps_broker.token(br_seller)).status_code == 200


async def test_a_seller_of_an_application_no_longer_configured_can_be_unlinked_and_audited(
    apps_broker: Broker, apps_settings: Settings, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    """Its entries name it `unconfigured:<client_id>`, and a client_id may be 64 characters."""
    gone = "9" * 64
    ring, now = settings_keyring(apps_settings), clock.now
    row = sealed_row(ring, gone, "old-1", 77, "APP_USR-a-77", "TG-r-77", now, now, now)
    await copy_rows(sql, [row])
    unlinked = await apps_broker.http.delete("/sellers/old-1")
    assert unlinked.status_code == 200, unlinked.text
    assert unlinked.json()["application"] == f"unconfigured:{gone}"
    entries = (await apps_broker.http.get("/audit?seller_id=old-1")).json()
    assert [(e["action"], e["application"]) for e in entries] == [
        ("seller.unlinked", f"unconfigured:{gone}")
    ]


# -- 6. configuration ---------------------------------------------------------------------------


async def test_link_start_refuses_an_unknown_or_missing_application(
    apps_broker: Broker, sql: asyncpg.Connection
) -> None:
    unknown = await apps_broker.http.post(
        "/link/start", json={"seller_id": "s-1", "application": "mx"}
    )
    assert_problem(unknown, 422, "unknown_application")
    assert "ar, br" in unknown.json()["detail"]
    missing = await apps_broker.http.post("/link/start", json={"seller_id": "s-1"})
    assert_problem(missing, 422, "unknown_application")
    assert await count(sql, "SELECT count(*) FROM links") == 0
    assert await count(sql, "SELECT count(*) FROM audit_events WHERE seller_id = 's-1'") == 0


BROKER, SIM = "http://127.0.0.1:8000", "http://127.0.0.1:8001"
SECRET_VALUES = (AR_SECRET, BR_SECRET, AR_HOOK, BR_HOOK, KEYS)


def _twice(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [specs[0], specs[1] | {"name": "ar", "redirect_uri": specs[0]["redirect_uri"]}]


def _same_client(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [specs[0], specs[1] | {"client_id": AR_ID}]


def _no_secret(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [specs[0], {k: v for k, v in specs[1].items() if k != "client_secret"}]


def _bad_country(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [specs[0], specs[1] | {"country": "zz"}]


def _unserved_callback(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [specs[0], specs[1] | {"redirect_uri": f"{BROKER}/oauth/callback/ar"}]  # ar's URL


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (_twice, ("'ar'", "name")),
        (_same_client, ("'ar'", "'br'", "client_id")),
        (_no_secret, ("'br'", "client_secret")),
        (_bad_country, ("'br'", "country")),
        (_unserved_callback, ("'br'", "redirect_uri", "/oauth/callback/br")),
    ],
)
def test_a_wrong_declaration_names_the_application_and_the_field_and_no_secret(
    change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]], named: tuple[str, ...]
) -> None:
    with pytest.raises(ValidationError) as raised:
        base(BROKER, broker_applications=as_env(change(declared(BROKER, SIM))))
    message = str(raised.value)
    for part in named:
        assert part in message, message
    for secret in SECRET_VALUES:
        assert secret not in message, message


def test_applications_may_come_from_a_json_file(tmp_path: Path) -> None:
    path = tmp_path / "applications.json"
    path.write_text(json.dumps(declared(BROKER, SIM)))
    settings = base(BROKER, broker_applications_file=path)
    assert [(a.name, a.client_id) for a in settings.apps.values()] == [("ar", AR_ID), ("br", BR_ID)]


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (None, "cannot be read"),
        ('[{"name": "ar", "client_secret": "' + AR_SECRET + '", ', "not valid json"),
    ],
)
def test_an_unreadable_or_broken_file_is_named_and_its_content_never_shown(
    tmp_path: Path, content: str | None, said: str
) -> None:
    path = tmp_path / "applications.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValidationError) as raised:
        base(BROKER, broker_applications_file=path)
    message = str(raised.value)
    assert "BROKER_APPLICATIONS_FILE" in message, message
    assert said in message, message
    assert AR_SECRET not in message, message


def test_the_file_and_the_variable_are_not_both_set(tmp_path: Path) -> None:
    path = tmp_path / "applications.json"
    path.write_text(json.dumps(declared(BROKER, SIM)))
    with pytest.raises(ValidationError, match="not both"):
        base(
            BROKER, broker_applications_file=path, broker_applications=as_env(declared(BROKER, SIM))
        )


def test_applications_may_come_from_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "applications.toml"
    path.write_text(
        f"""
[[applications]]
name = "ar"
client_id = "{AR_ID}"
client_secret = ["{AR_SECRET}", "ar-previous-secret-0123456"]
redirect_uri = "{BROKER}/oauth/callback"
country = "AR"
webhook_secret = "{AR_HOOK}"

[[applications]]
name = "br"
client_id = "{BR_ID}"
client_secret = "{BR_SECRET}"
redirect_uri = "{BROKER}/oauth/callback/br"
country = "br"
pkce = "off"
refresh_rate_per_second = 2.5
"""
    )
    apps = base(BROKER, broker_applications_file=path).apps
    assert list(apps) == ["ar", "br"]
    ar, br = apps["ar"], apps["br"]
    assert (ar.client_id, br.client_id) == (AR_ID, BR_ID)
    assert ar.oauth.client_secrets == (AR_SECRET, "ar-previous-secret-0123456")
    assert ar.oauth.auth_url == "https://auth.mercadopago.com.ar/authorization"
    assert ar.oauth.token_url == "https://api.mercadopago.com/oauth/token"
    assert (ar.challenge_method, ar.webhook_secrets) == ("S256", (AR_HOOK,))
    assert br.oauth.auth_url == "https://auth.mercadopago.com.br/authorization"
    assert (br.challenge_method, br.refresh_rate, br.webhook_secrets) == (None, 2.5, ())
    assert br.oauth.redirect_uri == f"{BROKER}/oauth/callback/br"
    assert apps.by_client_id[BR_ID] is br


def _production(specs: list[dict[str, Any]]) -> Settings:
    return Settings(
        _env_file=None,
        broker_env="production",
        database_url="postgresql+asyncpg://broker@db.internal/broker",
        broker_public_url="https://broker.example",
        broker_encryption_keys=SecretStr(KEYS),
        broker_applications=as_env(specs),
    )


def _real(name: str, client_id: str, secret: str) -> dict[str, Any]:
    return {
        "name": name,
        "client_id": client_id,
        "client_secret": secret,
        "redirect_uri": f"https://broker.example/oauth/callback/{name}",
        "country": name,
    }


def test_production_accepts_real_declarations() -> None:
    settings = _production([_real("ar", AR_ID, AR_SECRET), _real("br", BR_ID, BR_SECRET)])
    assert list(settings.apps) == ["ar", "br"]


@pytest.mark.parametrize(
    ("change", "refused"),
    [
        ({"redirect_uri": "http://broker.example/oauth/callback/br"}, "redirect_uri (https)"),
        ({"client_secret": "changeme"}, "client_secret"),
        ({"client_id": "2234567890123456"}, "client_id"),  # the demo's br
        ({"webhook_secret": "changeme"}, "webhook_secret"),
        ({"auth_url": "http://auth.mercadopago.com.br/authorization"}, "auth_url (https)"),
        ({"token_url": "http://api.mercadopago.com/oauth/token"}, "token_url (https)"),
        ({"api_url": "http://api.mercadopago.com"}, "api_url (https)"),
    ],
)
def test_production_refuses_a_declared_application_with_an_unfit_value_naming_it(
    change: dict[str, str], refused: str
) -> None:
    with pytest.raises(ValidationError) as raised:
        _production([_real("ar", AR_ID, AR_SECRET), _real("br", BR_ID, BR_SECRET) | change])
    message = str(raised.value)
    assert f"application 'br' {refused}" in message, message
    assert "application 'ar'" not in message, message
    for secret in (AR_SECRET, BR_SECRET, KEYS):
        assert secret not in message, message


# -- 7. the account from GET /users/me ----------------------------------------------------------


async def test_a_plain_token_reply_is_completed_by_users_me(
    apps_broker: Broker, apps_simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    await apps_simulator.faults(plain_reply=True)
    page = await link(apps_broker, "plain-1", "ar", 7007)
    assert page.status_code == 200, page.text
    row = await sql.fetchrow("SELECT client_id, mp_user_id, status FROM sellers")
    assert tuple(row) == (AR_ID, 7007, "linked")
    token = (await apps_broker.token("plain-1")).json()
    assert token["mp_user_id"] == 7007
    assert not token["access_token"].endswith("-7007")  # opaque: only /users/me could tell
    assert await sql.fetchval("SELECT outcome FROM link_attempts") == "linked"

    # A plain refresh reply keeps the account the link found (no /users/me call for it).
    clock.advance(days=DUE_AFTER_DAYS)

    async def refreshed() -> bool:
        return await count(sql, "SELECT count(*) FROM sellers WHERE version = 2") == 1

    await wave(apps_broker, refreshed, "the seller refreshed with a plain reply")
    row = await sql.fetchrow("SELECT mp_user_id, status FROM sellers")
    assert tuple(row) == (7007, "linked")
    assert refreshes(await apps_simulator.log()) == [(AR_ID, 7007, "ok")]


async def test_an_account_nobody_names_is_not_linked(
    apps_broker: Broker,
    apps_simulator: Simulator,
    sql: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await apps_simulator.faults(plain_reply=True, users_me_status=503)
    caplog.set_level(logging.INFO, logger="broker.linking")
    page = await link(apps_broker, "plain-2", "br", 7008)
    assert page.status_code == 502, page.text
    assert "did not say which account" in page.text
    assert await count(sql, "SELECT count(*) FROM sellers") == 0
    attempt = await sql.fetchrow("SELECT outcome, consumed_at FROM link_attempts")
    assert attempt["outcome"] == "account_unknown"
    assert attempt["consumed_at"] is not None
    unknown = [r for r in caplog.records if r.getMessage() == "callback.account_unknown"]
    assert [(r.levelno, getattr(r, "fields", {}).get("application")) for r in unknown] == [
        (logging.WARNING, "br")
    ]
    # Mercado Pago did exchange the code: the broker asked, and gave the tokens up.
    assert [(e["client_id"], e["outcome"]) for e in await apps_simulator.log()] == [(BR_ID, "ok")]


# -- 8. from MP_* to several applications, with sellers already linked --------------------------


@pytest.mark.parametrize("variant", ["mp_plus_declared", "declared_only"])
async def test_sellers_linked_under_mp_settings_keep_working_after_declaring_applications(
    variant: str,
    sockets: tuple[socket.socket, socket.socket],
    apps_simulator: Simulator,
    database_url: str,
    clock: FakeClock,
    sql: asyncpg.Connection,
) -> None:
    first_url, sim = url_of(sockets[0]), apps_simulator.url
    before = base(first_url, **mp_fields(first_url, sim))
    async with serving(before, sockets[0], database_url, clock) as broker:
        assert (await link(broker, "old-1", None, 8008)).status_code == 200
        served = (await broker.token("old-1")).json()
    row = await sql.fetchrow("SELECT * FROM sellers")
    assert row["client_id"] == CLIENT_ID

    sock = bound_socket()
    url = url_of(sock)
    specs = declared(url, sim)
    if variant == "mp_plus_declared":
        after = base(url, **mp_fields(url, sim), broker_applications=as_env(specs[1:]))
        name, names = "default", ["default", "br"]
    else:  # the same client_id, now declared under a name of its own
        own = specs[0] | {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}
        after = base(url, broker_applications=as_env([own, specs[1]]))
        name, names = "ar", ["ar", "br"]
    assert list(after.apps) == names
    async with serving(after, sock, database_url, clock) as broker:
        reply = await broker.token("old-1")
        assert reply.status_code == 200, reply.text
        assert reply.json()["access_token"] == served["access_token"]
        status = (await broker.http.get("/sellers/old-1")).json()
        assert (status["application"], status["client_id"]) == (name, CLIENT_ID)
        assert await sql.fetchrow("SELECT * FROM sellers") == row  # no row rewritten

        clock.advance(days=DUE_AFTER_DAYS)

        async def refreshed() -> bool:
            return await count(sql, "SELECT version FROM sellers") == 2

        await wave(broker, refreshed, "the old seller refreshed")
        assert (await broker.token("old-1")).status_code == 200
    assert refreshes(await apps_simulator.log()) == [(CLIENT_ID, 8008, "ok")]


# -- 9. revision 0007 on a database with rows -------------------------------------------------


def _alembic(url: str, action: str, revision: str) -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    getattr(command, action)(config, revision)


async def _indexes(sql: asyncpg.Connection) -> dict[str, tuple[bool, str]]:
    rows = await sql.fetch(
        "SELECT c.relname, i.indisvalid, pg_get_indexdef(i.indexrelid) AS def FROM pg_index i "
        "JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_class t ON t.oid = i.indrelid "
        "WHERE t.relname = 'sellers'"
    )
    return {r["relname"]: (r["indisvalid"], r["def"]) for r in rows}


async def _rows(sql: asyncpg.Connection, table: str) -> list[dict[str, Any]]:
    return [dict(r) for r in await sql.fetch(f"SELECT * FROM {table} ORDER BY 1")]  # noqa: S608


async def _old_seller(sql: asyncpg.Connection, seller_id: str) -> None:
    """A linked seller as a 0006 replica writes it (sealed values are opaque to the schema)."""
    await sql.execute(
        "INSERT INTO sellers (seller_id, client_id, mp_user_id, status, access_token, "
        "refresh_token, scope, live_mode, expires_at, next_refresh_at, version, linked_at, "
        "updated_at) VALUES ($1, $2, 42, 'linked', 'v1.k1.a', 'v1.k1.r', 'read', true, "
        "now() + interval '180 days', now() + interval '150 days', 3, now(), now())",
        seller_id,
        CLIENT_ID,
    )


async def test_revision_0007_keeps_rows_and_moves_the_work_queue_index(
    database_url: str, sql: asyncpg.Connection
) -> None:
    old_queue, new_queue = (
        "ix_sellers_next_refresh_at_linked",
        "ix_sellers_client_id_next_refresh_at_linked",
    )
    await asyncio.to_thread(_alembic, database_url, "downgrade", "0006")
    assert old_queue in await _indexes(sql)
    await sql.execute(
        "INSERT INTO api_keys (id, name, prefix, digest, scopes, namespace, created_at) VALUES "
        "('k-1', 'old-key', 'aaaaaaaa', 'd', '{tokens:read}', NULL, now())"
    )
    await _old_seller(sql, "s-1")
    await sql.execute(
        "INSERT INTO links (id_hash, seller_id, client_id, return_url, test, created_by, "
        "created_at, expires_at) VALUES ('h-1', 's-1', $1, NULL, false, 'k-1', now(), "
        "now() + interval '7 days')",
        CLIENT_ID,
    )
    await sql.execute(
        "INSERT INTO link_attempts (id, link_id_hash, seller_id, client_id, state_hash, "
        "binder_hash, code_verifier, challenge_method, test, created_at, expires_at) VALUES "
        "('a-1', 'h-1', 's-1', $1, 'st-1', 'b-1', NULL, NULL, false, now(), "
        "now() + interval '10 minutes')",
        CLIENT_ID,
    )
    with pytest.raises(asyncpg.CheckViolationError):  # 0006 does not know the outcome yet
        await sql.execute("UPDATE link_attempts SET outcome = 'account_unknown'")
    before = {t: await _rows(sql, t) for t in ("sellers", "links", "link_attempts", "api_keys")}

    await asyncio.to_thread(_alembic, database_url, "upgrade", "0007")
    assert await sql.fetchval("SELECT version_num FROM alembic_version") == "0007"
    after = {t: await _rows(sql, t) for t in ("sellers", "links", "link_attempts")}
    assert after == {t: before[t] for t in after}
    [key] = await _rows(sql, "api_keys")
    assert key.pop("client_ids") is None  # every application, as before
    assert [key] == before["api_keys"]
    indexes = await _indexes(sql)
    assert old_queue not in indexes
    valid, definition = indexes[new_queue]
    assert valid
    assert "(client_id, next_refresh_at) WHERE" in definition
    assert "'linked'" in definition
    await sql.execute(
        "UPDATE link_attempts SET outcome = 'account_unknown', consumed_at = now() WHERE id = 'a-1'"
    )

    await asyncio.to_thread(_alembic, database_url, "downgrade", "0006")
    assert await sql.fetchval("SELECT version_num FROM alembic_version") == "0006"
    indexes = await _indexes(sql)
    assert indexes[old_queue][0]
    assert new_queue not in indexes
    assert await sql.fetchval("SELECT outcome FROM link_attempts") == "exchange_failed"
    columns = await sql.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'api_keys'"
    )
    assert "client_ids" not in {c["column_name"] for c in columns}
    assert await _rows(sql, "sellers") == before["sellers"]
    assert await _rows(sql, "api_keys") == before["api_keys"]


async def test_revision_0007_lets_sellers_be_written_while_it_runs(
    database_url: str, sql: asyncpg.Connection
) -> None:
    """A rolling upgrade: old replicas keep writing sellers while 0007 runs. A transaction of
    theirs still open on `sellers` makes the index build wait for it (CONCURRENTLY), and
    meanwhile every other write goes through: the migration holds no lock that blocks them."""
    await asyncio.to_thread(_alembic, database_url, "downgrade", "0006")
    for seller_id in ("s-1", "s-2"):
        await _old_seller(sql, seller_id)
    in_flight = await asyncpg.connect(**db.asyncpg_params(database_url))
    writer = await asyncpg.connect(**db.asyncpg_params(database_url))
    try:
        await in_flight.execute("BEGIN")
        await in_flight.execute("UPDATE sellers SET version = version + 1 WHERE seller_id = 's-1'")
        upgrade = asyncio.ensure_future(
            asyncio.to_thread(_alembic, database_url, "upgrade", "0007")
        )

        async def building() -> bool:
            return bool(
                await sql.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND query LIKE 'CREATE INDEX CONCURRENTLY%'"
                )
            )

        await wait_until(building, "0007 waits for the open transaction to build its index", 20)
        held = await sql.fetch(
            "SELECT l.mode FROM pg_locks l JOIN pg_class c ON c.oid = l.relation "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE c.relname = 'sellers' "
            "AND a.query LIKE 'CREATE INDEX CONCURRENTLY%' AND l.granted"
        )
        assert {r["mode"] for r in held} == {"ShareUpdateExclusiveLock"}  # writes go on
        await writer.execute("SET statement_timeout = '2s'")
        await writer.execute("UPDATE sellers SET version = version + 1 WHERE seller_id = 's-2'")
        await _old_seller(writer, "s-3")
        assert not upgrade.done()
        await in_flight.execute("COMMIT")
        await asyncio.wait_for(upgrade, 30)
    finally:
        await in_flight.close()
        await writer.close()
    assert await sql.fetchval("SELECT version_num FROM alembic_version") == "0007"
    assert (await _indexes(sql))["ix_sellers_client_id_next_refresh_at_linked"][0]
    versions = await sql.fetch("SELECT seller_id, version FROM sellers ORDER BY 1")
    assert [tuple(r) for r in versions] == [("s-1", 4), ("s-2", 4), ("s-3", 3)]
