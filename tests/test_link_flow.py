"""The whole link flow over real HTTP: broker and simulator as servers on loopback."""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta

import asyncpg
import pytest

from service.core.crypto import context
from service.linking import pkce
from service.linking.flow import Outcome
from tests.support import (
    CLIENT_ID,
    SIM_EXPIRES_IN,
    Broker,
    FakeClock,
    SellerBrowser,
    Simulator,
    query_of,
    settings_keyring,
)

SELLER = "billing/seller-42"
PUBLIC_KEY = re.compile(r"APP_USR-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


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
        # The verifier never leaves the server: its value is nowhere in the URL, only its hash.
        attempt_id, verifier = await sql.fetchrow("SELECT id, code_verifier FROM link_attempts")
        verifier = settings_keyring(broker.settings).open(
            verifier, context("link_attempts", attempt_id, "code_verifier", CLIENT_ID)
        )
        assert params["code_challenge"] == pkce.challenge(verifier, "S256")
        assert verifier not in authorization_url
        page = await browser.callback(await browser.consent(authorization_url, "allow", 555))

    assert page.status_code == 200
    assert "Your account is linked" in page.text
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]

    reply = await broker.http.get(f"/sellers/{SELLER}/token")
    assert reply.status_code == 200
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["pragma"] == "no-cache"
    token = reply.json()
    assert token["access_token"].startswith(f"APP_USR-{broker.settings.mp_client_id}-")
    assert token["access_token"].endswith("-555")
    assert token["mp_user_id"] == 555
    assert token["live_mode"] is True
    assert token["scope"] == "offline_access read write"

    row = await sql.fetchrow("SELECT * FROM sellers WHERE seller_id = $1", SELLER)
    assert row["status"] == "linked"
    assert row["version"] == 1
    assert PUBLIC_KEY.fullmatch(row["public_key"] or "")
    # The application is kept on every row, so serving several later is configuration.
    assert row["client_id"] == CLIENT_ID
    assert await sql.fetchval("SELECT client_id FROM link_attempts") == CLIENT_ID
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
    await simulator.faults(after_rotate="hold")
    async with SellerBrowser() as browser:
        pending = asyncio.create_task(browser.link(await broker.start_link(SELLER)))
        await simulator.wait_until_held()
        sent_at = clock.now
        clock.advance(minutes=30)  # Mercado Pago answers half an hour after the request left
        await simulator.release()
        assert (await pending).status_code == 200
    token = (await broker.http.get(f"/sellers/{SELLER}/token")).json()
    # The simulator issues 15768000 s, not the usual 180 days: the broker must read expires_in.
    assert datetime.fromisoformat(token["expires_at"]) == sent_at + timedelta(
        seconds=SIM_EXPIRES_IN
    )


async def test_a_link_is_usable_until_its_ttl_and_says_when_that_ends(
    broker: Broker, clock: FakeClock
) -> None:
    ttl = broker.settings.broker_link_ttl_seconds
    reply = await broker.http.post("/link/start", json={"seller_id": SELLER})
    assert reply.status_code == 201
    assert datetime.fromisoformat(reply.json()["expires_at"]) == clock.now + timedelta(seconds=ttl)
    clock.advance(seconds=ttl - 1)  # the other side, ttl + 1, is in test_link_failures.py
    async with SellerBrowser() as browser:
        page = await browser.link(reply.json()["link_url"])
    assert page.status_code == 200
    assert "Your account is linked" in page.text


async def test_a_sandbox_link_stores_test_credentials(broker: Broker) -> None:
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link(SELLER, test=True))
    token = (await broker.http.get(f"/sellers/{SELLER}/token")).json()
    assert token["access_token"].startswith("TEST-")
    assert token["live_mode"] is False


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


