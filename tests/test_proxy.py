"""The Mercado Pago API proxy: calls made for a seller with the token the broker attaches,
against the real broker and the simulator's payments API over loopback."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest
from prometheus_client import REGISTRY

from service.core.errors import InvalidRequest
from service.proxy.forward import Mask, target, upstream_url
from tests.support.api import assert_problem, calling_with, new_key
from tests.support.browser import SellerBrowser
from tests.support.servers import Broker, Simulator

SELLER, USER_ID = "acme/s-1", 241983636
PROXY = f"/sellers/{SELLER}/-/mercadopago"
PAY = {"transaction_amount": 12.5, "description": "tea"}


async def link(broker: Broker, seller_id: str = SELLER, user_id: int = USER_ID) -> None:
    async with SellerBrowser() as browser:
        linked = await browser.link(await broker.start_link(seller_id), user_id=user_id)
        assert linked.status_code == 200, linked.text


async def api_log(simulator: Simulator) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = (await simulator.http.get("/_control/api-log")).json()
    return calls


async def raw_get(url: str, request_target: str, api_key: str) -> tuple[int, bytes]:
    """GET with the request target sent byte for byte (httpx would normalise `..` and `//`)."""
    host, port = urlsplit(url).hostname, urlsplit(url).port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        f"GET {request_target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {api_key}\r\n"
        "Connection: close\r\n\r\n".encode("latin-1")
    )
    reply = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


# -- what is forwarded, and how ----------------------------------------------------------------


async def test_a_call_reaches_the_sellers_mercado_pago_with_its_token_and_comes_back_whole(
    broker: Broker, simulator: Simulator
) -> None:
    await link(broker)
    created = await broker.http.post(
        f"{PROXY}/v1/payments", json=PAY, headers={"X-Idempotency-Key": "order-1"}
    )
    assert created.status_code == 201, created.text
    payment = created.json()
    assert (payment["collector_id"], payment["description"]) == (USER_ID, "tea")
    found = await broker.http.get(f"{PROXY}/v1/payments/search", params={"status": "approved"})
    assert [p["id"] for p in found.json()["results"]] == [payment["id"]]
    missing = await broker.http.get(f"{PROXY}/v1/payments/search", params={"status": "refunded"})
    assert missing.json()["results"] == []  # the query string went along
    one = await broker.http.get(f"{PROXY}/v1/payments/{payment['id']}")
    assert one.json() == payment
    # Upstream's reply as it came: its status, its own JSON, one Date and Server (ours).
    unknown = await broker.http.get(f"{PROXY}/v1/payments/999")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "not_found")
    assert unknown.headers["content-type"] == "application/json"
    assert len(unknown.headers.get_list("date")) == 1
    calls = await api_log(simulator)
    assert [(c["method"], c["path"], c["user_id"]) for c in calls] == [
        ("POST", "/v1/payments", USER_ID),
        ("GET", "/v1/payments/search", USER_ID),
        ("GET", "/v1/payments/search", USER_ID),
        ("GET", f"/v1/payments/{payment['id']}", USER_ID),
        ("GET", "/v1/payments/999", USER_ID),
    ]
    assert calls[0]["idempotency_key"] == "order-1"


async def test_every_method_is_forwarded_with_its_body(
    broker: Broker, simulator: Simulator
) -> None:
    await link(broker)
    created = await broker.http.post(
        f"{PROXY}/v1/payments", json=PAY, headers={"X-Idempotency-Key": "k"}
    )
    payment_id = created.json()["id"]
    cancelled = await broker.http.put(
        f"{PROXY}/v1/payments/{payment_id}", json={"status": "cancelled"}
    )
    assert cancelled.json()["status"] == "cancelled"
    patched = await broker.http.patch(f"{PROXY}/v1/customers/1", json={"email": "a@b.c"})
    deleted = await broker.http.delete(f"{PROXY}/v1/customers/1/cards/2")
    assert (patched.status_code, deleted.status_code) == (404, 404)  # the simulator's answers
    assert [c["method"] for c in await api_log(simulator)] == ["POST", "PUT", "PATCH", "DELETE"]


async def test_a_seller_id_holding_mercadopago_or_dashes_is_never_ambiguous(
    broker: Broker, simulator: Simulator
) -> None:
    seller = "shop/mercadopago/x-1"
    await link(broker, seller, 77)
    reply = await broker.http.get(f"/sellers/{seller}/-/mercadopago/v1/payments/search")
    assert reply.status_code == 200, reply.text
    # The first `/-/` ends the id: what follows is the upstream path, `/-/` and all.
    odd = await broker.http.get(f"/sellers/{seller}/-/mercadopago/v1/-/mercadopago/x")
    assert odd.status_code == 404  # Mercado Pago's (the simulator's) 404, not the broker's
    assert [c["path"] for c in await api_log(simulator)] == [
        "/v1/payments/search",
        "/v1/-/mercadopago/x",
    ]


async def test_hop_by_hop_headers_and_the_callers_credentials_stay_behind(
    broker: Broker, simulator: Simulator
) -> None:
    await link(broker)
    reply = await broker.http.post(
        f"{PROXY}/v1/payments",
        json=PAY,
        headers={
            "X-Idempotency-Key": "k-9",
            "Connection": "keep-alive, X-Private-Hop",
            "X-Private-Hop": "1",
            "Keep-Alive": "timeout=5",
            "TE": "trailers",
            "Proxy-Authorization": "Basic eDp5",
            "Cookie": "session=abc",
            "X-Forwarded-For": "10.0.0.1",
            "Accept-Encoding": "gzip",
            "X-Custom": "kept",
        },
    )
    assert reply.status_code == 201, reply.text
    (call,) = await api_log(simulator)
    names = set(call["header_names"])
    dropped = {"x-private-hop", "keep-alive", "te", "proxy-authorization", "cookie"}
    assert names & (dropped | {"x-forwarded-for", "accept-encoding"}) == set()
    assert {"x-custom", "x-idempotency-key", "authorization", "content-length"} <= names
    assert call["user_id"] == USER_ID  # the seller's token replaced the caller's API key


async def test_a_non_idempotent_call_is_sent_once_whatever_comes_back(
    broker: Broker, simulator: Simulator
) -> None:
    await link(broker)
    await simulator.faults(api_status=503)
    failed = await broker.http.post(
        f"{PROXY}/v1/payments", json=PAY, headers={"X-Idempotency-Key": "once"}
    )
    assert failed.status_code == 503  # Mercado Pago's own 503, passed on
    assert failed.json()["status"] == 503
    assert "code" not in failed.json()
    assert [c["method"] for c in await api_log(simulator)] == ["POST"]


# -- what is refused, before anything is sent --------------------------------------------------

REFUSED_PATHS = [
    "v1/../../_control/reset",
    "v1/%2e%2e/_control/reset",
    "v1/%2E%2E/x",
    "v1/payments%2Fsearch",
    "v1%5cpayments",
    "v1/./payments",
    "./v1",
    "v1//payments",
    "/evil.example/v1",
    "http://evil.example/v1",
    "http:%2F%2Fevil.example/v1",
    "https:evil.example/v1",
    "evil.example:8443/v1",  # another host and port, as a first segment
    "v1/@evil.example:8443",
    "v1/payments%00",
    "",
]


@pytest.mark.parametrize("path", REFUSED_PATHS)
async def test_a_path_that_could_leave_the_api_host_is_refused_before_anything_is_sent(
    path: str, broker: Broker, simulator: Simulator
) -> None:
    await link(broker)
    status, body = await raw_get(broker.url, f"{PROXY}/{path}", broker.api_key)
    assert status in (404, 422), body  # 404: the route needs a path at all
    if status == 422:
        assert json.loads(body)["code"] == "invalid_request"
    assert await api_log(simulator) == []
    assert (await simulator.http.get("/_control/grants")).status_code == 200  # no reset


async def test_a_backslash_never_reaches_mercado_pago(broker: Broker, simulator: Simulator) -> None:
    await link(broker)
    status, _ = await raw_get(broker.url, f"{PROXY}/v1\\..\\_control", broker.api_key)
    assert status in (400, 422)  # the HTTP parser or the proxy: either way, refused
    assert await api_log(simulator) == []


def test_the_path_is_split_at_the_first_separator_and_checked_raw() -> None:
    assert target(b"/sellers/a/b/-/mercadopago/v1/payments") == ("a/b", "v1/payments")
    assert target(b"/sellers/a/-/mercadopago/v1/-/x") == ("a", "v1/-/x")
    assert target(b"/sellers/a/-/mercadopago/v1/a%20b") == ("a", "v1/a%20b")
    for refused in (b"/sellers/a%2Fb/-/mercadopago/v1", b"/sellers/-/mercadopago/v1", b"/x/a"):
        with pytest.raises(InvalidRequest):
            target(refused)


def test_a_built_url_stays_on_the_applications_host_port_and_path() -> None:
    assert str(upstream_url("https://api.mercadopago.com", "v1/payments", b"a=1")) == (
        "https://api.mercadopago.com/v1/payments?a=1"
    )
    assert str(upstream_url("http://127.0.0.1:9/mp/", "@evil.example/x", b"")) == (
        "http://127.0.0.1:9/mp/@evil.example/x"
    )
    with pytest.raises(InvalidRequest):
        upstream_url("https://api.mercadopago.com/mp", "..", b"")


async def test_a_key_needs_the_proxy_scope_its_namespace_and_its_applications(
    broker: Broker, simulator: Simulator, database_url: str
) -> None:
    await link(broker)
    for key in (
        await new_key(database_url, scopes=("tokens:read",)),
        await new_key(database_url, scopes=("api:proxy",), namespace="other/"),
        await new_key(database_url, scopes=("api:proxy",), client_ids=["another-application"]),
    ):
        async with calling_with(broker, key) as caller:
            assert_problem(await caller.get(f"{PROXY}/v1/payments/search"), 403, "forbidden")
    async with calling_with(broker, await new_key(database_url, ("api:proxy",), "acme/")) as c:
        assert (await c.get(f"{PROXY}/v1/payments/search")).status_code == 200
    assert len(await api_log(simulator)) == 1


async def test_a_seller_to_link_again_or_unlinked_is_409_without_calling_mercado_pago(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    await link(broker, "acme/to-relink", 1)
    await link(broker, "acme/unlinked", 2)
    await sql.execute(
        "UPDATE sellers SET status = 'relink_required', status_reason = 'rotation_lost' "
        "WHERE seller_id = 'acme/to-relink'"
    )
    assert (await broker.http.delete("/sellers/acme/unlinked")).status_code == 200
    for seller, reason in (("acme/to-relink", "rotation_lost"), ("acme/unlinked", "unlinked")):
        reply = await broker.http.get(f"/sellers/{seller}/-/mercadopago/v1/payments/search")
        assert_problem(reply, 409, "relink_required")
        assert reply.json()["reason"] == reason
    assert_problem(
        await broker.http.get("/sellers/acme/nobody/-/mercadopago/v1/payments/search"),
        404,
        "seller_not_found",
    )
    assert await api_log(simulator) == []


async def test_a_revoked_grant_found_by_a_401_marks_the_seller_and_answers_409(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    await link(broker)
    await simulator.http.post("/_control/revoke", json={"user_id": USER_ID})
    reply = await broker.http.get(f"{PROXY}/v1/payments/search")
    assert_problem(reply, 409, "relink_required")
    assert reply.json()["reason"] == "revoked"
    row = await sql.fetchrow(
        "SELECT status, status_reason FROM sellers WHERE seller_id = $1", SELLER
    )
    assert (row["status"], row["status_reason"]) == ("relink_required", "revoked")
    again = await broker.http.get(f"{PROXY}/v1/payments/search")
    assert_problem(again, 409, "relink_required")
    assert len(await api_log(simulator)) == 1  # the second call never left the broker


async def test_a_401_for_a_grant_that_still_works_is_passed_on_and_marks_nothing(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    await link(broker)
    await simulator.faults(api_status=401)  # /v1 refuses, /users/me still accepts the token
    reply = await broker.http.get(f"{PROXY}/v1/payments/search")
    assert reply.status_code == 401
    assert reply.headers["content-type"] == "application/json"  # Mercado Pago's, not ours
    status = await sql.fetchval("SELECT status FROM sellers WHERE seller_id = $1", SELLER)
    assert status == "linked"


# -- limits ------------------------------------------------------------------------------------


@pytest.mark.parametrize("settings_overrides", [{"broker_proxy_rate_per_seller_per_second": 2}])
async def test_one_seller_cannot_spend_more_than_its_rate(
    broker: Broker, simulator: Simulator
) -> None:
    await link(broker)
    await link(broker, "acme/s-2", 2)
    replies = [await broker.http.get(f"{PROXY}/v1/payments/search") for _ in range(3)]
    assert [r.status_code for r in replies] == [200, 200, 429]
    assert_problem(replies[2], 429, "rate_limited")
    assert int(replies[2].headers["retry-after"]) >= 1
    other = await broker.http.get("/sellers/acme/s-2/-/mercadopago/v1/payments/search")
    assert other.status_code == 200  # another seller has its own
    assert len(await api_log(simulator)) == 3


@pytest.mark.parametrize(
    "settings_overrides", [{"broker_proxy_rate_per_application_per_second": 3}]
)
async def test_an_application_cannot_be_called_past_its_rate_by_many_sellers(
    broker: Broker, simulator: Simulator
) -> None:
    for n in range(4):
        await link(broker, f"acme/s-{n}", 10 + n)
    replies = [
        await broker.http.get(f"/sellers/acme/s-{n}/-/mercadopago/v1/payments/search")
        for n in range(4)
    ]
    assert [r.status_code for r in replies] == [200, 200, 200, 429]
    assert len(await api_log(simulator)) == 3


@pytest.mark.parametrize("settings_overrides", [{"broker_proxy_timeout_seconds": 0.3}])
async def test_a_slow_mercado_pago_is_a_504_and_the_call_is_not_repeated(
    broker: Broker, simulator: Simulator
) -> None:
    await link(broker)
    await simulator.faults(api_latency_ms=800)
    reply = await broker.http.post(
        f"{PROXY}/v1/payments", json=PAY, headers={"X-Idempotency-Key": "slow"}
    )
    assert_problem(reply, 504, "upstream_timeout")
    assert [c["method"] for c in await api_log(simulator)] == ["POST"]


@pytest.mark.parametrize("settings_overrides", [{"mp_api_url": "http://127.0.0.1:9"}])
async def test_an_unreachable_mercado_pago_is_a_502(broker: Broker) -> None:
    await link(broker)
    assert_problem(await broker.http.get(f"{PROXY}/v1/payments/search"), 502, "upstream_failed")


@pytest.mark.parametrize(
    "settings_overrides",
    [
        {
            "broker_proxy_max_body_bytes": 2048,
            "broker_proxy_max_response_bytes": 2048,
            "broker_proxy_rate_per_seller_per_second": 100,
        }
    ],
)
async def test_bodies_past_their_limits_are_refused_both_ways(
    broker: Broker, simulator: Simulator
) -> None:
    await link(broker)
    big = {"transaction_amount": 1, "description": "x" * 4096}
    too_large = await broker.http.post(
        f"{PROXY}/v1/payments", json=big, headers={"X-Idempotency-Key": "big"}
    )
    assert_problem(too_large, 413, "body_too_large")
    assert await api_log(simulator) == []
    for n in range(20):  # a search reply past 2 KiB
        await broker.http.post(
            f"{PROXY}/v1/payments", json=PAY, headers={"X-Idempotency-Key": f"k{n}"}
        )
    assert_problem(await broker.http.get(f"{PROXY}/v1/payments/search"), 502, "upstream_failed")


async def test_a_large_body_is_streamed_both_ways(broker: Broker, simulator: Simulator) -> None:
    await link(broker)
    description = "y" * 600_000  # within the default 1 MiB

    async def chunks() -> Any:  # no Content-Length: the caller's body arrives chunked
        body = json.dumps({"transaction_amount": 1, "description": description}).encode()
        for start in range(0, len(body), 65_536):
            yield body[start : start + 65_536]

    created = await broker.http.post(
        f"{PROXY}/v1/payments", content=chunks(), headers={"X-Idempotency-Key": "large"}
    )
    assert created.status_code == 201, created.text[:200]
    assert created.json()["description"] == description


# -- the token stays inside --------------------------------------------------------------------


async def test_the_sellers_token_never_comes_back_even_when_mercado_pago_echoes_it(
    broker: Broker, simulator: Simulator
) -> None:
    await link(broker)
    token = (await broker.token(SELLER)).json()["access_token"]
    echo = {"transaction_amount": 1, "description": f"see {token} and {token}"}
    created = await broker.http.post(
        f"{PROXY}/v1/payments", json=echo, headers={"X-Idempotency-Key": "echo"}
    )
    assert created.status_code == 201
    for reply in (created, await broker.http.get(f"{PROXY}/v1/payments/search")):
        assert token not in reply.text
        assert "*" * len(token) in reply.text
        assert not any(token in value for value in reply.headers.values())
    assert int(created.headers["content-length"]) == len(created.content)


@pytest.mark.parametrize("cut", [1, 5, 17, 64])
def test_the_mask_finds_the_token_across_every_chunk_boundary(cut: int) -> None:
    secret = b"APP_USR-1234567890123456-000000-abcdef-241983636"
    body = b'{"a":"' + secret + b'","b":"' + secret[:10] + b'"}' + secret
    mask = Mask(secret)
    out = b"".join(mask.feed(body[i : i + cut]) for i in range(0, len(body), cut)) + mask.end()
    assert secret not in out
    assert len(out) == len(body)
    assert out.count(b"*" * len(secret)) == 2
    assert secret[:10] in out  # a part of it alone is no token


# -- what is counted ---------------------------------------------------------------------------


async def test_calls_are_audited_per_key_and_seller_and_measured_per_route(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    def calls(route: str, status: str) -> float:
        labels = {"application": "default", "route": route, "status": status}
        return REGISTRY.get_sample_value("broker_proxy_requests_total", labels) or 0.0

    await link(broker)
    before = calls("/v1/payments/search", "200"), calls("/v1/payments/{id}", "404")
    for _ in range(3):
        await broker.http.get(f"{PROXY}/v1/payments/search")
    await broker.http.get(f"{PROXY}/v1/payments/12345")
    runtime = broker.app.state.runtime
    await runtime.proxied.flush(runtime.db.direct)
    audited = await sql.fetch(
        "SELECT actor, seller_id, count FROM audit_events WHERE action = 'proxy.call'"
    )
    assert [(r["seller_id"], r["count"]) for r in audited] == [(SELLER, 4)]
    after = calls("/v1/payments/search", "200"), calls("/v1/payments/{id}", "404")
    assert (after[0] - before[0], after[1] - before[1]) == (3, 1)
    assert "12345" not in (await broker.http.get("/metrics")).text  # ids are no labels


def test_the_proxy_route_is_documented_with_its_scope_and_separator() -> None:
    from service.main import create_app

    paths = create_app().openapi()["paths"]
    route = paths["/sellers/{seller_id}/-/mercadopago/{path}"]
    assert set(route) == {"get", "post", "put", "patch", "delete"}
    assert "api:proxy" in route["get"]["description"]
    assert {"409", "429", "502", "504"} <= set(route["post"]["responses"])
