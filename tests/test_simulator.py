"""The Mercado Pago OAuth simulator behaves like the real server where the broker relies on it."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from service.simulator import SimulatorClient, SimulatorConfig, create_simulator_app, state
from service.simulator.state import fingerprint

CLIENT_ID = "4934588586838432"
SECRET = "app-secret-value"
REDIRECT = "https://broker.example/callback"
OTHER_ID = "777"
OTHER_SECRET = "other-secret-value"
OTHER_REDIRECT = "https://other.example/cb?tenant=1"
USER_ID = 241983636
# RFC 7636 Appendix B.
VERIFIER = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
CHALLENGE = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"

ACCESS_TOKEN = re.compile(rf"APP_USR-{CLIENT_ID}-\d{{6}}-[0-9a-f]{{32}}-{USER_ID}")
REFRESH_TOKEN = re.compile(rf"TG-[0-9a-f]{{24}}-{USER_ID}")
PUBLIC_KEY = re.compile(r"APP_USR-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# secrets.token_urlsafe(32); and no "-<digits>" tail a client could read a user id from.
OPAQUE_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")
USER_ID_TAIL = re.compile(r"-[0-9]+\Z")
PLAIN_FIELDS = {"access_token", "token_type", "expires_in", "refresh_token", "scope"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def make_config(clock: FakeClock | None = None) -> SimulatorConfig:
    return SimulatorConfig(
        clients=[
            SimulatorClient(CLIENT_ID, SECRET, (REDIRECT,), name="Loja <Teste> & Cia"),
            SimulatorClient(OTHER_ID, OTHER_SECRET, (OTHER_REDIRECT,), pkce_required=False),
        ],
        clock=clock or FakeClock(),
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def client(clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    app = create_simulator_app(make_config(clock))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as http:
        yield http


class _FormReader(HTMLParser):
    """Collects what a browser would submit from the consent form (minus the button)."""

    def __init__(self) -> None:
        super().__init__()
        self.action: str | None = None
        self.fields: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.action = values.get("action")
        elif tag == "input":
            self.fields[values["name"]] = values.get("value", "")


def read_form(page: str) -> _FormReader:
    reader = _FormReader()
    reader.feed(page)
    return reader


def auth_params(**overrides: str | None) -> dict[str, str]:
    params: dict[str, str | None] = {
        "client_id": CLIENT_ID,
        "response_type": "code",
        "platform_id": "mp",
        "state": "st-123",
        "redirect_uri": REDIRECT,
        "code_challenge": CHALLENGE,
        "code_challenge_method": "S256",
    }
    params.update(overrides)
    return {name: value for name, value in params.items() if value is not None}


async def authorize(
    client: httpx.AsyncClient,
    params: dict[str, str] | None = None,
    decision: str = "allow",
    user_id: int = USER_ID,
) -> dict[str, list[str]]:
    """Walk the consent page like a browser; return the query the app is redirected with."""
    page = await client.get("/authorization", params=params or auth_params())
    assert page.status_code == 200, page.text
    form = read_form(page.text)
    reply = await client.post(
        form.action or "", data={**form.fields, "user_id": str(user_id), "decision": decision}
    )
    assert reply.status_code == 302
    return parse_qs(urlsplit(reply.headers["location"]).query, keep_blank_values=True)


async def get_code(client: httpx.AsyncClient, **overrides: str | None) -> str:
    return (await authorize(client, auth_params(**overrides)))["code"][0]


async def post_token(
    client: httpx.AsyncClient, params: dict[str, Any], as_json: bool = False
) -> httpx.Response:
    if as_json:
        return await client.post("/oauth/token", json=params)
    return await client.post("/oauth/token", data=params)


async def exchange(client: httpx.AsyncClient, code: str, **overrides: Any) -> httpx.Response:
    params = {
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": VERIFIER,
    }
    params.update(overrides)
    return await post_token(client, {k: v for k, v in params.items() if v is not None})


async def refresh(
    client: httpx.AsyncClient, refresh_token: str, as_json: bool = False
) -> httpx.Response:
    return await post_token(
        client,
        {
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
        },
        as_json=as_json,
    )


async def linked_seller(client: httpx.AsyncClient) -> dict[str, Any]:
    reply = await exchange(client, await get_code(client))
    assert reply.status_code == 200
    tokens: dict[str, Any] = reply.json()
    return tokens


async def me(client: httpx.AsyncClient, access_token: str) -> httpx.Response:
    return await client.get("/users/me", headers={"Authorization": f"Bearer {access_token}"})


async def set_faults(client: httpx.AsyncClient, **plan: Any) -> None:
    reply = await client.post("/_control/faults", json=plan)
    assert reply.status_code == 200, reply.text


async def log(client: httpx.AsyncClient) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = (await client.get("/_control/log")).json()
    return entries


async def wait_for_last_outcome(client: httpx.AsyncClient, outcome: str) -> None:
    for _ in range(200):
        entries = await log(client)
        if entries and entries[-1]["outcome"] == outcome:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"no request reached {outcome!r}")


def assert_opaque(token: str) -> None:
    assert OPAQUE_TOKEN.fullmatch(token), token
    assert not USER_ID_TAIL.search(token), token


def assert_mp_error(reply: httpx.Response, code: str, status: int = 400) -> None:
    assert reply.status_code == status
    assert reply.json() == {
        "message": reply.json()["message"],
        "error": code,
        "status": status,
        "cause": [],
    }


# -- authorization page -------------------------------------------------------------------


async def test_consent_page_renders_a_form_that_posts_the_request_back(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get("/authorization", params=auth_params())

    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "wants to access your Mercado Pago account" in page.text
    assert 'name="decision" value="allow"' in page.text
    assert 'name="decision" value="deny"' in page.text
    form = read_form(page.text)
    assert form.action == "/authorization/decision"
    assert form.fields == {**auth_params(), "user_id": str(USER_ID)}


async def test_consent_page_escapes_everything_it_echoes(client: httpx.AsyncClient) -> None:
    state = '"><script>alert(1)</script>'
    page = await client.get("/authorization", params=auth_params(state=state))

    assert "<script>" not in page.text
    assert "Loja &lt;Teste&gt; &amp; Cia" in page.text
    assert read_form(page.text).fields["state"] == state


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"client_id": "999"}, id="unknown client"),
        pytest.param({"response_type": "token"}, id="wrong response_type"),
        pytest.param({"redirect_uri": REDIRECT + "/"}, id="redirect_uri not exact"),
        pytest.param({"redirect_uri": None}, id="no redirect_uri"),
        pytest.param({"code_challenge": None}, id="pkce app without challenge"),
        pytest.param({"code_challenge_method": "s256"}, id="method is case sensitive"),
        pytest.param({"code_challenge_method": None}, id="challenge without method"),
        pytest.param({"code_challenge": "short"}, id="malformed challenge"),
    ],
)
async def test_bad_authorization_request_shows_an_error_page_and_never_redirects(
    client: httpx.AsyncClient, overrides: dict[str, str | None]
) -> None:
    page = await client.get("/authorization", params=auth_params(**overrides))

    assert page.status_code == 400
    assert "location" not in page.headers
    assert "<form" not in page.text


@pytest.mark.parametrize("method", ["S256", "plain", "Plain"])
async def test_pkce_methods_s256_and_plain_are_accepted(
    client: httpx.AsyncClient, method: str
) -> None:
    page = await client.get("/authorization", params=auth_params(code_challenge_method=method))

    assert page.status_code == 200


async def test_allowing_redirects_with_a_code_and_the_same_state(client: httpx.AsyncClient) -> None:
    page = await client.get("/authorization", params=auth_params(state="a b&c=d"))
    form = read_form(page.text)
    reply = await client.post(form.action or "", data={**form.fields, "decision": "allow"})

    assert reply.status_code == 302
    location = urlsplit(reply.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT
    query = parse_qs(location.query)
    assert query["state"] == ["a b&c=d"]
    assert query["code"][0]


async def test_absent_state_is_omitted_and_an_existing_query_is_kept(
    client: httpx.AsyncClient,
) -> None:
    page = await client.get(
        "/authorization",
        params=auth_params(
            client_id=OTHER_ID,
            redirect_uri=OTHER_REDIRECT,
            state=None,
            code_challenge=None,
            code_challenge_method=None,
        ),
    )
    form = read_form(page.text)
    reply = await client.post(form.action or "", data={**form.fields, "decision": "allow"})

    location = reply.headers["location"]
    assert location.startswith(OTHER_REDIRECT + "&code=")
    assert "state" not in parse_qs(urlsplit(location).query)


async def test_decision_validates_the_hidden_fields_again(client: httpx.AsyncClient) -> None:
    form = read_form((await client.get("/authorization", params=auth_params())).text)
    tampered = {**form.fields, "redirect_uri": "https://evil.example/cb", "decision": "allow"}

    reply = await client.post("/authorization/decision", data=tampered)

    assert reply.status_code == 400
    assert "location" not in reply.headers


async def test_decision_refuses_a_user_id_that_is_not_a_number(client: httpx.AsyncClient) -> None:
    form = read_form((await client.get("/authorization", params=auth_params())).text)
    data = {**form.fields, "user_id": "12abc", "decision": "allow"}

    reply = await client.post("/authorization/decision", data=data)

    assert reply.status_code == 400


async def test_denying_redirects_with_access_denied_and_the_state(
    client: httpx.AsyncClient,
) -> None:
    query = await authorize(client, decision="deny")

    assert query["error"] == ["access_denied"]
    assert query["error_description"][0]
    assert query["state"] == ["st-123"]
    assert "code" not in query


# -- code exchange ----------------------------------------------------------------------------


async def test_code_exchange_returns_mercado_pago_token_json(client: httpx.AsyncClient) -> None:
    reply = await exchange(client, await get_code(client))

    assert reply.status_code == 200
    body = reply.json()
    assert set(body) == {
        "access_token",
        "token_type",
        "expires_in",
        "scope",
        "user_id",
        "refresh_token",
        "public_key",
        "live_mode",
    }
    assert ACCESS_TOKEN.fullmatch(body["access_token"])
    assert REFRESH_TOKEN.fullmatch(body["refresh_token"])
    assert PUBLIC_KEY.fullmatch(body["public_key"])
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 15552000
    assert body["scope"] == "offline_access read write"
    assert body["user_id"] == USER_ID
    assert body["live_mode"] is True


async def test_code_exchange_accepts_a_json_body_and_the_user_chosen_on_the_page(
    client: httpx.AsyncClient,
) -> None:
    code = (await authorize(client, user_id=55501))["code"][0]
    params = {
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": VERIFIER,
    }

    reply = await post_token(client, params, as_json=True)

    assert reply.status_code == 200
    assert reply.json()["user_id"] == 55501
    assert (await log(client))[-1]["content_type"] == "json"


@pytest.mark.parametrize("as_json", [True, False])
async def test_test_token_gives_sandbox_credentials(
    client: httpx.AsyncClient, as_json: bool
) -> None:
    code = await get_code(client)
    params = {
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "grant_type": "authorization_code",
        "code": code,
        "redirect_uri": REDIRECT,
        "code_verifier": VERIFIER,
        "test_token": True if as_json else "true",
    }

    body = (await post_token(client, params, as_json=as_json)).json()

    assert body["access_token"].startswith(f"TEST-{CLIENT_ID}-")
    assert body["live_mode"] is False
    assert (await log(client))[-1]["test_token"] is True


async def test_public_key_is_stable_for_the_same_seller_and_app(client: httpx.AsyncClient) -> None:
    first = await linked_seller(client)
    second = await linked_seller(client)

    assert first["public_key"] == second["public_key"]
    assert first["access_token"] != second["access_token"]


async def test_a_reused_code_is_an_invalid_grant(client: httpx.AsyncClient) -> None:
    code = await get_code(client)
    first = await exchange(client, code)

    second = await exchange(client, code)

    assert first.status_code == 200
    assert_mp_error(second, "invalid_grant")
    assert (await me(client, first.json()["access_token"])).status_code == 200


async def test_a_code_older_than_ten_minutes_is_an_invalid_grant(
    client: httpx.AsyncClient,
) -> None:
    code = await get_code(client)
    await client.post("/_control/clock", json={"advance_seconds": 601})

    assert_mp_error(await exchange(client, code), "invalid_grant")


async def test_the_injected_clock_ages_codes_too(
    client: httpx.AsyncClient, clock: FakeClock
) -> None:
    fresh, stale = await get_code(client), await get_code(client)
    clock.now += 599
    assert (await exchange(client, fresh)).status_code == 200
    clock.now += 2

    assert_mp_error(await exchange(client, stale), "invalid_grant")


async def test_a_different_redirect_uri_is_an_invalid_grant(client: httpx.AsyncClient) -> None:
    code = await get_code(client)

    reply = await exchange(client, code, redirect_uri=REDIRECT + "?x=1")

    assert_mp_error(reply, "invalid_grant")


@pytest.mark.parametrize(
    "verifier",
    [
        pytest.param("x" * 43, id="wrong verifier"),
        pytest.param(None, id="missing verifier"),
        pytest.param(CHALLENGE, id="challenge sent as verifier"),
    ],
)
async def test_a_verifier_that_does_not_match_is_an_invalid_grant(
    client: httpx.AsyncClient, verifier: str | None
) -> None:
    code = await get_code(client)

    assert_mp_error(await exchange(client, code, code_verifier=verifier), "invalid_grant")


async def test_a_failed_exchange_burns_the_code(client: httpx.AsyncClient) -> None:
    code = await get_code(client)
    await exchange(client, code, code_verifier="x" * 43)

    assert_mp_error(await exchange(client, code), "invalid_grant")


async def test_plain_pkce_compares_the_verifier_itself(client: httpx.AsyncClient) -> None:
    code = await get_code(client, code_challenge=VERIFIER, code_challenge_method="plain")

    assert (await exchange(client, code, code_verifier=VERIFIER)).status_code == 200


async def test_a_verifier_for_a_code_without_pkce_is_an_invalid_grant(
    client: httpx.AsyncClient,
) -> None:
    overrides: dict[str, str | None] = {
        "client_id": OTHER_ID,
        "redirect_uri": OTHER_REDIRECT,
        "code_challenge": None,
        "code_challenge_method": None,
    }
    code, other_code = await get_code(client, **overrides), await get_code(client, **overrides)
    other = {"client_id": OTHER_ID, "client_secret": OTHER_SECRET, "redirect_uri": OTHER_REDIRECT}

    with_verifier = await exchange(client, code, **other)
    without_verifier = await exchange(client, other_code, **other, code_verifier=None)

    assert_mp_error(with_verifier, "invalid_grant")
    assert without_verifier.status_code == 200


async def test_a_code_issued_to_another_app_is_an_invalid_grant(
    client: httpx.AsyncClient,
) -> None:
    code = await get_code(client)

    reply = await exchange(
        client, code, client_id=OTHER_ID, client_secret=OTHER_SECRET, redirect_uri=OTHER_REDIRECT
    )

    assert_mp_error(reply, "invalid_grant")
    assert (await exchange(client, code)).status_code == 200


async def test_each_app_keeps_its_own_pkce_rule_and_its_own_secret(
    client: httpx.AsyncClient,
) -> None:
    # make_config's two apps: CLIENT_ID has PKCE enabled, OTHER_ID does not.
    no_challenge: dict[str, str | None] = {"code_challenge": None, "code_challenge_method": None}
    other_app = {"client_id": OTHER_ID, "redirect_uri": OTHER_REDIRECT}

    refused = await client.get("/authorization", params=auth_params(**no_challenge))
    other_code = (await authorize(client, auth_params(**other_app, **no_challenge)))["code"][0]
    pkce_code = await get_code(client)
    crossed = [
        await exchange(client, pkce_code, client_secret=OTHER_SECRET),
        await exchange(client, other_code, **other_app, client_secret=SECRET, code_verifier=None),
    ]

    assert refused.status_code == 400
    assert "requires PKCE" in refused.text
    assert "<form" not in refused.text
    for reply in crossed:
        assert_mp_error(reply, "invalid_client")
    # The wrong secret was refused before the code was looked at: both codes still work.
    mine = await exchange(client, pkce_code)
    other = await exchange(
        client, other_code, **other_app, client_secret=OTHER_SECRET, code_verifier=None
    )
    assert (mine.status_code, other.status_code) == (200, 200)
    for client_id, secret, tokens in [
        (CLIENT_ID, OTHER_SECRET, mine.json()),
        (OTHER_ID, SECRET, other.json()),
    ]:
        params = {"client_id": client_id, "client_secret": secret}
        params |= {"grant_type": "refresh_token", "refresh_token": tokens["refresh_token"]}
        assert_mp_error(await post_token(client, params), "invalid_client")


@pytest.mark.parametrize(
    ("client_id", "secret"), [(CLIENT_ID, "wrong"), ("999", SECRET), (CLIENT_ID, None)]
)
async def test_bad_client_credentials_are_invalid_client(
    client: httpx.AsyncClient, client_id: str, secret: str | None
) -> None:
    code = await get_code(client)

    reply = await exchange(client, code, client_id=client_id, client_secret=secret)

    assert_mp_error(reply, "invalid_client")


async def test_invalid_client_can_be_switched_to_401(client: httpx.AsyncClient) -> None:
    await set_faults(client, invalid_client_status=401)

    reply = await exchange(client, "any", client_secret="wrong")

    assert_mp_error(reply, "invalid_client", status=401)


async def test_an_unknown_grant_type_is_unsupported(client: httpx.AsyncClient) -> None:
    reply = await exchange(client, "any", grant_type="client_credentials")

    assert_mp_error(reply, "unsupported_grant_type")


async def test_a_malformed_json_body_is_an_invalid_request(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        "/oauth/token", content=b"{not json", headers={"content-type": "application/json"}
    )

    assert_mp_error(reply, "invalid_request")


# -- refresh, revocation, /users/me -----------------------------------------------------------


async def test_users_me_names_the_seller_behind_an_access_token(
    client: httpx.AsyncClient,
) -> None:
    tokens = await linked_seller(client)

    reply = await me(client, tokens["access_token"])

    assert reply.status_code == 200
    assert reply.json()["id"] == USER_ID
    assert reply.json()["site_id"] == "MLA"


async def test_users_me_refuses_an_unknown_token(client: httpx.AsyncClient) -> None:
    reply = await me(client, "APP_USR-nope")

    assert reply.status_code == 401
    assert reply.json() == {
        "message": "invalid_token",
        "error": "unauthorized",
        "status": 401,
        "cause": [],
    }


async def test_an_access_token_stops_working_after_expires_in(client: httpx.AsyncClient) -> None:
    tokens = await linked_seller(client)
    await client.post("/_control/clock", json={"advance_seconds": tokens["expires_in"]})

    assert (await me(client, tokens["access_token"])).status_code == 401


@pytest.mark.parametrize("as_json", [False, True])
async def test_refresh_rotates_and_the_old_refresh_token_dies(
    client: httpx.AsyncClient, as_json: bool
) -> None:
    first = await linked_seller(client)

    second = await refresh(client, first["refresh_token"], as_json)
    replay = await refresh(client, first["refresh_token"], as_json)
    third = await refresh(client, second.json()["refresh_token"], as_json)

    assert second.status_code == 200
    assert second.json()["refresh_token"] != first["refresh_token"]
    assert second.json()["access_token"] != first["access_token"]
    assert ACCESS_TOKEN.fullmatch(second.json()["access_token"])
    assert_mp_error(replay, "invalid_grant")
    assert third.status_code == 200
    # Like Mercado Pago, the previous access token lives until its own expiry.
    assert (await me(client, first["access_token"])).status_code == 200
    sent = [e["content_type"] for e in await log(client) if e["grant_type"] == "refresh_token"]
    assert sent == ["json" if as_json else "form"] * 3


async def test_a_refresh_token_of_another_app_is_an_invalid_grant(
    client: httpx.AsyncClient,
) -> None:
    tokens = await linked_seller(client)

    reply = await post_token(
        client,
        {
            "client_id": OTHER_ID,
            "client_secret": OTHER_SECRET,
            "grant_type": "refresh_token",
            "refresh_token": tokens["refresh_token"],
        },
    )

    assert_mp_error(reply, "invalid_grant")


async def test_revoking_a_seller_kills_refresh_and_access_tokens(
    client: httpx.AsyncClient,
) -> None:
    tokens = await linked_seller(client)

    revoked = await client.post("/_control/revoke", json={"user_id": USER_ID})

    assert revoked.json() == {"revoked_grants": 1}
    assert_mp_error(await refresh(client, tokens["refresh_token"]), "invalid_grant")
    assert (await me(client, tokens["access_token"])).status_code == 401


# -- faults ------------------------------------------------------------------------------------


async def test_status_fault_answers_without_processing_until_count_runs_out(
    client: httpx.AsyncClient,
) -> None:
    tokens = await linked_seller(client)
    await set_faults(client, status=500, count=2)

    first = await refresh(client, tokens["refresh_token"])
    second = await refresh(client, tokens["refresh_token"])
    third = await refresh(client, tokens["refresh_token"])

    assert_mp_error(first, "internal_server_error", status=500)
    assert second.status_code == 500
    assert third.status_code == 200
    outcomes = [entry["outcome"] for entry in await log(client)]
    assert outcomes == ["ok", "fault:500", "fault:500", "ok"]


async def test_rate_limit_fault_answers_429_local_rate_limited(client: httpx.AsyncClient) -> None:
    tokens = await linked_seller(client)
    await set_faults(client, rate_limited=True, count=1)

    limited = await refresh(client, tokens["refresh_token"])

    assert limited.status_code == 429
    assert limited.json() == {
        "message": "local_rate_limited",
        "error": "local_rate_limited",
        "status": 429,
        "cause": [],
    }
    assert (await refresh(client, tokens["refresh_token"])).status_code == 200


async def test_error_field_can_be_named_error_key(client: httpx.AsyncClient) -> None:
    await set_faults(client, error_field="errorKey")

    body = (await exchange(client, "unknown-code")).json()

    assert body["errorKey"] == "invalid_grant"
    assert "error" not in body


async def test_refresh_reply_can_be_minimal_with_capitalised_token_type(
    client: httpx.AsyncClient,
) -> None:
    tokens = await linked_seller(client)
    await set_faults(client, minimal_refresh_reply=True, token_type="Bearer")

    body = (await refresh(client, tokens["refresh_token"])).json()

    assert set(body) == {"access_token", "token_type", "expires_in", "scope", "refresh_token"}
    assert body["token_type"] == "Bearer"


async def test_latency_keeps_a_token_request_pending(client: httpx.AsyncClient) -> None:
    tokens = await linked_seller(client)
    await set_faults(client, latency_ms=60_000)

    with pytest.raises(TimeoutError):
        await asyncio.wait_for(refresh(client, tokens["refresh_token"]), timeout=0.05)

    assert (await log(client))[-1]["outcome"] == "pending"
    await set_faults(client, latency_ms=1)
    assert (await refresh(client, tokens["refresh_token"])).status_code == 200


async def test_hold_rotates_first_and_answers_only_after_release(
    client: httpx.AsyncClient,
) -> None:
    tokens = await linked_seller(client)
    before = (await client.get("/_control/grants")).json()[str(USER_ID)]
    await set_faults(client, after_rotate="hold", count=1)

    pending = asyncio.create_task(refresh(client, tokens["refresh_token"]))
    await wait_for_last_outcome(client, "held")
    during = (await client.get("/_control/grants")).json()[str(USER_ID)]
    assert not pending.done()
    released = await client.post("/_control/release")
    reply = await pending

    assert released.json() == {"released": 1}
    assert during["refreshes"] == before["refreshes"] + 1
    assert during["refresh_token_fingerprint"] != before["refresh_token_fingerprint"]
    assert reply.status_code == 200
    assert (await log(client))[-1]["outcome"] == "ok"
    assert (await log(client))[-1]["user_id"] == USER_ID


async def test_drop_rotates_the_grant_but_the_client_never_gets_the_tokens(
    client: httpx.AsyncClient,
) -> None:
    tokens = await linked_seller(client)
    await set_faults(client, after_rotate="drop", count=1)

    dropped = await refresh(client, tokens["refresh_token"])
    retry = await refresh(client, tokens["refresh_token"])

    assert dropped.status_code == 502
    assert dropped.headers["content-type"].startswith("text/html")
    assert_mp_error(retry, "invalid_grant")
    grants = (await client.get("/_control/grants")).json()[str(USER_ID)]
    assert grants["refreshes"] == 1
    assert [entry["outcome"] for entry in await log(client)][-2:] == ["fault:drop", "invalid_grant"]


async def test_reset_forgets_grants_faults_and_log(client: httpx.AsyncClient) -> None:
    tokens = await linked_seller(client)
    await set_faults(client, status=503)

    await client.post("/_control/reset")

    assert await log(client) == []
    assert (await client.get("/_control/grants")).json() == {}
    assert_mp_error(await refresh(client, tokens["refresh_token"]), "invalid_grant")


async def test_fault_plan_refuses_unknown_fields(client: httpx.AsyncClient) -> None:
    reply = await client.post("/_control/faults", json={"stauts": 500})

    assert reply.status_code == 422


@pytest.mark.parametrize(
    ("status", "error"), [(400, "invalid_client"), (401, "invalid_client"), (400, "invalid_grant")]
)
async def test_status_fault_can_carry_a_chosen_mercado_pago_error_code(
    client: httpx.AsyncClient, status: int, error: str
) -> None:
    tokens = await linked_seller(client)
    await set_faults(client, status=status, error=error, count=1)

    faulted = await refresh(client, tokens["refresh_token"])

    assert_mp_error(faulted, error, status=status)
    assert (await log(client))[-1]["outcome"] == f"fault:{status}"
    assert (await refresh(client, tokens["refresh_token"])).status_code == 200


async def test_a_chosen_fault_error_code_goes_under_error_key_when_asked(
    client: httpx.AsyncClient,
) -> None:
    await set_faults(client, status=400, error="invalid_grant", error_field="errorKey")

    body = (await exchange(client, "any")).json()

    assert body["errorKey"] == "invalid_grant"
    assert "error" not in body


async def test_fault_plan_refuses_an_error_code_without_a_status(
    client: httpx.AsyncClient,
) -> None:
    reply = await client.post("/_control/faults", json={"error": "invalid_grant"})

    assert reply.status_code == 422


async def test_omitting_the_refresh_token_issues_access_tokens_and_keeps_it_valid(
    client: httpx.AsyncClient,
) -> None:
    tokens = await linked_seller(client)
    before = (await client.get("/_control/grants")).json()[str(USER_ID)]
    # count only limits status, rate_limited and after_rotate faults: both refreshes omit.
    await set_faults(client, omit_refresh_token=True, count=1)

    first = await refresh(client, tokens["refresh_token"])
    second = await refresh(client, tokens["refresh_token"])

    for reply in (first, second):
        assert reply.status_code == 200
        assert "refresh_token" not in reply.json()
        assert ACCESS_TOKEN.fullmatch(reply.json()["access_token"])
        assert (await me(client, reply.json()["access_token"])).status_code == 200
    assert first.json()["access_token"] != second.json()["access_token"]
    after = (await client.get("/_control/grants")).json()[str(USER_ID)]
    assert after["refresh_token_fingerprint"] == before["refresh_token_fingerprint"]
    assert after["refreshes"] == 2
    await set_faults(client)
    rotated = await refresh(client, tokens["refresh_token"])
    assert REFRESH_TOKEN.fullmatch(rotated.json()["refresh_token"])
    assert_mp_error(await refresh(client, tokens["refresh_token"]), "invalid_grant")


async def test_omitting_the_refresh_token_leaves_code_exchanges_alone(
    client: httpx.AsyncClient,
) -> None:
    await set_faults(client, omit_refresh_token=True)

    tokens = await linked_seller(client)

    assert REFRESH_TOKEN.fullmatch(tokens["refresh_token"])


async def test_a_minimal_refresh_reply_can_omit_the_refresh_token_too(
    client: httpx.AsyncClient,
) -> None:
    tokens = await linked_seller(client)
    await set_faults(client, omit_refresh_token=True, minimal_refresh_reply=True)

    body = (await refresh(client, tokens["refresh_token"])).json()

    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}


async def test_plain_reply_answers_exchanges_and_refreshes_like_rfc_6749(
    client: httpx.AsyncClient,
) -> None:
    await set_faults(client, plain_reply=True)

    exchanged = await linked_seller(client)
    refreshed = (await refresh(client, exchanged["refresh_token"])).json()

    for body in (exchanged, refreshed):
        assert set(body) == PLAIN_FIELDS
        assert body["token_type"] == "bearer"
        assert body["expires_in"] == 15552000
        assert body["scope"] == "offline_access read write"
        assert_opaque(body["access_token"])
        assert_opaque(body["refresh_token"])
        assert str(USER_ID) not in body["access_token"] + body["refresh_token"]
        # The broker finds the account through /users/me instead.
        assert (await me(client, body["access_token"])).json()["id"] == USER_ID
    assert refreshed["access_token"] != exchanged["access_token"]
    assert_mp_error(await refresh(client, exchanged["refresh_token"]), "invalid_grant")


async def test_plain_reply_applies_to_issue_too(client: httpx.AsyncClient) -> None:
    await set_faults(client, plain_reply=True)

    reply = await client.post(
        "/_control/issue", json={"client_id": CLIENT_ID, "user_id": 99, "test": True}
    )

    body = reply.json()
    assert reply.status_code == 200
    assert set(body) == PLAIN_FIELDS
    assert_opaque(body["access_token"])  # not even the TEST- prefix
    assert (await me(client, body["access_token"])).json()["id"] == 99


async def test_plain_reply_is_decided_when_tokens_are_issued(client: httpx.AsyncClient) -> None:
    before = await linked_seller(client)
    await set_faults(client, plain_reply=True)
    plain = await linked_seller(client)
    await set_faults(client)

    refreshed = (await refresh(client, plain["refresh_token"])).json()

    assert ACCESS_TOKEN.fullmatch(before["access_token"])
    assert_opaque(plain["access_token"])
    assert (await me(client, plain["access_token"])).json()["id"] == USER_ID
    assert refreshed["user_id"] == USER_ID
    assert ACCESS_TOKEN.fullmatch(refreshed["access_token"])
    assert REFRESH_TOKEN.fullmatch(refreshed["refresh_token"])


async def test_a_held_plain_reply_keeps_its_shape_after_the_plan_changes(
    client: httpx.AsyncClient,
) -> None:
    tokens = await linked_seller(client)
    await set_faults(client, plain_reply=True, after_rotate="hold", count=1)
    pending = asyncio.create_task(refresh(client, tokens["refresh_token"]))
    await wait_for_last_outcome(client, "held")

    await set_faults(client)
    await client.post("/_control/release")
    body = (await pending).json()

    assert set(body) == PLAIN_FIELDS
    assert_opaque(body["access_token"])


def test_opaque_tokens_never_end_in_a_dash_and_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = iter(["tail-241983636", "x-0", "Opaque_token-x"])
    sizes: list[int | None] = []

    def token_urlsafe(nbytes: int | None = None) -> str:
        sizes.append(nbytes)
        return next(drawn)

    monkeypatch.setattr("service.simulator.state.secrets.token_urlsafe", token_urlsafe)

    assert state.opaque_token() == "Opaque_token-x"
    assert sizes == [32, 32, 32]


@pytest.mark.parametrize(
    ("status", "error"),
    [(401, "unauthorized"), (429, "too_many_requests"), (503, "service_unavailable")],
)
async def test_users_me_status_fails_users_me_for_any_token_until_replaced(
    client: httpx.AsyncClient, status: int, error: str
) -> None:
    tokens = await linked_seller(client)
    # count=0 turns /oauth/token faults off; it does not limit users_me_status.
    await set_faults(client, users_me_status=status, count=0)

    replies = [await me(client, tokens["access_token"]) for _ in range(3)]
    replies.append(await me(client, "APP_USR-nope"))
    refreshed = await refresh(client, tokens["refresh_token"])

    for reply in replies:
        assert reply.status_code == status
        assert reply.json() == {
            "message": "upstream failure",
            "error": error,
            "status": status,
            "cause": [],
        }
    assert refreshed.status_code == 200
    await set_faults(client)
    assert (await me(client, refreshed.json()["access_token"])).json()["id"] == USER_ID


@pytest.mark.parametrize("status", [200, 399, 600])
async def test_users_me_status_must_be_an_error_status(
    client: httpx.AsyncClient, status: int
) -> None:
    reply = await client.post("/_control/faults", json={"users_me_status": status})

    assert reply.status_code == 422


# -- control API observability ----------------------------------------------------------------


async def test_log_records_each_token_request_without_secrets(client: httpx.AsyncClient) -> None:
    code = await get_code(client)
    tokens = (await exchange(client, code)).json()
    refreshed = (await refresh(client, tokens["refresh_token"])).json()

    entries = await log(client)
    arrived = [entry.pop("at") for entry in entries]
    assert arrived == sorted(arrived)  # when each arrived, in order

    assert entries == [
        {
            "grant_type": "authorization_code",
            "client_id": CLIENT_ID,
            "has_code_verifier": True,
            "test_token": False,
            "content_type": "form",
            "outcome": "ok",
            "user_id": USER_ID,
        },
        {
            "grant_type": "refresh_token",
            "client_id": CLIENT_ID,
            "has_code_verifier": False,
            "test_token": False,
            "content_type": "form",
            "outcome": "ok",
            "user_id": USER_ID,
        },
    ]
    observed = json.dumps(entries) + (await client.get("/_control/grants")).text
    secrets = [SECRET, VERIFIER, code]
    secrets += [tokens["access_token"], tokens["refresh_token"]]
    secrets += [refreshed["access_token"], refreshed["refresh_token"]]
    for secret in secrets:
        assert secret not in observed


async def test_log_names_the_seller_only_of_successful_token_requests(
    client: httpx.AsyncClient,
) -> None:
    code = (await authorize(client, user_id=55501))["code"][0]
    tokens = (await exchange(client, code)).json()
    issue = {"client_id": CLIENT_ID, "user_id": 99}
    issued = (await client.post("/_control/issue", json=issue)).json()

    await refresh(client, issued["refresh_token"])
    await refresh(client, issued["refresh_token"])  # already rotated
    await set_faults(client, status=500, count=1)
    await refresh(client, tokens["refresh_token"])
    await set_faults(client, after_rotate="drop", count=1)
    await refresh(client, tokens["refresh_token"])

    assert [(entry["outcome"], entry["user_id"]) for entry in await log(client)] == [
        ("ok", 55501),
        ("ok", 99),
        ("invalid_grant", None),
        ("fault:500", None),
        ("fault:drop", None),
    ]


async def test_grants_name_the_app_holding_the_newest_live_grant(
    client: httpx.AsyncClient,
) -> None:
    async def issue(client_id: str, user_id: int) -> dict[str, Any]:
        reply = await client.post(
            "/_control/issue", json={"client_id": client_id, "user_id": user_id}
        )
        body: dict[str, Any] = reply.json()
        return body

    await issue(OTHER_ID, 5)
    newest = await issue(CLIENT_ID, 5)
    only = await issue(OTHER_ID, 6)
    await issue(CLIENT_ID, 7)
    await client.post("/_control/revoke", json={"user_id": 7})

    grants = (await client.get("/_control/grants")).json()

    assert grants["5"]["client_id"] == CLIENT_ID
    assert grants["5"]["refresh_token_fingerprint"] == fingerprint(newest["refresh_token"])
    assert grants["6"]["client_id"] == OTHER_ID
    assert grants["6"]["refresh_token_fingerprint"] == fingerprint(only["refresh_token"])
    assert grants["7"] == {
        "grants": 1,
        "active_grants": 0,
        "refreshes": 0,
        "refresh_token_fingerprint": None,
        "client_id": None,
    }


async def test_issue_seeds_a_linked_seller_without_a_browser(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        "/_control/issue", json={"client_id": CLIENT_ID, "user_id": 99, "test": True}
    )

    body = reply.json()
    assert reply.status_code == 200
    assert body["user_id"] == 99
    assert body["access_token"].startswith(f"TEST-{CLIENT_ID}-")
    assert (await me(client, body["access_token"])).json()["id"] == 99
    assert (await refresh(client, body["refresh_token"])).status_code == 200
    assert (await client.get("/_control/grants")).json()["99"]["refreshes"] == 1
    assert len(await log(client)) == 1  # the refresh; issuing itself is not a token request


async def test_issue_refuses_an_unknown_client(client: httpx.AsyncClient) -> None:
    reply = await client.post("/_control/issue", json={"client_id": "999", "user_id": 1})

    assert reply.status_code == 404


# -- control API configuration ----------------------------------------------------------------


async def set_expires_in(client: httpx.AsyncClient, expires_in: int) -> None:
    reply = await client.post("/_control/config", json={"expires_in": expires_in})
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"expires_in": expires_in}


async def test_config_sets_the_lifetime_of_tokens_issued_from_then_on(
    client: httpx.AsyncClient,
) -> None:
    earlier = await linked_seller(client)
    await set_expires_in(client, 3600)

    exchanged = await linked_seller(client)
    refreshed = (await refresh(client, exchanged["refresh_token"])).json()
    issue = {"client_id": CLIENT_ID, "user_id": 99}
    issued = (await client.post("/_control/issue", json=issue)).json()
    await client.post("/_control/clock", json={"advance_seconds": 3600})

    assert earlier["expires_in"] == 15552000
    for tokens in (exchanged, refreshed, issued):
        assert tokens["expires_in"] == 3600
        assert (await me(client, tokens["access_token"])).status_code == 401
    assert (await me(client, earlier["access_token"])).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"expires_in": 0}, id="zero"),
        pytest.param({"expires_in": -1}, id="negative"),
        pytest.param({}, id="missing"),
        pytest.param({"expires_in": 60, "expires": 60}, id="unknown field"),
    ],
)
async def test_config_refuses_bad_lifetimes_and_unknown_fields(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    reply = await client.post("/_control/config", json=body)

    assert reply.status_code == 422


async def test_reset_restores_the_configured_token_lifetime(client: httpx.AsyncClient) -> None:
    await set_expires_in(client, 60)

    await client.post("/_control/reset")

    assert (await linked_seller(client))["expires_in"] == 15552000


# -- the payments API ------------------------------------------------------------------------


async def _issued_token(client: httpx.AsyncClient, user_id: int) -> str:
    issue = {"client_id": CLIENT_ID, "user_id": user_id}
    access_token: str = (await client.post("/_control/issue", json=issue)).json()["access_token"]
    return access_token


async def test_payments_need_a_live_bearer_token_and_act_for_its_seller_only(
    client: httpx.AsyncClient,
) -> None:
    mine, other = await _issued_token(client, USER_ID), await _issued_token(client, 99)
    as_me, as_other = {"Authorization": f"Bearer {mine}"}, {"Authorization": f"Bearer {other}"}
    created = await client.post(
        "/v1/payments",
        json={"transaction_amount": 10.5, "description": "tea"},
        headers={**as_me, "X-Idempotency-Key": "k-1"},
    )
    assert created.status_code == 201, created.text
    payment = created.json()
    assert (payment["collector_id"], payment["status"]) == (USER_ID, "approved")
    assert (await client.get(f"/v1/payments/{payment['id']}", headers=as_me)).status_code == 200
    assert (await client.get(f"/v1/payments/{payment['id']}", headers=as_other)).status_code == 404
    search = (await client.get("/v1/payments/search", headers=as_other)).json()
    assert search["results"] == []
    mine_found = (await client.get("/v1/payments/search", headers=as_me)).json()["results"]
    assert [p["id"] for p in mine_found] == [payment["id"]]
    for headers in ({}, {"Authorization": "Bearer APP_USR-unknown"}):
        refused = await client.get("/v1/payments/search", headers=headers)
        assert refused.status_code == 401
        assert refused.json()["error"] == "unauthorized"
    await client.post("/_control/revoke", json={"user_id": USER_ID})
    assert (await client.get("/v1/payments/search", headers=as_me)).status_code == 401
    log = (await client.get("/_control/api-log")).json()
    assert [(c["method"], c["status"]) for c in log][:2] == [("POST", 201), ("GET", 200)]
    assert all(mine not in json.dumps(call) for call in log)


async def test_a_payment_is_created_once_per_idempotency_key(client: httpx.AsyncClient) -> None:
    headers = {"Authorization": f"Bearer {await _issued_token(client, USER_ID)}"}
    body = {"transaction_amount": 3}
    missing = await client.post("/v1/payments", json=body, headers=headers)
    assert missing.status_code == 400
    first = await client.post(
        "/v1/payments", json=body, headers={**headers, "X-Idempotency-Key": "a"}
    )
    again = await client.post(
        "/v1/payments", json=body, headers={**headers, "X-Idempotency-Key": "a"}
    )
    other = await client.post(
        "/v1/payments", json=body, headers={**headers, "X-Idempotency-Key": "b"}
    )
    assert first.json() == again.json()
    assert other.json()["id"] != first.json()["id"]
    cancelled = await client.put(
        f"/v1/payments/{first.json()['id']}", json={"status": "cancelled"}, headers=headers
    )
    assert cancelled.json()["status"] == "cancelled"
    assert (await client.delete("/v1/payments/1", headers=headers)).status_code == 404
    assert [c["method"] for c in (await client.get("/_control/api-log")).json()][-2:] == [
        "PUT",
        "DELETE",
    ]


async def test_api_faults_delay_or_fail_every_payments_call(client: httpx.AsyncClient) -> None:
    headers = {"Authorization": f"Bearer {await _issued_token(client, USER_ID)}"}
    await client.post("/_control/faults", json={"api_status": 503})
    failed = await client.get("/v1/payments/search", headers=headers)
    assert (failed.status_code, failed.json()["status"]) == (503, 503)
    await client.post("/_control/faults", json={"api_latency_ms": 200})
    started = asyncio.get_running_loop().time()
    assert (await client.get("/v1/payments/search", headers=headers)).status_code == 200
    assert asyncio.get_running_loop().time() - started >= 0.2
