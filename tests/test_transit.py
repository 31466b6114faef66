"""Envelope encryption with a real OpenBao (`bao server -dev`): data keys wrapped by Transit.

Each test starts its own OpenBao on loopback (tests/support/openbao.py) and its own broker,
authenticated with a token or an AppRole whose policy allows only wrap, unwrap and rewrap.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from pydantic import SecretStr, ValidationError

from service.core import keys
from service.core.config import Settings
from service.core.crypto import Keyring, context
from service.core.keyservice import KeyServiceError
from service.core.runtime import Runtime
from service.ops.observe import Health
from tests.support import (
    ROOT,
    Broker,
    FakeClock,
    SellerBrowser,
    Simulator,
    bound_socket,
    create_api_key,
    seed_sellers,
    wait_until,
)
from tests.support.netproxy import TcpProxy
from tests.support.openbao import OpenBao, openbao
from tests.support.processes import base_env, free_port, run_cli
from tests.support.servers import serve_broker
from tests.test_at_rest import dump_every_table

SELLER = "seller-1"


@pytest.fixture
async def bao(tmp_path: Path) -> AsyncIterator[OpenBao]:
    async with openbao(tmp_path / "openbao.log") as server:
        yield server


def transit(settings: Settings, url: str, **auth: Any) -> Settings:
    """`settings` with their data keys in Transit at `url` (and no key of their own)."""
    return settings.model_copy(
        update={
            "broker_encryption_keys": None,
            "broker_key_service": "transit",
            "broker_transit_url": url,
            "broker_key_service_wait_seconds": 0.0,
            "broker_token_cache_size": 0,  # every read opens a sealed value: keys in use
            **auth,
        }
    )


@dataclass
class World:
    """An OpenBao, the simulator, a database, and brokers started on them."""

    bao: OpenBao
    settings: Settings  # the suite's, with a local key: `transit` replaces it
    sock: socket.socket
    database_url: str
    clock: FakeClock
    simulator: Simulator

    async def with_token(self, url: str | None = None, **more: Any) -> tuple[Settings, str]:
        """Transit settings with a fresh broker token, and the token."""
        token = await self.bao.broker_token()
        settings = transit(
            self.settings, url or self.bao.url, broker_vault_token=SecretStr(token), **more
        )
        return settings, token

    @contextlib.asynccontextmanager
    async def broker(
        self, settings: Settings, sock: socket.socket | None = None
    ) -> AsyncIterator[Broker]:
        key = await create_api_key(self.database_url)
        async with serve_broker(
            settings, sock or self.sock, self.database_url, self.clock, key
        ) as broker:
            yield broker


@pytest.fixture
def world(
    bao: OpenBao,
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    database_url: str,
    clock: FakeClock,
    simulator: Simulator,
) -> World:
    return World(bao, settings, sockets[0], database_url, clock, simulator)


def logged(caplog: pytest.LogCaptureFixture) -> str:
    """The captured lines with their structured fields (where the reason and detail are)."""
    return "\n".join(f"{r.getMessage()} {getattr(r, 'fields', {})}" for r in caplog.records)


def health_of(broker: Broker) -> Health:
    health: Health = broker.app.state.health
    return health


def keyring_of(broker: Broker) -> Keyring:
    runtime: Runtime = broker.app.state.runtime
    return runtime.keyring


async def link(broker: Broker, seller_id: str = SELLER, user_id: int = 4242) -> None:
    async with SellerBrowser() as browser:
        page = await browser.link(await broker.start_link(seller_id), user_id)
    assert page.status_code == 200, page.text


async def sealed_columns(sql: asyncpg.Connection) -> list[tuple[str, str, str, int]]:
    rows = await sql.fetch(
        "SELECT seller_id, access_token, refresh_token, version FROM sellers ORDER BY seller_id"
    )
    return [tuple(row.values()) for row in rows]


async def test_link_refresh_and_reads_with_transit_and_no_usable_key_at_rest(
    world: World,
    sql: asyncpg.Connection,
) -> None:
    settings, token = await world.with_token()
    async with world.broker(settings) as broker:
        await link(broker)
        first = (await broker.token(SELLER)).json()["access_token"]
        world.clock.advance(days=170)
        refreshed = await broker.token(SELLER, min_ttl=30 * 24 * 3600)
        assert refreshed.status_code == 200
        second = refreshed.json()["access_token"]
        assert second != first
        assert (await broker.token(SELLER)).json()["access_token"] == second

    # The first start created and promoted one data key, wrapped by Transit.
    data_key = await sql.fetchrow("SELECT * FROM data_keys")
    assert data_key["key_id"] == "dk1"
    assert data_key["promoted_at"] is not None
    assert data_key["wrapped"].startswith("vault:v1:")
    assert data_key["wrapped_by"] == "transit:transit/broker"
    row = await sql.fetchrow("SELECT * FROM sellers WHERE seller_id = $1", SELLER)
    assert row["access_token"].startswith("v1.dk1.")

    # The data key itself, which only Transit can tell (the root token unwraps it here).
    answer = await world.bao.call("POST", "transit/decrypt/broker", ciphertext=data_key["wrapped"])
    raw = base64.b64decode(answer["data"]["plaintext"])
    ring = Keyring.of({"dk1": raw}, "dk1")
    ctx = context("sellers", SELLER, "access_token", row["client_id"])
    assert ring.open(row["access_token"], ctx) == second  # it is the key that sealed

    # Neither the database nor the configuration holds it, in any usual encoding.
    dump = await dump_every_table(sql)
    configuration = settings.model_dump_json() + repr(
        {name: getattr(settings, name) for name in type(settings).model_fields}
    )
    configuration += str(
        {
            name: value.get_secret_value()
            for name, value in settings.__dict__.items()
            if isinstance(value, SecretStr)
        }
    )
    encodings = {
        base64.b64encode(raw).decode(),
        base64.b64encode(raw).decode().rstrip("="),
        base64.urlsafe_b64encode(raw).decode().rstrip("="),
        raw.hex(),
    }
    for encoded in encodings:
        assert encoded not in dump
        assert encoded not in configuration
    assert token in configuration  # the configuration was read whole (the check can fail)


async def test_approle_logs_in_and_logs_in_again_when_its_token_is_revoked(
    world: World,
) -> None:
    role_id, secret_id = await world.bao.approle()
    settings = transit(
        world.settings,
        world.bao.url,
        broker_vault_role_id=role_id,
        broker_vault_secret_id=SecretStr(secret_id),
    )
    async with world.broker(settings) as broker:
        await link(broker)
        # Every token the AppRole handed out is revoked: the next check logs in again.
        await world.bao.call("POST", "sys/leases/revoke-prefix/auth/approle/login")
        watch = health_of(broker).keys
        assert watch is not None
        await watch.check()
        assert watch.failing is None
        assert (await broker.token(SELLER)).status_code == 200


async def test_a_revoked_token_and_a_retired_key_version_are_loud_and_serving_goes_on(
    world: World,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings, token = await world.with_token()
    async with world.broker(settings) as broker:
        await link(broker)
        watch = health_of(broker).keys
        assert watch is not None
        # The Transit key rotated and its old versions retired before the data keys were
        # rewrapped: they no longer unwrap.
        await world.bao.rotate()
        await world.bao.retire_old_versions()
        with caplog.at_level(logging.ERROR, logger="broker.keys"):
            await watch.check()
        assert watch.failing == "key_unavailable"
        assert "too old" in logged(caplog)
        await world.bao.revoke(token)
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="broker.keys"):
            await watch.check()
        assert watch.failing == "denied"
        assert "keys.service_failed" in logged(caplog)
        assert "permission denied" in logged(caplog)
        assert token not in logged(caplog)
        ready = await broker.http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ok", "key_service": "denied"}
        metrics = (await broker.http.get("/metrics")).text
        assert "broker_key_service_up 0.0" in metrics
        assert 'broker_key_service_failures_total{reason="denied"}' in metrics
        # The data keys are in memory: reads, links and refreshes go on.
        assert (await broker.token(SELLER)).status_code == 200
        await link(broker, "seller-2", 4343)
        world.clock.advance(days=170)
        assert (await broker.token(SELLER, min_ttl=30 * 24 * 3600)).status_code == 200


async def test_transit_lost_while_running_keeps_serving_and_says_so_until_it_is_back(
    world: World,
) -> None:
    port = int(world.bao.url.rsplit(":", 1)[1])
    proxy = await TcpProxy.to("127.0.0.1", port).start()
    settings, _ = await world.with_token(
        f"http://127.0.0.1:{proxy.port}",
        broker_key_check_seconds=0.1,  # the loop itself notices, both ways
    )
    try:
        async with world.broker(settings) as broker:
            await link(broker)
            health = health_of(broker)
            await proxy.cut()
            await wait_until(
                lambda: _is(health.key_service, "unreachable"), "the loss is noticed", 10
            )
            ready = await broker.http.get("/readyz")
            assert ready.json() == {"status": "ok", "key_service": "unreachable"}
            assert "broker_key_service_up 0.0" in (await broker.http.get("/metrics")).text
            for _ in range(20):  # reads open sealed values (no cache) with the keys in memory
                assert (await broker.token(SELLER)).status_code == 200
            await link(broker, "seller-2", 4343)
            await proxy.restore()
            await wait_until(lambda: _is(health.key_service, None), "Transit is back", 10)
            assert (await broker.http.get("/readyz")).json() == {"status": "ok"}
            assert "broker_key_service_up 1.0" in (await broker.http.get("/metrics")).text
    finally:
        await proxy.close()


async def _is(value: object, expected: object) -> bool:
    return value == expected


async def test_transit_unreachable_at_start_up_the_process_never_serves_and_says_why(
    settings: Settings, database_url: str, tmp_path: Path
) -> None:
    port, closed = free_port(), free_port()
    env = base_env(
        DATABASE_URL=database_url,
        BROKER_PUBLIC_URL=settings.broker_public_url,
        MP_CLIENT_ID=settings.mp_client_id or "",
        MP_CLIENT_SECRET="x" * 20,
        MP_REDIRECT_URI=settings.mp_redirect_uri or "",
        BROKER_KEY_SERVICE="transit",
        BROKER_TRANSIT_URL=f"http://127.0.0.1:{closed}",
        BROKER_VAULT_TOKEN="s.not-a-real-token",
        BROKER_KEY_SERVICE_WAIT_SECONDS="2",
        BROKER_PORT=str(port),
        BROKER_DATA_DIR=str(tmp_path / "data"),
        BROKER_LOG_FORMAT="json",
    )
    log = tmp_path / "broker.log"
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "serve", cwd=ROOT, env=env, stdout=sink, stderr=sink
        )
        try:
            code = await asyncio.wait_for(process.wait(), 60)
        finally:
            if process.returncode is None:
                process.kill()
    text = log.read_text()
    assert code != 0
    assert text.count('"keys.unavailable_at_start"') >= 2  # it tried for the wait, then gave up
    assert '"reason": "unreachable"' in text
    assert "s.not-a-real-token" not in text
    assert "Application startup complete" not in text
    async with httpx.AsyncClient() as http:
        with pytest.raises(httpx.ConnectError):
            await http.get(f"http://127.0.0.1:{port}/readyz")
    assert not (tmp_path / "data" / "dev-encryption-key").exists()  # no fallback to a local key


async def test_a_transit_key_rotation_and_rewrap_under_read_load_rewrites_no_seller_row(
    world: World,
    sql: asyncpg.Connection,
) -> None:
    settings, _ = await world.with_token()
    async with world.broker(settings) as broker:
        sellers = await seed_sellers(
            sql,
            world.simulator,
            settings,
            20,
            expires_in=3600,
            due=False,
            keyring=keyring_of(broker),
        )
        before = await sealed_columns(sql)
        stop = asyncio.Event()
        statuses: list[int] = []

        async def read_until_stopped(offset: int) -> None:
            for n in range(5000):  # bounded
                if stop.is_set():
                    return
                statuses.append((await broker.token(sellers[(n + offset) % 20])).status_code)

        readers = [asyncio.create_task(read_until_stopped(i)) for i in range(4)]
        version = await world.bao.rotate()
        service = broker.app.state.runtime.key_service
        assert await keys.rewrap(broker.app.state.runtime.db.sessions, service) == 1
        await world.bao.retire_old_versions()  # only the new version unwraps from here on
        watch = health_of(broker).keys
        assert watch is not None
        await watch.check()
        assert watch.failing is None
        await wait_until(lambda: _more_than(statuses, 200), "reads under the rotation", 30)
        stop.set()
        await asyncio.gather(*readers)
    assert set(statuses) == {200}
    assert version == 2
    wrapped = await sql.fetchval("SELECT wrapped FROM data_keys")
    assert wrapped.startswith("vault:v2:")
    assert await sealed_columns(sql) == before  # not one seller row written
    # A process starting now unwraps the rewrapped key with the new version alone.
    async with world.broker(settings, bound_socket()) as restarted:
        assert (await restarted.token(sellers[0])).status_code == 200


async def _more_than(values: list[int], count: int) -> bool:
    return len(values) > count


async def test_a_new_data_key_is_added_promoted_and_the_rows_reencrypted(
    world: World,
    sql: asyncpg.Connection,
) -> None:
    from service.lifecycle import rekey

    settings, _ = await world.with_token()
    async with world.broker(settings) as broker:
        runtime: Runtime = broker.app.state.runtime
        assert runtime.key_service is not None
        await link(broker)
        sessions = runtime.db.sessions
        watch = health_of(broker).keys
        assert watch is not None
        assert await keys.add(sessions, runtime.key_service) == "dk2"
        await watch.check()  # every process re-reads the keys
        assert sorted(runtime.keyring.keys) == ["dk1", "dk2"]
        assert runtime.keyring.primary == "dk1"
        assert await keys.promote(sessions, "dk2")
        await watch.check()
        assert runtime.keyring.primary == "dk2"
        await link(broker, "seller-2", 4343)
        assert (
            await sql.fetchval("SELECT access_token FROM sellers WHERE seller_id = 'seller-2'")
        ).startswith("v1.dk2.")
        progress = await rekey.reencrypt(sessions, runtime.keyring, world.clock)
        assert progress.done == 2  # seller-1 and its attempt; seller-2 and its own were dk2
        for seller in (SELLER, "seller-2"):
            assert (await broker.token(seller)).status_code == 200
    tokens = await sql.fetch("SELECT access_token, refresh_token FROM sellers")
    assert all(value.startswith("v1.dk2.") for row in tokens for value in row.values())


async def test_the_local_keys_are_imported_and_their_rows_open_unchanged(
    world: World,
    sql: asyncpg.Connection,
) -> None:
    local = world.settings.broker_encryption_keys
    assert local is not None
    sellers = await seed_sellers(
        sql, world.simulator, world.settings, 3, expires_in=3600, due=False
    )
    settings, _ = await world.with_token()
    from service.core import keyservice
    from service.core.db import make_engine, make_sessionmaker

    service = keyservice.from_settings(settings)
    assert service is not None
    engine = make_engine(world.database_url, "test")
    try:
        imported = await keys.import_local(
            make_sessionmaker(engine), service, local.get_secret_value()
        )
    finally:
        await engine.dispose()
        await service.aclose()
    assert imported == ["k1"]
    async with world.broker(settings) as broker:
        assert keyring_of(broker).primary == "k1"
        for seller in sellers:
            assert (await broker.token(seller)).status_code == 200
    assert await sql.fetchval("SELECT count(*) FROM data_keys") == 1  # no dk1 made beside it


def test_transit_settings_are_checked_at_start_up() -> None:
    base: dict[str, Any] = {"_env_file": None, "broker_key_service": "transit"}
    with pytest.raises(ValidationError, match="BROKER_TRANSIT_URL"):
        Settings(**base, broker_vault_token="t")
    with pytest.raises(ValidationError, match="exactly one"):
        Settings(**base, broker_transit_url="http://127.0.0.1:8200")
    with pytest.raises(ValidationError, match="exactly one"):
        Settings(
            **base,
            broker_transit_url="http://127.0.0.1:8200",
            broker_vault_token="t",
            broker_vault_role_id="r",
            broker_vault_secret_id="s",
        )
    with pytest.raises(ValidationError, match="not both"):
        Settings(
            **base,
            broker_transit_url="http://127.0.0.1:8200",
            broker_vault_token="t",
            broker_encryption_keys="k1:" + "A" * 43,
        )
    accepted = Settings(**base, broker_transit_url="http://127.0.0.1:8200", broker_vault_token="t")
    assert accepted.broker_key_service == "transit"


async def test_unwrapping_errors_name_the_reason_and_never_a_key(bao: OpenBao) -> None:
    from service.core.keyservice import Transit, VaultAuth

    good = Transit(bao.url, "transit", "broker", VaultAuth(token=await bao.broker_token()))
    wrapped = await good.wrap(b"k" * 32)
    assert await good.unwrap(wrapped) == b"k" * 32
    other_key = Transit(bao.url, "transit", "other", VaultAuth(token=await bao.broker_token()))
    nobody = Transit(bao.url, "transit", "broker", VaultAuth(token="s.nobody"))
    nowhere = Transit(f"http://127.0.0.1:{free_port()}", "transit", "broker", VaultAuth(token="t"))
    for service, reason in ((other_key, "denied"), (nobody, "denied"), (nowhere, "unreachable")):
        with pytest.raises(KeyServiceError) as caught:
            await service.unwrap(wrapped)
        assert caught.value.reason == reason
        assert wrapped not in str(caught.value)
    with pytest.raises(KeyServiceError) as caught:
        await good.unwrap("vault:v1:bm90LWEta2V5")
    assert caught.value.reason == "key_unavailable"
    for service in (good, other_key, nobody, nowhere):
        await service.aclose()


async def test_the_keys_commands_add_and_rewrap_through_transit(
    bao: OpenBao, settings: Settings, database_url: str, sql: asyncpg.Connection
) -> None:
    env = base_env(
        DATABASE_URL=database_url,
        MP_CLIENT_ID=settings.mp_client_id or "",
        MP_CLIENT_SECRET="x" * 20,
        MP_REDIRECT_URI=settings.mp_redirect_uri or "",
        BROKER_KEY_SERVICE="transit",
        BROKER_TRANSIT_URL=bao.url,
        BROKER_VAULT_TOKEN=await bao.broker_token(),
    )
    code, out, err = await run_cli("keys", "add", env=env)
    assert code == 0, err
    assert "added dk1" in out  # the table was empty: numbering starts at 1 either way
    await bao.rotate()
    code, out, err = await run_cli("keys", "rewrap", env=env)
    assert code == 0, err
    assert "rewrapped 1 data key(s)" in out
    assert (await sql.fetchval("SELECT wrapped FROM data_keys")).startswith("vault:v2:")
    await bao.revoke(env["BROKER_VAULT_TOKEN"])
    code, out, err = await run_cli("keys", "rewrap", env=env)
    assert code == 1
    assert "denied" in err
    assert env["BROKER_VAULT_TOKEN"] not in out + err
