"""Fixtures: a real PostgreSQL (embedded, or DATABASE_URL), a fresh database per test built
from an Alembic-migrated template, the simulator and the broker as real servers on loopback.
The helpers they are built from live in `tests/support/`.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import SecretStr
from sqlalchemy.engine import make_url

from service.core.config import Settings
from service.core.crypto import generate_key_spec
from service.ops import embedded
from service.ops.cli import migrate
from service.simulator import SimulatorClient, SimulatorConfig, create_simulator_app
from tests.support import (
    CLIENT_ID,
    CLIENT_SECRET,
    SIM_EXPIRES_IN,
    Broker,
    FakeClock,
    Loopback,
    Simulator,
    admin_connect,
    bound_socket,
    create_api_key,
    execute,
    with_database,
)
from tests.support.servers import serve_broker, url_of

LONG_KINDS = ("soak", "chaos", "fuzz", "browser")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The long kinds first: spread over the workers at the start instead of one of them
    running the soak alone at the end (the sort is stable; every worker sorts alike)."""
    items.sort(key=lambda item: not any(item.get_closest_marker(kind) for kind in LONG_KINDS))


# -- PostgreSQL ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def server_url() -> Iterator[str]:
    """DATABASE_URL when given (its database is the admin one), else an embedded server (one
    per xdist worker). Its data lives outside pytest's /tmp/pytest-of-<user>: every pytest
    session resets that to mode 0700, which locks out the server's own user mid-run when
    another checkout's suite starts beside this one."""
    given = os.environ.get("DATABASE_URL")
    if given:
        yield Settings(_env_file=None, database_url=given).database_url or given
        return
    data = Path(tempfile.mkdtemp(prefix="broker-tests-pg-"))
    data.chmod(0o755)
    yield embedded.start(data, database="postgres")
    shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(scope="session")
def template_url(server_url: str) -> Iterator[str]:
    """A database migrated by Alembic once; each test clones it."""
    name = f"broker_tpl_{uuid.uuid4().hex[:8]}"
    asyncio.run(execute(server_url, f'CREATE DATABASE "{name}"'))
    url = with_database(server_url, name)
    migrate(url)
    yield url
    asyncio.run(execute(server_url, f'DROP DATABASE IF EXISTS "{name}"'))


@pytest.fixture
async def database_url(server_url: str, template_url: str) -> AsyncIterator[str]:
    name = f"broker_t_{uuid.uuid4().hex[:12]}"
    template = make_url(template_url).database
    await execute(server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    yield with_database(server_url, name)
    await execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def sql(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection for assertions about what is stored."""
    conn = await admin_connect(database_url)
    yield conn
    await conn.close()


# -- clock -----------------------------------------------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# -- servers on loopback ---------------------------------------------------------------------


@pytest.fixture
def sockets() -> Iterator[tuple[socket.socket, socket.socket]]:
    pair = bound_socket(), bound_socket()
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
    broker, sim = url_of(broker_sock), url_of(sim_sock)
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


@pytest.fixture
async def broker(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    database_url: str,
    clock: FakeClock,
    simulator: Simulator,
) -> AsyncIterator[Broker]:
    key = await create_api_key(database_url)
    async with serve_broker(settings, sockets[0], database_url, clock, key) as broker:
        yield broker
