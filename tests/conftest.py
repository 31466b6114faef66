"""Fixtures: a real PostgreSQL (embedded, or DATABASE_URL), a fresh database per test built
from an Alembic-migrated template, the simulator and the broker as real servers on loopback.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import asyncpg
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from service.core.config import Settings
from service.core.crypto import Keyring, context, generate_key_spec
from service.main import create_app
from service.ops import embedded
from service.ops.cli import QuietServer, migrate
from service.refresh.engine import Refresher
from service.simulator import SimulatorClient, SimulatorConfig, create_simulator_app

CLIENT_ID = "7000000000000001"
CLIENT_SECRET = "test-client-secret-0123456789"
SIM_EXPIRES_IN = 15768000  # seen from Mercado Pago; differs from the documented 180 days


# -- PostgreSQL ----------------------------------------------------------------------------


def _asyncpg_dsn(url: str) -> tuple[str, dict[str, Any]]:
    """asyncpg wants a plain DSN; a Unix-socket `host=` query goes in as a keyword."""
    parsed = make_url(url)
    kwargs: dict[str, Any] = {
        "user": parsed.username or "postgres",
        "database": parsed.database,
        "password": parsed.password,
    }
    host = parsed.query.get("host")
    kwargs["host"] = host if isinstance(host, str) else parsed.host or "127.0.0.1"
    if parsed.port:
        kwargs["port"] = parsed.port
    return "", kwargs


async def admin_connect(url: str) -> asyncpg.Connection:
    _, kwargs = _asyncpg_dsn(url)
    return await asyncpg.connect(**kwargs)


def _with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """DATABASE_URL when given (its database is the admin one), else an embedded server."""
    given = os.environ.get("DATABASE_URL")
    if given:
        return Settings(_env_file=None, database_url=given).database_url or given
    return embedded.start(tmp_path_factory.mktemp("pg"), database="postgres")


@pytest.fixture(scope="session")
def template_url(server_url: str) -> Iterator[str]:
    """A database migrated by Alembic once; each test clones it."""
    name = f"broker_tpl_{uuid.uuid4().hex[:8]}"
    asyncio.run(_execute(server_url, f'CREATE DATABASE "{name}"'))
    url = _with_database(server_url, name)
    migrate(url)
    yield url
    asyncio.run(_execute(server_url, f'DROP DATABASE IF EXISTS "{name}"'))


async def _execute(url: str, sql: str) -> None:
    conn = await admin_connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def database_url(server_url: str, template_url: str) -> AsyncIterator[str]:
    name = f"broker_t_{uuid.uuid4().hex[:12]}"
    template = make_url(template_url).database
    await _execute(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    yield _with_database(server_url, name)
    await _execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def sql(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for assertions about what is stored."""
    conn = await admin_connect(database_url)
    yield conn
    await conn.close()


# -- clock -----------------------------------------------------------------------------------


@dataclass
class FakeClock:
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- servers on loopback ---------------------------------------------------------------------


def _bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this; without it every reply waits ~40 ms on delayed ACKs.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"http://{host}:{port}"


class Loopback:
    """A real uvicorn server in the test's event loop, on a port it already holds."""

    def __init__(self, app: FastAPI, sock: socket.socket) -> None:
        self.sock = sock
        self.url = _url(sock)
        self.server = QuietServer(
            uvicorn.Config(
                app, log_config=None, access_log=False, lifespan="on", proxy_headers=False
            )
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Loopback:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.005)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        assert self.task is not None
        await self.task
        self.sock.close()


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    pair = _bound_socket(), _bound_socket()
    yield pair
    for sock in pair:  # one a test did not serve on would otherwise leak
        sock.close()


@pytest.fixture
def settings_overrides() -> dict[str, Any]:
    """Parametrize this to change a test's broker settings."""
    return {}


@pytest.fixture
def settings(
    sockets: tuple[socket.socket, socket.socket], settings_overrides: dict[str, Any]
) -> Settings:
    broker_sock, sim_sock = sockets
    broker, sim = _url(broker_sock), _url(sim_sock)
    base = Settings(
        _env_file=None,
        broker_env="dev",
        broker_public_url=broker,
        mp_client_id=CLIENT_ID,
        mp_client_secret=SecretStr(CLIENT_SECRET),
        mp_redirect_uri=f"{broker}/oauth/callback",
        mp_auth_url=f"{sim}/authorization",
        mp_token_url=f"{sim}/oauth/token",
        mp_api_url=sim,
        mp_timeout_seconds=2.0,
        broker_encryption_keys=SecretStr(generate_key_spec("k1")),
        broker_return_url_allowlist=["https://platform.example/sellers/"],
    )
    return base.model_copy(update=settings_overrides)


@pytest.fixture
async def simulator(
    settings: Settings, sockets: tuple[socket.socket, socket.socket]
) -> AsyncIterator[Simulator]:
    assert settings.mp_redirect_uri
    config = SimulatorConfig(
        clients=[SimulatorClient(CLIENT_ID, CLIENT_SECRET, (settings.mp_redirect_uri,))],
        expires_in=SIM_EXPIRES_IN,
    )
    async with (
        Loopback(create_simulator_app(config), sockets[1]) as server,
        httpx.AsyncClient(base_url=server.url) as http,
    ):
        yield Simulator(server.url, http)
        await http.post("/_control/release")  # a failed test must not leave a reply held


