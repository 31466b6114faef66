"""The broker as the operator runs it: real processes, their whole output inspected."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import httpx

from service.config import Settings
from tests.conftest import (
    CLIENT_SECRET,
    ROOT,
    SellerBrowser,
    Simulator,
    create_api_key,
    query_of,
)


@asynccontextmanager
async def broker_process(
    args: list[str], env: dict[str, str], health_url: str, output: Path
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start `python -m service ARGS`, wait (bounded) until it answers, stop it with SIGINT."""
    with output.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", *args, cwd=ROOT, env=env, stdout=sink, stderr=sink
        )
        try:
            async with httpx.AsyncClient() as http:
                for _ in range(300):  # 30 s at most
                    if process.returncode is not None:
                        raise AssertionError(f"the broker exited: see {output}")
                    try:
                        if (await http.get(health_url)).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(f"the broker did not start: see {output}")
            yield process
        finally:
            if process.returncode is None:
                process.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(process.wait(), 30)
                except TimeoutError:
                    process.kill()
                    await process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MP_", "BROKER_"))}
    env.pop("DATABASE_URL", None)
    return env | extra


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


async def test_a_served_broker_logs_no_secret_through_links_replays_and_failures(
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
    env = base_env(
        DATABASE_URL=database_url,
        BROKER_PORT=str(port),
        BROKER_PUBLIC_URL=settings.broker_public_url,
        MP_CLIENT_ID=settings.mp_client_id or "",
        MP_CLIENT_SECRET=CLIENT_SECRET,
        MP_REDIRECT_URI=settings.mp_redirect_uri or "",
        MP_AUTH_URL=settings.mp_auth_url,
        MP_TOKEN_URL=settings.mp_token_url,
        BROKER_ENCRYPTION_KEYS=keys.get_secret_value(),
        BROKER_LOG_FORMAT="json",
        BROKER_LOG_LEVEL="DEBUG",
    )
    api_key = await create_api_key(database_url)
    base = settings.broker_public_url
    output = tmp_path / "serve.log"
    async with (
        broker_process(["serve"], env, f"{base}/healthz", output),
        httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {api_key}"}) as api,
        SellerBrowser() as browser,
    ):
        link = (await api.post("/link/start", json={"seller_id": "s-1"})).json()["link_url"]
        callback = await browser.consent(await browser.open_link(link), "allow", 31)
        assert (await browser.callback(callback)).status_code == 200
        assert (await browser.callback(callback)).status_code == 200  # a replay
        await simulator.faults(status=500, count=1)
        link2 = (await api.post("/link/start", json={"seller_id": "s-2"})).json()["link_url"]
        assert (await browser.link(link2)).status_code == 503
        await api.get("/sellers/nobody/token")
        token = (await api.get("/sellers/s-1/token")).json()["access_token"]

    logged = output.read_text()
    assert '"event": "callback.outcome"' in logged  # the run was logged at all
    secrets = {
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


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


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
