"""The broker as the operator runs it: real processes, their whole output inspected."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shlex
import shutil
import socket
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from service.core.config import DEMO_CLIENT_ID, DEMO_CLIENT_ID_BR, Settings
from service.core.crypto import context
from service.linking.pkce import challenge
from tests.support import (
    CLIENT_SECRET,
    Broker,
    SellerBrowser,
    Simulator,
    create_api_key,
    query_of,
    settings_keyring,
)
from tests.support.processes import base_env, broker_process, env_for, free_port, run_cli


def printed_curls(banner: str, step: str) -> list[list[str]]:
    """The argv of each `curl` printed under `step`, up to the next step (continuation lines
    joined, as a shell would)."""
    after = banner.split(step, 1)[1].replace("\\\n", " ")
    lines = re.split(r"^\d+\. ", after, flags=re.MULTILINE)[0].splitlines()
    return [shlex.split(line) for line in lines if line.strip().startswith("curl ")]


def printed_curl(banner: str, step: str) -> list[str]:
    return printed_curls(banner, step)[0]


async def run_printed(argv: list[str]) -> dict[str, Any]:
    """Run a printed `curl` as a newcomer pasting it would; the same request over httpx when
    curl is not installed (the argv is parsed either way)."""
    assert argv[:2] == ["curl", "-s"], argv
    if shutil.which("curl"):
        process = await asyncio.create_subprocess_exec(
            *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0, err.decode()
        reply: dict[str, Any] = json.loads(out)
        return reply
    method, url, headers, body = "GET", "", {}, None
    args = iter(argv[2:])
    for arg in args:
        if arg == "-X":
            method = next(args)
        elif arg == "-H":
            name, _, value = next(args).partition(":")
            headers[name.strip()] = value.strip()
        elif arg == "-d":
            body = next(args)
        else:
            url = arg
    async with httpx.AsyncClient() as http:
        answer = await http.request(method, url, headers=headers, content=body)
    reply = answer.json()
    return reply


async def test_make_run_demo_prints_what_a_newcomer_needs_and_the_printed_curl_works(
    tmp_path: Path,
) -> None:
    port, sim_port = free_port(), free_port()
    data = tmp_path / "data"
    env = base_env(
        BROKER_DATA_DIR=str(data),
        BROKER_PORT=str(port),
        BROKER_SIMULATOR_PORT=str(sim_port),
        BROKER_PUBLIC_URL=f"http://127.0.0.1:{port}",
    )
    base = f"http://127.0.0.1:{port}"
    output = tmp_path / "run.log"
    async with broker_process(["run"], env, f"{base}/healthz", output) as process:
        printed = output.read_text()
        # First start: a local dev encryption key is made, and the operator is told where.
        assert "dev.encryption_key_generated" in printed
        assert str(data / "dev-encryption-key") in printed
        assert (data / "dev-encryption-key").exists()
        assert f"{base}/docs" in printed
        key = re.search(r"Dev API key  (mpb_\S+)", printed)
        assert key is not None
        assert (data / "dev-api-key").read_text().strip() == key[1]
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{base}/docs")).status_code == 200

        # One link through each of the demo's two applications (PKCE on and off, the shared
        # callback URL and one of its own).
        starts = printed_curls(printed, "1. Ask for a link for a seller, through each application:")
        assert [json.loads(argv[-1])["application"] for argv in starts] == ["ar", "br"]
        for start in starts:
            assert f"Authorization: Bearer {key[1]}" in start
            link = await run_printed(start)
            assert link["link_url"].startswith(f"{base}/link/")
            async with SellerBrowser() as browser:  # step 2: open it, click Allow
                page = await browser.link(link["link_url"])
            assert page.status_code == 200
            assert "linked" in page.text.lower()

        token = await run_printed(printed_curl(printed, "3. Fetch the seller's access token:"))
        assert token["access_token"].startswith("APP_USR-")
        assert token["mp_user_id"] == 241983636  # the account the browser consented as
    assert process.returncode == 0  # SIGINT is a clean shutdown
    assert "Traceback" not in output.read_text()


async def test_broker_simulator_serves_the_consent_page_and_mercado_pagos_error_shapes(
    tmp_path: Path,
) -> None:
    port, broker_port = free_port(), free_port()
    sim = f"http://127.0.0.1:{port}"
    env = base_env(
        BROKER_SIMULATOR_PORT=str(port), BROKER_PUBLIC_URL=f"http://127.0.0.1:{broker_port}"
    )
    output = tmp_path / "simulator.log"
    async with (
        broker_process(["simulator"], env, f"{sim}/_control/log", output) as process,
        httpx.AsyncClient(base_url=sim, timeout=10) as http,
    ):
        verifier = "v" * 43
        consent = await http.get(
            "/authorization",
            params={
                "client_id": DEMO_CLIENT_ID,
                "response_type": "code",
                "platform_id": "mp",
                "state": "s" * 43,
                "redirect_uri": f"http://127.0.0.1:{broker_port}/oauth/callback",
                "code_challenge": challenge(verifier, "S256"),
                "code_challenge_method": "S256",
            },
        )
        assert consent.status_code == 200
        assert 'name="decision"' in consent.text
        refused = await http.post(
            "/oauth/token",
            data={
                "client_id": DEMO_CLIENT_ID,
                "client_secret": "not-the-secret",
                "grant_type": "authorization_code",
                "code": "TG-nothing",
                "redirect_uri": f"http://127.0.0.1:{broker_port}/oauth/callback",
                "code_verifier": verifier,
            },
            headers={"Accept": "application/json"},
        )
        assert refused.status_code == 400
        body = refused.json()
        assert set(body) == {"message", "error", "status", "cause"}
        assert (body["error"], body["status"]) == ("invalid_client", 400)
        assert "not-the-secret" not in refused.text
    assert process.returncode == 0
    assert "Traceback" not in output.read_text()


async def test_a_served_broker_logs_no_secret_through_links_refreshes_and_failures(
    settings: Settings,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    database_url: str,
    sql: asyncpg.Connection,
    tmp_path: Path,
) -> None:
    port = sockets[0].getsockname()[1]
    sockets[0].close()  # the process binds this port itself
    keys = settings.broker_encryption_keys
    assert keys is not None
    ring = settings_keyring(settings)
    env = env_for(
        settings,
        database_url,
        BROKER_PORT=str(port),
        BROKER_LOG_LEVEL="DEBUG",
        BROKER_ON_READ_COOLDOWN_SECONDS="0",  # one on-read refresh after another
        BROKER_PROXY_TIMEOUT_SECONDS="0.5",
    )
    api_key = await create_api_key(database_url)
    base = settings.broker_public_url
    output = tmp_path / "serve.log"
    seen: dict[str, str] = {}

    async def stored_pair(seller_id: str, when: str) -> None:
        row = await sql.fetchrow("SELECT * FROM sellers WHERE seller_id = $1", seller_id)
        for column in ("access_token", "refresh_token"):
            ctx = context("sellers", seller_id, column, row["client_id"])
            seen[f"{column} of {seller_id} {when}"] = ring.open(row[column], ctx)

    async with (
        broker_process(["serve"], env, f"{base}/healthz", output),
        httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {api_key}"}) as api,
        SellerBrowser() as browser,
    ):
        await simulator.http.post("/_control/config", json={"expires_in": 3600})
        links = {}
        for seller_id, user_id in (("s-1", 31), ("s-3", 33)):
            links[seller_id] = (
                await api.post("/link/start", json={"seller_id": seller_id})
            ).json()["link_url"]
            callback = await browser.authorize(links[seller_id], user_id)
            seen[f"code of {seller_id}"] = query_of(callback)["code"]
            seen[f"state of {seller_id}"] = query_of(callback)["state"]
            assert (await browser.callback(callback)).status_code == 200
            assert (await browser.callback(callback)).status_code == 200  # a replay
            await stored_pair(seller_id, "as linked")
        refreshed = await api.get("/sellers/s-1/token", params={"min_ttl": 7200})  # a refresh
        assert refreshed.status_code == 200
        await stored_pair("s-1", "refreshed")

        await simulator.faults(status=500, count=1)
        links["s-2"] = (await api.post("/link/start", json={"seller_id": "s-2"})).json()["link_url"]
        failed = await browser.authorize(links["s-2"], 32)
        seen["code of s-2"] = query_of(failed)["code"]
        seen["state of s-2"] = query_of(failed)["state"]
        assert (await browser.callback(failed)).status_code == 503  # a failed exchange

        # Refresh failures: Mercado Pago down (a transient 500), then the grant revoked.
        await simulator.faults(status=500, count=1)
        transient = await api.get("/sellers/s-3/token", params={"min_ttl": 7200})
        assert transient.status_code == 503
        assert transient.json()["code"] == "upstream_unavailable"
        await simulator.faults()
        await simulator.http.post("/_control/revoke", json={"user_id": 33})
        revoked = await api.get("/sellers/s-3/token", params={"min_ttl": 7200})
        assert revoked.status_code == 409  # the token left cannot meet min_ttl
        assert revoked.json()["code"] == "relink_required"

        await api.get("/sellers/nobody/token")
        seen["last access token"] = (await api.get("/sellers/s-1/token")).json()["access_token"]

        # Proxied calls: one whose reply echoes the token, a 401, a timeout.
        proxy = "/sellers/s-1/-/mercadopago/v1/payments"
        echo = {"transaction_amount": 1, "description": seen["last access token"]}
        created = await api.post(proxy, json=echo, headers={"X-Idempotency-Key": "k"})
        assert created.status_code == 201
        assert seen["last access token"] not in created.text
        await simulator.faults(api_status=401)
        assert (await api.get(f"{proxy}/search")).status_code == 401
        await simulator.faults(api_latency_ms=1000)
        assert (await api.get(f"{proxy}/search")).status_code == 504
        await simulator.faults()

    attempts = await sql.fetch("SELECT * FROM link_attempts WHERE code_verifier IS NOT NULL")
    assert len(attempts) == 3
    for attempt in attempts:
        ctx = context("link_attempts", attempt["id"], "code_verifier", attempt["client_id"])
        seen[f"verifier {attempt['id']}"] = ring.open(attempt["code_verifier"], ctx)
    assert await sql.fetchval("SELECT status FROM sellers WHERE seller_id = 's-3'") == (
        "relink_required"
    )

    logged = output.read_text()
    for event in (
        "callback.outcome",
        "refresh.refreshed",
        "refresh.transient_failure",
        "refresh.relink_required",
        "proxy.upstream_failed",
    ):
        assert f'"event": "{event}"' in logged, event  # each step was logged at all
    secrets = {
        **seen,
        "api key": api_key,
        "client secret": CLIENT_SECRET,
        "encryption key": keys.get_secret_value().split(":")[1],
        **{f"link token of {s}": url.rsplit("/", 1)[1] for s, url in links.items()},
    }
    assert len(secrets) == 22  # 3 links: codes, states, verifiers, tokens; 3 token pairs
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
    await sql.execute(  # the demo's `br` application (no MP_* set: the demo's two)
        "INSERT INTO app_breakers VALUES ($1, 'invalid_client', now(), now())", DEMO_CLIENT_ID_BR
    )
    code, out, _ = await run_cli("breaker", "list", env=env)
    assert code == 0
    assert "unconfigured:app-1\tapp-1\topen\tinvalid_client" in out
    assert f"br\t{DEMO_CLIENT_ID_BR}\topen\tinvalid_client" in out
    code, out, _ = await run_cli("breaker", "close", "app-1", env=env)
    assert (code, out.strip()) == (0, "closed 1 breaker(s)")
    code, out, _ = await run_cli("breaker", "close", "br", env=env)  # by its name
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
