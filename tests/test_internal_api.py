"""The internal API's contract: authentication, scopes, validation, problem+json."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from service.linking.flow import check_return_url
from tests.support import (
    Broker,
    SellerBrowser,
    assert_problem,
    calling_with,
    create_api_key,
    new_key,
)


async def linked(broker: Broker, seller_id: str, user_id: int) -> None:
    async with SellerBrowser() as browser:
        assert (await browser.link(await broker.start_link(seller_id), user_id)).status_code == 200


@pytest.mark.parametrize(
    "authorization",
    [None, "Basic abc", "Bearer", "Bearer mpb_00000000_" + "A" * 43, "Bearer not-a-key"],
)
async def test_a_missing_or_unknown_api_key_is_401(
    broker: Broker, authorization: str | None
) -> None:
    headers = {"Authorization": authorization} if authorization else {}
    async with httpx.AsyncClient(base_url=broker.url, headers=headers) as anonymous:
        assert_problem(await anonymous.get("/sellers/x/token"), 401, "unauthorized")
        assert_problem(
            await anonymous.post("/link/start", json={"seller_id": "x"}), 401, "unauthorized"
        )


async def test_a_key_with_a_wrong_secret_but_a_real_prefix_is_401(broker: Broker) -> None:
    forged = broker.api_key[:13] + ("A" * 43 if broker.api_key[13] != "A" else "B" * 43)
    async with httpx.AsyncClient(
        base_url=broker.url, headers={"Authorization": f"Bearer {forged}"}
    ) as caller:
        assert_problem(await caller.get("/sellers/x/token"), 401, "unauthorized")


async def test_a_revoked_key_is_401(broker: Broker, sql: asyncpg.Connection) -> None:
    await sql.execute("UPDATE api_keys SET revoked_at = now()")
    assert_problem(await broker.http.get("/sellers/x/token"), 401, "unauthorized")


async def test_a_key_without_the_scope_is_403(broker: Broker, database_url: str) -> None:
    reader = await create_api_key(database_url, scopes=("tokens:read",))
    async with httpx.AsyncClient(
        base_url=broker.url, headers={"Authorization": f"Bearer {reader}"}
    ) as caller:
        assert_problem(await caller.post("/link/start", json={"seller_id": "x"}), 403, "forbidden")
        assert_problem(await caller.get("/sellers/x/token"), 404, "seller_not_found")


async def test_a_key_without_tokens_read_is_403_on_reading_or_reporting_a_token(
    broker: Broker, database_url: str
) -> None:
    await linked(broker, "seller-1", 11)
    key = await new_key(database_url, scopes=("links:write", "sellers:admin"))
    async with calling_with(broker, key) as caller:
        assert_problem(await caller.get("/sellers/seller-1/token"), 403, "forbidden")
        assert_problem(await caller.post("/sellers/seller-1/token/invalid"), 403, "forbidden")
    assert (await broker.token("seller-1")).status_code == 200  # and nothing was marked invalid


async def test_a_namespaced_key_reaches_only_its_own_sellers(
    broker: Broker, database_url: str
) -> None:
    await linked(broker, "other/1", 11)
    await linked(broker, "billing2/1", 12)
    await linked(broker, "billing/1", 13)
    key = await new_key(database_url, namespace="billing/")
    async with calling_with(broker, key) as billing:
        assert_problem(await billing.get("/sellers/other/1/token"), 403, "forbidden")
        assert_problem(await billing.get("/sellers/billing2/1/token"), 403, "forbidden")
        refused = await billing.post("/link/start", json={"seller_id": "other/2"})
        assert_problem(refused, 403, "forbidden")
        assert (await billing.get("/sellers/billing/1/token")).status_code == 200
        started = await billing.post("/link/start", json={"seller_id": "billing/2"})
        assert started.status_code == 201, started.text


@pytest.mark.parametrize("namespace", ["billing", "", "/", "billing//", "../", "has space/"])
async def test_a_namespace_must_be_a_seller_id_prefix_ending_in_a_slash(
    database_url: str, sql: asyncpg.Connection, namespace: str
) -> None:
    with pytest.raises(ValueError, match="namespace"):
        await new_key(database_url, namespace=namespace)
    assert await sql.fetchval("SELECT count(*) FROM api_keys") == 0


async def test_an_unknown_seller_is_404(broker: Broker) -> None:
    assert_problem(await broker.http.get("/sellers/nobody/token"), 404, "seller_not_found")


async def test_the_api_keys_table_holds_only_digests(
    broker: Broker, sql: asyncpg.Connection
) -> None:
    rows = await sql.fetch("SELECT * FROM api_keys")
    dump = " ".join(str(v) for row in rows for v in row.values())
    assert broker.api_key not in dump
    assert broker.api_key.split("_", 2)[2] not in dump


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"seller_id": ""},
        {"seller_id": "a" * 129},
        {"seller_id": "has space"},
        {"seller_id": "../etc"},
        {"seller_id": "a//b"},
        {"seller_id": "ok", "unknown": 1},
        {"seller_id": "ok", "test": "maybe"},
        {"seller_id": "ok", "test": 0},
        {"seller_id": "ok", "test": "true"},
        {"seller_id": "billing/token"},
        {"seller_id": "ok", "return_url": "x" * 2049},
    ],
)
async def test_bad_link_requests_are_422_and_store_nothing(
    broker: Broker, sql: asyncpg.Connection, body: dict[str, object]
) -> None:
    assert_problem(await broker.http.post("/link/start", json=body), 422, "invalid_request")
    assert await sql.fetchval("SELECT count(*) FROM links") == 0


async def test_validation_errors_do_not_echo_the_input(broker: Broker) -> None:
    reply = await broker.http.post("/link/start", json={"seller_id": "secret value here"})
    assert "secret value here" not in reply.text


async def test_a_link_url_is_unguessable_and_stored_only_as_a_digest(
    broker: Broker, sql: asyncpg.Connection
) -> None:
    link_url = await broker.start_link("seller-1")
    token = link_url.rsplit("/", 1)[1]
    assert link_url.startswith(f"{broker.url}/link/")
    assert len(token) >= 43
    assert await sql.fetchval("SELECT count(*) FROM links WHERE id_hash = $1", token) == 0
    assert await sql.fetchval("SELECT count(*) FROM links") == 1


async def test_a_link_url_is_never_cached(broker: Broker) -> None:
    """link_url is a bearer credential for days: no cache between us and the caller keeps it."""
    reply = await broker.http.post("/link/start", json={"seller_id": "seller-1"})
    assert reply.status_code == 201
    assert reply.headers["cache-control"] == "no-store"


async def test_unknown_routes_answer_problem_json(broker: Broker) -> None:
    assert_problem(await broker.http.get("/nope"), 404, "not_found")


@pytest.mark.parametrize(
    "url",
    [
        "https://platform.example/sellers/",
        "https://platform.example/sellers/42?x=1#frag",
        "https://PLATFORM.example:443/sellers/a/b",
        "https://platform.example/sellers/v1.2/..hidden/...",  # dots, but no dot segment
    ],
)
def test_allowlisted_return_urls_are_accepted(url: str) -> None:
    assert check_return_url(url, ["https://platform.example/sellers/"]) == url


def test_an_empty_allowlist_accepts_no_return_url() -> None:
    with pytest.raises(Exception, match="allowlist"):
        check_return_url("https://platform.example/sellers/", [])


async def test_an_unexpected_failure_is_a_problem_without_details(
    broker: Broker, sql: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    await sql.execute(
        "INSERT INTO sellers (seller_id, client_id, mp_user_id, status, access_token, "
        "refresh_token, live_mode, expires_at, linked_at, updated_at) VALUES "
        "('broken', 'x', 1, 'linked', 'v1.gone.AAAA.BBBB', 'x', true, now() + interval '9d', "
        "now(), now())"
    )
    reply = await broker.http.get("/sellers/broken/token")
    assert_problem(reply, 500, "internal_error")
    assert "gone" not in reply.text
    assert "Traceback" not in reply.text
    # Logged as one line with the exception's type, never a traceback with its values.
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == ["request.failed"]
    assert not [r for r in caplog.records if r.exc_info]
