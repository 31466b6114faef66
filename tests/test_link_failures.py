"""Every way a link can fail ends on a clear page, changes nothing it should not, and calls
Mercado Pago only when a code may be exchanged."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
import pytest

from service.core.crypto import context
from tests.support import Broker, FakeClock, SellerBrowser, Simulator, query_of, settings_keyring

SELLER = "seller-7"


async def linked_sellers(sql: asyncpg.Connection) -> int:
    count: int = await sql.fetchval("SELECT count(*) FROM sellers")
    return count


def logged(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    """The fields of each `event` line of the link flow; an expected failure logs no traceback."""
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
    return [
        getattr(r, "fields", {})
        for r in caplog.records
        if r.name == "broker.linking" and r.getMessage() == event
    ]


async def test_a_denied_consent_links_nothing_and_calls_no_token_endpoint(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with SellerBrowser() as browser:
        page = await browser.link(await broker.start_link(SELLER), decision="deny")
    assert page.status_code == 200
    assert "Nothing was linked" in page.text
    assert await simulator.token_requests() == 0
    assert await linked_sellers(sql) == 0
    assert await sql.fetchval("SELECT outcome FROM link_attempts") == "denied"
    assert [f["outcome"] for f in logged(caplog, "callback.outcome")] == ["denied"]


async def test_a_replayed_callback_shows_the_recorded_outcome_without_a_second_exchange(
    broker: Broker, simulator: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with SellerBrowser() as browser:
        callback = await browser.authorize(await broker.start_link(SELLER), 9)
        first = await browser.callback(callback)
        again = await browser.callback(callback)
    assert first.status_code == again.status_code == 200
    assert "Your account is linked" in again.text
    assert await simulator.token_requests() == 1
    assert [f["outcome"] for f in logged(caplog, "callback.replayed")] == ["linked"]


@pytest.mark.parametrize("decision", ["allow", "deny"])
@pytest.mark.parametrize("stranger_has_a_cookie", [False, True])
async def test_a_callback_from_another_browser_is_refused_before_any_upstream_call(
    broker: Broker,
    simulator: Simulator,
    sql: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    decision: str,
    stranger_has_a_cookie: bool,
) -> None:
    caplog.set_level(logging.INFO)
    attempt = "SELECT consumed_at, outcome FROM link_attempts WHERE seller_id = $1"
    async with SellerBrowser() as seller, SellerBrowser() as stranger:
        callback = await seller.authorize(await broker.start_link(SELLER), 9, decision)
        if stranger_has_a_cookie:  # a binder of their own, for an attempt of their own
            await stranger.open_link(await broker.start_link("stranger-seller"))
        page = await stranger.callback(callback)
        assert page.status_code == 403
        assert "same browser" in page.text
        assert await simulator.token_requests() == 0
        # Nothing changed, a denial included: the rightful browser can still finish.
        assert tuple(await sql.fetchrow(attempt, SELLER)) == (None, None)
        finished = await seller.callback(callback)
    assert finished.status_code == 200
    outcome = "linked" if decision == "allow" else "denied"
    assert (await sql.fetchrow(attempt, SELLER))["outcome"] == outcome
    assert [f["reason"] for f in logged(caplog, "callback.refused")] == ["unbound_browser"]


async def test_an_unknown_state_is_refused_before_any_upstream_call(
    broker: Broker, simulator: Simulator
) -> None:
    async with SellerBrowser() as browser:
        callback = await browser.authorize(await broker.start_link(SELLER), 9)
        forged = callback.replace(query_of(callback)["state"], "A" * 43)
        page = await browser.callback(forged)
    assert page.status_code == 400
    assert await simulator.token_requests() == 0


async def test_a_callback_without_parameters_gets_a_page_not_a_stack_trace(broker: Broker) -> None:
    async with SellerBrowser() as browser:
        page = await browser.callback(f"{broker.url}/oauth/callback")
    assert page.status_code == 400
    assert page.headers["content-type"].startswith("text/html")
    assert "Traceback" not in page.text


async def test_an_expired_attempt_is_refused_before_any_upstream_call(
    broker: Broker, simulator: Simulator, clock: FakeClock
) -> None:
    async with SellerBrowser() as browser:
        callback = await browser.authorize(await broker.start_link(SELLER), 9)
        clock.advance(seconds=broker.settings.broker_attempt_ttl_seconds + 1)
        page = await browser.callback(callback)
    assert page.status_code == 400
    assert "took too long" in page.text
    assert await simulator.token_requests() == 0


async def test_an_expired_link_does_not_start_an_attempt(
    broker: Broker, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    link_url = await broker.start_link(SELLER)
    clock.advance(seconds=broker.settings.broker_link_ttl_seconds + 1)
    async with SellerBrowser() as browser:
        reply = await browser.http.get(link_url)
    assert reply.status_code == 410
    assert await sql.fetchval("SELECT count(*) FROM link_attempts") == 0


async def test_an_unknown_link_is_a_404_page(broker: Broker) -> None:
    async with SellerBrowser() as browser:
        reply = await browser.http.get(f"{broker.url}/link/{'x' * 43}")
    assert reply.status_code == 404
    assert "not valid" in reply.text


async def test_a_code_stolen_into_another_attempt_fails_pkce(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    """An attacker who intercepts the seller's code and replays it through their own attempt
    (their own state and cookie) sends the wrong verifier: Mercado Pago refuses it."""
    async with SellerBrowser() as seller, SellerBrowser() as attacker:
        victim_callback = await seller.authorize(await broker.start_link(SELLER), 9)
        attacker_callback = await attacker.authorize(await broker.start_link("attacker-seller"), 66)
        stolen_code = query_of(victim_callback)["code"]
        own_code = query_of(attacker_callback)["code"]
        page = await attacker.callback(attacker_callback.replace(own_code, stolen_code))
    assert page.status_code == 502
    assert "did not accept" in page.text
    assert await linked_sellers(sql) == 0
    assert [e["outcome"] for e in await simulator.log()] == ["invalid_grant"]


async def test_a_wrong_verifier_is_refused_by_mercado_pago_and_nothing_is_stored(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    keyring = settings_keyring(broker.settings)
    async with SellerBrowser() as browser:
        callback = await browser.authorize(await broker.start_link(SELLER), 9)
        attempt_id, client_id = await sql.fetchrow("SELECT id, client_id FROM link_attempts")
        other = keyring.seal(
            "B" * 43, context("link_attempts", attempt_id, "code_verifier", client_id)
        )
        await sql.execute("UPDATE link_attempts SET code_verifier = $1", other)
        page = await browser.callback(callback)
    assert page.status_code == 502
    assert await linked_sellers(sql) == 0
    assert await sql.fetchval("SELECT outcome FROM link_attempts") == "exchange_failed"


@pytest.mark.parametrize("fault", [{"status": 500}, {"status": 503}, {"rate_limited": True}])
async def test_an_upstream_error_ends_on_a_retry_page_and_the_link_stays_usable(
    broker: Broker,
    simulator: Simulator,
    sql: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
    fault: dict[str, object],
) -> None:
    caplog.set_level(logging.INFO)
    link_url = await broker.start_link(SELLER)
    await simulator.faults(count=1, **fault)
    async with SellerBrowser() as browser:
        page = await browser.link(link_url)
        assert page.status_code == 503
        assert "not answering" in page.text
        assert await linked_sellers(sql) == 0
        retry = await browser.link(link_url)  # the fault was for one request only
    assert retry.status_code == 200
    assert await linked_sellers(sql) == 1
    outcomes = [f["outcome"] for f in logged(caplog, "callback.outcome")]
    assert outcomes == ["upstream_unavailable", "linked"]


async def test_an_upstream_timeout_ends_on_a_retry_page(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    await simulator.faults(latency_ms=int(broker.settings.mp_timeout_seconds * 1000) + 3000)
    async with SellerBrowser() as browser:
        page = await browser.link(await broker.start_link(SELLER))
    assert page.status_code == 503
    assert await linked_sellers(sql) == 0
    assert await sql.fetchval("SELECT outcome FROM link_attempts") == "upstream_unavailable"
    assert await simulator.token_requests() == 1  # a code is single-use: never retried


async def test_relinking_to_another_mercado_pago_account_is_refused(
    broker: Broker, sql: asyncpg.Connection
) -> None:
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link(SELLER), user_id=1001)
        page = await browser.link(await broker.start_link(SELLER), user_id=2002)
    assert page.status_code == 409
    assert "different Mercado Pago account" in page.text
    token = (await broker.http.get(f"/sellers/{SELLER}/token")).json()
    assert token["mp_user_id"] == 1001
    assert await sql.fetchval("SELECT version FROM sellers") == 1


async def test_a_sandbox_link_for_a_live_seller_is_refused(broker: Broker) -> None:
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link(SELLER))
    reply = await broker.http.post("/link/start", json={"seller_id": SELLER, "test": True})
    assert reply.status_code == 409
    assert reply.json()["code"] == "live_mode_mismatch"


async def test_a_live_link_for_a_sandbox_seller_is_refused(broker: Broker) -> None:
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link(SELLER, test=True))
    reply = await broker.http.post("/link/start", json={"seller_id": SELLER})
    assert reply.status_code == 409
    assert reply.json()["code"] == "live_mode_mismatch"


async def test_a_seller_who_went_live_during_a_sandbox_link_keeps_the_live_credentials(
    broker: Broker, sql: asyncpg.Connection
) -> None:
    # Both links start while the seller holds nothing, so /link/start cannot refuse either;
    # the live one finishes first and the sandbox callback must not overwrite it.
    sandbox_link = await broker.start_link(SELLER, test=True)
    live_link = await broker.start_link(SELLER)
    async with SellerBrowser() as browser:
        sandbox_callback = await browser.authorize(sandbox_link, 9)
        assert (await browser.link(live_link, 9)).status_code == 200
        page = await browser.callback(sandbox_callback)
    assert page.status_code == 409
    assert "Test and live accounts do not mix" in page.text
    token = (await broker.http.get(f"/sellers/{SELLER}/token")).json()
    assert token["access_token"].startswith("APP_USR-")
    assert token["live_mode"] is True
    assert await sql.fetchval("SELECT version FROM sellers") == 1
    outcome = "SELECT outcome FROM link_attempts WHERE test"
    assert await sql.fetchval(outcome) == "live_mode_mismatch"


@pytest.mark.parametrize(
    "return_url",
    [
        "https://evil.example/sellers/1",
        "https://platform.example.evil.example/sellers/1",
        "https://platform.example@evil.example/sellers/1",
        "https://user:pw@platform.example/sellers/1",
        "http://platform.example/sellers/1",
        "https://platform.example:8443/sellers/1",
        "https://platform.example/admin",
        "https://platform.example/sellers-evil",
        "javascript:alert(1)",
        "//evil.example/sellers/",
        "https://platform.example\\@evil.example/sellers/",
        "https://platform.example/sellers/\r\nLocation: https://evil.example",
        "https://[::1/sellers/",
        # Dot segments: a browser resolves them to /admin before asking (#13 finding 4).
        "https://platform.example/sellers/../admin",
        "https://platform.example/sellers/%2e%2e/admin",
        "https://platform.example/sellers/.%2E/logout?next=https://evil.example",
        "https://platform.example/sellers/./../admin",
        "https://platform.example/sellers/..",
    ],
)
async def test_an_open_redirect_is_refused_and_nothing_is_stored(
    broker: Broker, sql: asyncpg.Connection, return_url: str
) -> None:
    reply = await broker.http.post(
        "/link/start", json={"seller_id": SELLER, "return_url": return_url}
    )
    assert reply.status_code == 422
    assert reply.json()["code"] == "invalid_request"
    assert await sql.fetchval("SELECT count(*) FROM links") == 0


@pytest.mark.parametrize(
    "path",
    [
        "/link/" + "x" * 200,
        "/link/%00%01",
        "/oauth/callback?state=" + "s" * 600 + "&code=c",
        "/oauth/callback?state=%ff%fe&code=c",
        "/oauth/callback?code=c",
        "/oauth/callback?state=&code=",
    ],
)
async def test_malformed_link_ids_and_states_are_refused_without_an_upstream_call(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection, path: str
) -> None:
    async with SellerBrowser() as browser:
        reply = await browser.http.get(broker.url + path)
    assert 400 <= reply.status_code < 500
    assert "Traceback" not in reply.text
    assert await simulator.token_requests() == 0
    assert await sql.fetchval("SELECT count(*) FROM link_attempts") == 0
