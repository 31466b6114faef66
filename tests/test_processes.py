"""The broker as the operator runs it: real processes, their whole output inspected."""

from __future__ import annotations

import hashlib
import json
import re
import socket
from pathlib import Path

import asyncpg
import httpx

from service.config import Settings
from tests.conftest import (
    CLIENT_SECRET,
    Broker,
    SellerBrowser,
    Simulator,
    create_api_key,
    query_of,
)
from tests.processes import base_env, broker_process, env_for, free_port, run_cli


async def test_make_run_demo_prints_what_a_newcomer_needs_and_the_printed_curl_works(
    tmp_path: Path,
) -> None:
    port, sim_port = free_port(), free_port()
    env = base_env(
        BROKER_DATA_DIR=str(tmp_path / "data"),
        BROKER_PORT=str(port),
        BROKER_SIMULATOR_PORT=str(sim_port),
        BROKER_PUBLIC_URL=f"http://127.0.0.1:{port}",
    )
    base = f"http://127.0.0.1:{port}"
    output = tmp_path / "run.log"
    async with broker_process(["run"], env, f"{base}/healthz", output) as process:
        printed = output.read_text()
        assert f"{base}/docs" in printed
        key = re.search(r"Dev API key  (mpb_\S+)", printed)
        assert key is not None
        assert "curl -s -X POST" in printed
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key[1]}"}) as caller:
            assert (await caller.get(f"{base}/docs")).status_code == 200
            started = await caller.post(f"{base}/link/start", json={"seller_id": "demo-seller-1"})
            assert started.status_code == 201
            async with SellerBrowser() as browser:
                page = await browser.link(started.json()["link_url"])
            assert page.status_code == 200
            token = await caller.get(f"{base}/sellers/demo-seller-1/token")
            assert token.status_code == 200
            assert token.json()["access_token"].startswith("APP_USR-")
    assert process.returncode == 0  # SIGINT is a clean shutdown
    assert "Traceback" not in output.read_text()


async def test_a_served_broker_logs_no_secret_through_links_refreshes_and_failures(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    tmp_path: Path,
) -> None:
    port = sockets[0].getsockname()[1]
    sockets[0].close()  # the process binds this port itself
    keys = settings.broker_encryption_keys
    assert keys is not None
    env = env_for(settings, database_url, BROKER_PORT=str(port), BROKER_LOG_LEVEL="DEBUG")
    api_key = await create_api_key(database_url)
    base = settings.broker_public_url
    output = tmp_path / "serve.log"
    async with (
        broker_process(["serve"], env, f"{base}/healthz", output),
        httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {api_key}"}) as api,
        SellerBrowser() as browser,
    ):
        await simulator.http.post("/_control/config", json={"expires_in": 3600})
        link = (await api.post("/link/start", json={"seller_id": "s-1"})).json()["link_url"]
        callback = await browser.consent(await browser.open_link(link), "allow", 31)
        assert (await browser.callback(callback)).status_code == 200
        assert (await browser.callback(callback)).status_code == 200  # a replay
        first = (await api.get("/sellers/s-1/token")).json()["access_token"]
        refreshed = await api.get("/sellers/s-1/token", params={"min_ttl": 7200})  # a refresh
        assert refreshed.json()["access_token"] != first
        await simulator.faults(status=500, count=1)
        link2 = (await api.post("/link/start", json={"seller_id": "s-2"})).json()["link_url"]
        assert (await browser.link(link2)).status_code == 503
        await api.get("/sellers/nobody/token")
        token = (await api.get("/sellers/s-1/token")).json()["access_token"]

    logged = output.read_text()
    assert '"event": "callback.outcome"' in logged  # the run was logged at all
    secrets = {
        "first access token": first,
        "access token": token,
        "code": query_of(callback)["code"],
        "state": query_of(callback)["state"],
        "api key": api_key,
        "client secret": CLIENT_SECRET,
        "encryption key": keys.get_secret_value().split(":")[1],
        "link token": link.rsplit("/", 1)[1],
    }
    leaked = [name for name, value in secrets.items() if value in logged]
    assert leaked == []
    assert "TG-" not in logged
    assert "APP_USR-" not in logged


async def test_api_keys_create_prints_the_secret_once_and_stores_its_digest(
    database_url: str, sql: asyncpg.Connection
) -> None:
    env = base_env(DATABASE_URL=database_url)
    code, out, _ = await run_cli(
        "api-keys",
        "create",
        "billing",
        "--scopes",
        "tokens:read",
        "--namespace",
        "billing/",
        env=env,
    )
    assert code == 0
    secret = out.strip()
    assert re.fullmatch(r"mpb_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", secret)
    row = await sql.fetchrow("SELECT * FROM api_keys WHERE name = 'billing'")
    assert row["digest"] == hashlib.sha256(secret.encode()).hexdigest()
    assert row["scopes"] == ["tokens:read"]
    assert row["namespace"] == "billing/"

    code, _, err = await run_cli("api-keys", "create", "bad", "--scopes", "root", env=env)
    assert code != 0
    assert "unknown scopes: root" in err
    assert await sql.fetchval("SELECT count(*) FROM api_keys WHERE name = 'bad'") == 0


async def test_the_openapi_command_needs_no_database() -> None:
    code, out, err = await run_cli("openapi", "--output", "-", env=base_env())
    assert code == 0, err
    assert json.loads(out)["info"]["title"] == "Mercado Pago token broker"


async def test_breakers_are_listed_and_closed_from_the_command_line(
    database_url: str, sql: asyncpg.Connection
) -> None:
    env = base_env(DATABASE_URL=database_url)
    await sql.execute(
        "INSERT INTO app_breakers VALUES ('app-1', 'invalid_client', now(), now() + interval '5m')"
    )
    code, out, _ = await run_cli("breaker", "list", env=env)
    assert code == 0
    assert "app-1\topen\tinvalid_client" in out
    code, out, _ = await run_cli("breaker", "close", "app-1", env=env)
    assert (code, out.strip()) == (0, "closed 1 breaker(s)")
    assert await sql.fetchval("SELECT count(*) FROM app_breakers") == 0


async def test_api_keys_are_listed_without_secrets_and_revoked_at_once(
    broker: Broker, database_url: str
) -> None:
    env = base_env(DATABASE_URL=database_url)
    assert (await broker.http.get("/sellers/x/token")).status_code == 404  # the key works
    code, out, _ = await run_cli("api-keys", "list", env=env)
    assert code == 0
    assert broker.api_key.split("_", 2)[2] not in out
    name = out.split("\t", 1)[0]
    assert "active" in out
    code, out, _ = await run_cli("api-keys", "revoke", name, env=env)
    assert (code, out.strip()) == (0, f"revoked {name}")
    assert (await broker.http.get("/sellers/x/token")).status_code == 401
    audit_out = (await run_cli("audit", "list", "--actor", "cli", env=env))[1]
    assert "key.revoked" in audit_out
    assert "key.created" in audit_out
    code, _, err = await run_cli("api-keys", "revoke", name, env=env)
    assert code != 0
    assert "no active key" in err