@pytest.mark.parametrize(
    "settings_overrides",
    [{}, {"broker_allow_account_change": True}],
    ids=["defaults", "account-change-allowed"],
)
async def test_an_attempt_of_a_link_that_linked_meanwhile_completes_nothing(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    """A forwarded link left at the consent page by someone else, finished after the seller
    linked: refused before its code reaches Mercado Pago, whoever consented."""
    link_url = await broker.start_link(SELLER)
    async with SellerBrowser() as stranger, SellerBrowser() as seller:
        left_open = await stranger.open_link(link_url)
        assert (await seller.link(link_url, user_id=424242)).status_code == 200
        callback = await stranger.consent(left_open, "allow", 666)
        page = await stranger.callback(callback)
    assert page.status_code == 410
    assert "already used" in page.text
    assert await simulator.token_requests("authorization_code") == 1  # only the seller's
    row = await sql.fetchrow("SELECT mp_user_id, version FROM sellers")
    assert (row["mp_user_id"], row["version"]) == (424242, 1)


async def test_two_attempts_of_one_link_at_once_exchange_one_code(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    """The seller and a forwarded copy both at the consent page, both come back while the
    first exchange is in flight: the second waits its turn and its code never reaches Mercado
    Pago; once the first linked, the link is used."""
    link_url = await broker.start_link(SELLER)
    async with SellerBrowser() as seller, SellerBrowser() as stranger:
        first = await seller.authorize(link_url, 424242)
        second = await stranger.authorize(link_url, 666)
        await simulator.faults(after_rotate="hold")
        exchanging = asyncio.create_task(seller.callback(first))
        await simulator.wait_until_held()
        waiting = await stranger.callback(second)
        assert waiting.status_code == 409
        assert "Still linking" in waiting.text
        await simulator.release()
        assert (await exchanging).status_code == 200
        after = await stranger.callback(second)
    assert after.status_code == 410
    assert "already used" in after.text
    assert await simulator.token_requests("authorization_code") == 1
    row = await sql.fetchrow("SELECT mp_user_id, version FROM sellers")
    assert (row["mp_user_id"], row["version"]) == (424242, 1)


@pytest.mark.parametrize("settings_overrides", [{"broker_link_ttl_seconds": 60}])
async def test_a_link_that_expires_mid_consent_completes_nothing(
    broker: Broker, simulator: Simulator, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    """The attempt (10 minutes) outlives its link: the link's expiry still wins."""
    async with SellerBrowser() as seller:
        authorization = await seller.open_link(await broker.start_link(SELLER))
        clock.advance(seconds=61)
        page = await seller.callback(await seller.consent(authorization, "allow", 7))
    assert page.status_code == 410
    assert "expired" in page.text
    assert await simulator.token_requests("authorization_code") == 0
    assert await sql.fetchval("SELECT count(*) FROM sellers") == 0


async def test_two_tabs_of_one_browser_both_stay_usable(broker: Broker) -> None:
    async with SellerBrowser() as browser:
        first = await browser.open_link(await broker.start_link(SELLER))
        second = await browser.open_link(await broker.start_link("other-seller"))
        ok_second = await browser.callback(await browser.consent(second, "allow", 1))
        ok_first = await browser.callback(await browser.consent(first, "allow", 2))
    assert ok_first.status_code == ok_second.status_code == 200
    assert str(Outcome.LINKED) in ok_first.text


@pytest.mark.parametrize("settings_overrides", [{"mp_pkce_method": "plain"}])
async def test_plain_pkce_is_used_only_when_configured_and_still_links(broker: Broker) -> None:
    async with SellerBrowser() as browser:
        authorization_url = await browser.open_link(await broker.start_link(SELLER))
        params = query_of(authorization_url)
        assert params["code_challenge_method"] == "plain"
        assert pkce.is_valid_verifier(params["code_challenge"])
        page = await browser.callback(await browser.consent(authorization_url, "allow", 5))
    assert page.status_code == 200


@pytest.mark.parametrize("settings_overrides", [{"mp_pkce_method": "off"}])
async def test_pkce_off_sends_no_challenge(broker: Broker, sql: asyncpg.Connection) -> None:
    async with SellerBrowser() as browser:
        params = query_of(await browser.open_link(await broker.start_link(SELLER)))
    assert "code_challenge" not in params
    assert "code_challenge_method" not in params
    assert await sql.fetchval("SELECT code_verifier FROM link_attempts") is None


async def test_the_binding_cookie_is_httponly_lax_and_short_lived(broker: Broker) -> None:
    async with SellerBrowser() as browser:
        reply = await browser.http.get(await broker.start_link(SELLER))
    cookie = reply.headers["set-cookie"]
    assert cookie.startswith("mpb_link=")
    assert "HttpOnly" in cookie
    assert "SameSite=lax" in cookie
    assert f"Max-Age={broker.settings.broker_attempt_ttl_seconds}" in cookie
    assert "Path=/" in cookie
    assert reply.headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize(
    "planted",
    ["A" * 43, "A" * 43 + "." + "B" * 43, "attacker-chosen"],
    ids=["old-format", "forged-tag", "any-value"],
)
async def test_a_planted_binder_is_never_adopted(
    broker: Broker, sql: asyncpg.Connection, planted: str
) -> None:
    """Another service on the host may plant `mpb_link` (http mode): a value the broker did not
    issue is replaced, never bound to an attempt (the login-CSRF chain of #13 finding 5)."""
    async with SellerBrowser() as browser:
        browser.http.cookies.set("mpb_link", planted)
        reply = await browser.http.get(await broker.start_link(SELLER))
        issued = reply.headers["set-cookie"].split(";")[0].split("=", 1)[1]
        assert issued != planted
        assert await sql.fetchval("SELECT binder_hash FROM link_attempts") == pkce.digest(issued)
        # The one the broker issued is kept for the next link (two tabs, one binder).
        again = await browser.http.get(await broker.start_link("other-seller"))
        assert again.headers["set-cookie"].split(";")[0].split("=", 1)[1] == issued


@pytest.mark.parametrize("settings_overrides", [{"broker_public_url": "https://broker.example"}])
async def test_behind_https_the_host_prefixed_cookie_binds_the_browser_through_the_callback(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    link_url = await broker.start_link(SELLER)
    assert link_url.startswith("https://broker.example/link/")
    async with SellerBrowser() as browser:
        # A TLS proxy would stand in front of the broker; the test talks to it directly.
        reply = await browser.http.get(link_url.replace("https://broker.example", broker.url))
        cookie = reply.headers["set-cookie"]
        assert cookie.startswith("__Host-mpb_link=")
        assert "Secure" in cookie
        assert "Path=/" in cookie
        assert "Domain" not in cookie
        binder = cookie.split(";")[0].split("=", 1)[1]
        callback = await browser.consent(reply.headers["location"], "allow", 5)
        # Over plain HTTP the jar would withhold a Secure cookie: send exactly what is named.
        browser.http.cookies.clear()
        without = await browser.callback(callback)
        # The unprefixed name could be planted by a sibling subdomain: it binds nothing here.
        planted = await browser.http.get(callback, headers={"Cookie": f"mpb_link={binder}"})
        assert without.status_code == planted.status_code == 403
        assert await simulator.token_requests() == 0
        page = await browser.http.get(callback, headers={"Cookie": f"__Host-mpb_link={binder}"})
    assert page.status_code == 200
    assert "Your account is linked" in page.text
    assert await sql.fetchval("SELECT status FROM sellers WHERE seller_id = $1", SELLER) == "linked"
    assert await simulator.token_requests() == 1


async def wait_for_lock_waiters(sql: asyncpg.Connection, count: int) -> None:
    """Bounded wait until `count` sessions of this database wait on a lock."""
    for _ in range(400):
        await sql.execute("SELECT pg_stat_clear_snapshot()")  # else a transaction sees one view
        waiting = await sql.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        if waiting >= count:
            return
        await asyncio.sleep(0.025)
    raise AssertionError(f"{count} sessions never waited on a lock")


async def test_two_concurrent_submissions_of_one_callback_exchange_the_code_once(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    async with SellerBrowser() as browser:
        callback = await browser.authorize(await broker.start_link(SELLER), 5)
        await simulator.faults(after_rotate="hold")
        # Hold the attempt's row so that both submissions are inside the claim at once (as
        # when the first one's transaction is still open); then let them race for it.
        async with sql.transaction():
            await sql.execute("SELECT 1 FROM link_attempts FOR UPDATE")
            submissions = [asyncio.create_task(browser.callback(callback)) for _ in range(2)]
            await wait_for_lock_waiters(sql, 2)
        # The winner's reply is held by Mercado Pago; the loser must answer without it.
        done, pending = await asyncio.wait(
            submissions, timeout=30, return_when=asyncio.FIRST_COMPLETED
        )
        assert len(done) == len(pending) == 1
        loser = done.pop().result()
        assert loser.status_code == 409
        assert "Still linking" in loser.text
        # The loser may answer before the winner's exchange reaches Mercado Pago: release only
        # a reply that is held, or the release comes first and the winner's reply waits forever.
        await simulator.wait_until_held()
        await simulator.release()
        winner = await pending.pop()
    assert winner.status_code == 200
    assert await simulator.token_requests() == 1
    assert await sql.fetchval("SELECT count(*) FROM sellers WHERE status = 'linked'") == 1
    assert await sql.fetchval("SELECT outcome FROM link_attempts") == "linked"


async def test_the_attempt_is_consumed_and_committed_before_mercado_pago_answers(
    broker: Broker, simulator: Simulator, sql: asyncpg.Connection
) -> None:
    await simulator.faults(after_rotate="hold")
    async with SellerBrowser() as browser:
        callback = await browser.authorize(await broker.start_link(SELLER), 5)
        pending = asyncio.create_task(browser.callback(callback))
        await simulator.wait_until_held()
        # Mercado Pago holds its reply: the attempt is already consumed, seen from outside.
        row = await sql.fetchrow("SELECT consumed_at, outcome FROM link_attempts")
        assert row["consumed_at"] is not None
        assert row["outcome"] == "exchanging"
        await simulator.release()
        page = await pending
    assert page.status_code == 200
    assert await sql.fetchval("SELECT outcome FROM link_attempts") == "linked"


async def test_a_failure_also_returns_to_the_return_url_with_its_status(broker: Broker) -> None:
    return_url = "https://platform.example/sellers/42"
    async with SellerBrowser() as browser:
        reply = await browser.link(
            await broker.start_link(SELLER, return_url=return_url), decision="deny"
        )
    assert reply.status_code == 303
    assert query_of(reply.headers["location"])["status"] == "denied"


@pytest.mark.parametrize("settings_overrides", [{"broker_allow_account_change": True}])
async def test_an_account_change_is_allowed_when_configured(broker: Broker) -> None:
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link(SELLER), user_id=1001)
        page = await browser.link(await broker.start_link(SELLER), user_id=2002)
    assert page.status_code == 200
    token = (await broker.http.get(f"/sellers/{SELLER}/token")).json()
    assert token["mp_user_id"] == 2002


@pytest.mark.parametrize(
    ("accept_language", "lang", "title"),
    [
        ("es-AR,es;q=0.9,en;q=0.5", "es", "Tu cuenta quedó vinculada"),
        ("pt-BR", "pt", "Sua conta foi vinculada"),
        ("fr-FR, en;q=0.1", "en", "Your account is linked"),
        (None, "en", "Your account is linked"),
    ],
)
async def test_seller_pages_speak_the_browsers_language(
    broker: Broker, accept_language: str | None, lang: str, title: str
) -> None:
    async with SellerBrowser() as browser:
        if accept_language:
            browser.http.headers["accept-language"] = accept_language
        page = await browser.link(await broker.start_link(SELLER))
    assert page.status_code == 200
    assert f'<html lang="{lang}">' in page.text
    assert title in page.text
    assert page.headers["content-language"] == lang
    assert "Connected apps" in page.text or "conectad" in page.text  # where to remove access