@dataclass
class Simulator:
    url: str
    http: httpx.AsyncClient

    async def faults(self, **plan: Any) -> None:
        (await self.http.post("/_control/faults", json=plan)).raise_for_status()

    async def log(self) -> list[dict[str, Any]]:
        reply = await self.http.get("/_control/log")
        reply.raise_for_status()
        entries: list[dict[str, Any]] = reply.json()
        return entries

    async def release(self) -> None:
        (await self.http.post("/_control/release")).raise_for_status()

    async def wait_until_held(self, count: int = 1) -> None:
        """Bounded wait until `count` token replies are held by the simulator."""
        for _ in range(400):
            if sum(1 for e in await self.log() if e["outcome"] == "held") >= count:
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"the simulator never held {count} replies")

    async def token_requests(self, grant_type: str = "authorization_code") -> int:
        return sum(1 for entry in await self.log() if entry["grant_type"] == grant_type)


@dataclass
class Broker:
    url: str
    http: httpx.AsyncClient  # authenticated internal caller
    api_key: str
    settings: Settings
    app: FastAPI

    @property
    def refresher(self) -> Refresher:
        refresher: Refresher = self.app.state.refresher
        return refresher

    async def token(self, seller_id: str, **params: Any) -> httpx.Response:
        return await self.http.get(f"/sellers/{seller_id}/token", params=params)

    async def start_link(self, seller_id: str, **body: Any) -> str:
        reply = await self.http.post("/link/start", json={"seller_id": seller_id, **body})
        assert reply.status_code == 201, reply.text
        link_url: str = reply.json()["link_url"]
        return link_url


async def create_api_key(database_url: str, scopes: tuple[str, ...] | None = None) -> str:
    from service.core import db
    from service.serving import apikeys

    engine = db.make_engine(database_url, "tests", pool_size=1)
    try:
        async with db.transaction(db.make_sessionmaker(engine)) as session:
            _, secret = await apikeys.create(
                session,
                f"test-{uuid.uuid4().hex[:6]}",
                datetime.now(UTC),
                scopes or apikeys.SCOPES,
            )
    finally:
        await engine.dispose()
    return secret


@pytest.fixture
async def broker(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    database_url: str,
    clock: FakeClock,
    simulator: Simulator,
) -> AsyncIterator[Broker]:
    app = create_app(settings, database_url=database_url, clock=clock)
    key = await create_api_key(database_url)
    async with (
        Loopback(app, sockets[0]) as server,
        httpx.AsyncClient(base_url=server.url, headers={"Authorization": f"Bearer {key}"}) as http,
    ):
        yield Broker(server.url, http, key, settings, app)


def settings_keyring(settings: Settings) -> Keyring:
    """The keyring the broker under test seals with."""
    keys = settings.broker_encryption_keys
    assert keys is not None
    return Keyring.parse(keys.get_secret_value())


async def seed_sellers(
    sql: asyncpg.Connection,
    simulator: Simulator,
    settings: Settings,
    count: int,
    *,
    expires_in: int,
    due: bool,
    keyring: Keyring | None = None,
) -> list[str]:
    """Linked sellers whose grants exist in the simulator (issued directly, in one call, no
    browser); user ids from 10,000."""
    ring = keyring or settings_keyring(settings)
    client_id = settings.mp_client_id or ""
    reply = await simulator.http.post(
        "/_control/issue", json={"client_id": client_id, "user_id": 10_000, "count": count}
    )
    reply.raise_for_status()
    now = datetime.now(UTC)
    rows = []
    for n, grant in enumerate(reply.json()):
        seller_id = f"seller-{n:05d}"

        def seal(column: str, value: str, seller_id: str = seller_id) -> str:
            return ring.seal(value, context("sellers", seller_id, column, client_id))

        rows.append(
            (
                seller_id,
                client_id,
                grant["user_id"],
                seal("access_token", grant["access_token"]),
                seal("refresh_token", grant["refresh_token"]),
                now + timedelta(seconds=expires_in),
                now - timedelta(seconds=1) if due else now + timedelta(days=1),
                now,
            )
        )
    await sql.executemany(
        "INSERT INTO sellers (seller_id, client_id, mp_user_id, status, access_token, "
        "refresh_token, scope, live_mode, expires_at, next_refresh_at, version, linked_at, "
        "updated_at) VALUES ($1, $2, $3, 'linked', $4, $5, 'offline_access read write', true, "
        "$6, $7, 1, $8, $8)",
        rows,
    )
    return [row[0] for row in rows]


# -- the seller's browser --------------------------------------------------------------------


class SellerBrowser:
    """A browser stand-in over real HTTP: keeps cookies, follows the redirects of the flow."""

    def __init__(self) -> None:
        self.http = httpx.AsyncClient(follow_redirects=False)

    async def __aenter__(self) -> SellerBrowser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def open_link(self, link_url: str) -> str:
        """Open the broker link; returns Mercado Pago's authorization URL it redirected to."""
        reply = await self.http.get(link_url)
        assert reply.status_code == 302, reply.text
        return reply.headers["location"]

    async def consent(self, authorization_url: str, decision: str, user_id: int) -> str:
        """Load the consent page and submit its form; returns the callback URL."""
        page = await self.http.get(authorization_url)
        assert page.status_code == 200, page.text
        form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
        form |= {"decision": decision, "user_id": str(user_id)}
        action = str(page.url.join("/authorization/decision"))
        reply = await self.http.post(action, data=form)
        assert reply.status_code == 302, reply.text
        return reply.headers["location"]

    async def callback(self, callback_url: str) -> httpx.Response:
        return await self.http.get(callback_url)

    async def authorize(
        self, link_url: str, user_id: int = 241983636, decision: str = "allow"
    ) -> str:
        """Open the link and answer the consent page; returns the callback URL, not yet opened."""
        return await self.consent(await self.open_link(link_url), decision, user_id)

    async def link(
        self, link_url: str, user_id: int = 241983636, decision: str = "allow"
    ) -> httpx.Response:
        return await self.callback(await self.authorize(link_url, user_id, decision))


def query_of(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))


ROOT = Path(__file__).resolve().parent.parent
