"""The whole link flow over real HTTP: broker and simulator as servers on loopback."""

from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg

from service.linking import Outcome
from tests.conftest import (
    SIM_EXPIRES_IN,
    Broker,
    FakeClock,
    SellerBrowser,
    Simulator,
    query_of,
)

SELLER = "billing/seller-42"


async def test_a_seller_links_and_the_platform_reads_a_token(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    link_url = await broker.start_link(SELLER)
    async with SellerBrowser() as browser:
        authorization_url = await browser.open_link(link_url)
        params = query_of(authorization_url)
        assert authorization_url.startswith(f"{simulator.url}/authorization?")
        assert params["response_type"] == "code"
        assert params["platform_id"] == "mp"
        assert params["code_challenge_method"] == "S256"
        assert len(params["state"]) >= 43
        assert "code_verifier" not in authorization_url
        page = await browser.callback(await browser.consent(authorization_url, "allow", 555))

    assert page.status_code == 200
    assert "Your account is linked" in page.text
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]

    reply = await broker.http.get(f"/sellers/{SELLER}/token")
    assert reply.status_code == 200
    assert reply.headers["cache-control"] == "no-store"
    token = reply.json()
    assert token["access_token"].startswith(f"APP_USR-{broker.settings.mp_client_id}-")
    assert token["access_token"].endswith("-555")
    assert token["mp_user_id"] == 555
    assert token["live_mode"] is True
    assert token["scope"] == "offline_access read write"

    row = await sql.fetchrow("SELECT * FROM sellers WHERE seller_id = $1", SELLER)
    assert row["status"] == "linked"
    assert row["version"] == 1
    # A dump of the table holds no usable token.
    dump = " ".join(str(v) for v in row.values())
    assert token["access_token"] not in dump
    assert "TG-" not in dump
    assert row["access_token"].startswith("v1.k1.")
    log = await simulator.log()
    assert [(e["grant_type"], e["content_type"], e["has_code_verifier"]) for e in log] == [
        ("authorization_code", "form", True)
    ]


async def test_expires_at_counts_from_when_the_exchange_was_sent(
    broker: Broker, simulator: Simulator, clock: FakeClock
) -> None:
    start = clock.now
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link(SELLER))
    token = (await broker.http.get(f"/sellers/{SELLER}/token")).json()
    # The simulator issues 15768000 s, not the usual 180 days: the broker must read expires_in.
    assert datetime.fromisoformat(token["expires_at"]) == start + timedelta(seconds=SIM_EXPIRES_IN)


async def test_a_sandbox_link_stores_test_credentials(broker: Broker) -> None:
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link(SELLER, test=True))
    token = (await broker.http.get(f"/sellers/{SELLER}/token")).json()
    assert token["access_token"].startswith("TEST-")
    assert token["live_mode"] is False


async def test_a_lapsed_token_answers_a_clear_error(broker: Broker, clock: FakeClock) -> None:
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link(SELLER))
    clock.advance(seconds=SIM_EXPIRES_IN + 1)
    reply = await broker.http.get(f"/sellers/{SELLER}/token")
    assert reply.status_code == 409
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.json()["code"] == "token_expired"


async def test_the_seller_comes_back_to_the_return_url_with_a_status(broker: Broker) -> None:
    return_url = "https://platform.example/sellers/42?tab=payments"
    async with SellerBrowser() as browser:
        reply = await browser.link(await broker.start_link(SELLER, return_url=return_url))
    assert reply.status_code == 303
    target = reply.headers["location"]
    assert target.startswith("https://platform.example/sellers/42?")
    assert query_of(target) == {"tab": "payments", "status": "linked", "seller_id": SELLER}


async def test_relinking_the_same_account_rotates_the_stored_pair(
    broker: Broker, sql: asyncpg.Connection
) -> None:
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link(SELLER), user_id=777)
        first = (await broker.http.get(f"/sellers/{SELLER}/token")).json()["access_token"]
        page = await browser.link(await broker.start_link(SELLER), user_id=777)
    assert "linked again" in page.text
    second = (await broker.http.get(f"/sellers/{SELLER}/token")).json()["access_token"]
    assert second != first
    assert await sql.fetchval("SELECT version FROM sellers WHERE seller_id = $1", SELLER) == 2


async def test_a_used_link_cannot_link_again(broker: Broker) -> None:
    link_url = await broker.start_link(SELLER)
    async with SellerBrowser() as browser:
        await browser.link(link_url)
        reply = await browser.http.get(link_url)
    assert reply.status_code == 410
    assert "already used" in reply.text


async def test_two_tabs_of_one_browser_both_stay_usable(broker: Broker) -> None:
    async with SellerBrowser() as browser:
        first = await browser.open_link(await broker.start_link(SELLER))
        second = await browser.open_link(await broker.start_link("other-seller"))
        ok_second = await browser.callback(await browser.consent(second, "allow", 1))
        ok_first = await browser.callback(await browser.consent(first, "allow", 2))
    assert ok_first.status_code == ok_second.status_code == 200
    assert str(Outcome.LINKED) in ok_first.text
