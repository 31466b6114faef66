"""The upstream client against a stubbed HTTP peer (narrow unit tests; the real peer is the
simulator in the flow tests)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

import httpx
import pytest

from service.core.config import Settings
from service.core.mercadopago import (
    ApplicationError,
    MercadoPagoClient,
    OAuthApp,
    PermanentGrantError,
    TokenCheck,
    TransientUpstreamError,
    classify_error,
    parse_token_reply,
)
from service.core.runtime import Upstream, utcnow
from tests.support.servers import Simulator

APP = OAuthApp(
    "123", ("s3cr3t-value",), "https://b.example/oauth/callback", "https://a/x", "https://t/y"
)
NOW = datetime(2026, 1, 1, tzinfo=UTC)
REPLY = {
    "access_token": "APP_USR-123-010100-abc-42",
    "token_type": "Bearer",
    "expires_in": 21600,
    "scope": "offline_access read write",
    "user_id": 42,
    "refresh_token": "TG-abc-42",
    "public_key": "APP_USR-pk",
    "live_mode": True,
}


def client(handler: Any) -> MercadoPagoClient:
    return MercadoPagoClient(httpx.MockTransport(handler), timeout=1.0, clock=lambda: NOW)


async def test_the_code_exchange_is_one_form_post_with_every_parameter() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=REPLY)

    tokens, sent_at = await client(handler).exchange_code(APP, "CODE", "v" * 43, test=True)
    assert len(seen) == 1
    request = seen[0]
    assert request.headers["content-type"] == "application/x-www-form-urlencoded"
    assert request.headers["accept"] == "application/json"
    assert request.url.query == b""
    assert dict(parse_qsl(request.content.decode())) == {
        "client_id": "123",
        "client_secret": "s3cr3t-value",
        "grant_type": "authorization_code",
        "code": "CODE",
        "redirect_uri": "https://b.example/oauth/callback",
        "code_verifier": "v" * 43,
        "test_token": "true",
    }
    assert tokens.user_id == 42
    assert tokens.expires_in == 21600
    assert sent_at == NOW


@pytest.mark.parametrize(("status", "field"), [(500, "error"), (502, "error"), (429, "error")])
async def test_server_errors_and_rate_limits_are_transient_and_never_retried(
    status: int, field: str
) -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(status, json={field: "local_rate_limited", "status": status})

    with pytest.raises(TransientUpstreamError):
        await client(handler).refresh(APP, "TG-1")
    assert calls == 1


async def test_a_broken_connection_is_transient() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused")

    with pytest.raises(TransientUpstreamError):
        await client(handler).refresh(APP, "TG-1")


@pytest.mark.parametrize(
    ("status", "expected"),
    [(200, TokenCheck.WORKS), (401, TokenCheck.REVOKED), (403, TokenCheck.FORBIDDEN)],
)
async def test_only_a_401_from_users_me_says_the_grant_is_gone(
    status: int, expected: TokenCheck
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/users/me"
        assert request.headers["authorization"] == "Bearer APP_USR-1"
        return httpx.Response(status, json={})

    assert await client(handler).check_token("https://api.example", "APP_USR-1") == expected


async def test_a_users_me_that_cannot_answer_is_transient() -> None:
    with pytest.raises(TransientUpstreamError):
        await client(lambda request: httpx.Response(502)).check_token(
            "https://api.example", "APP_USR-1"
        )


@pytest.mark.parametrize("field", ["error", "errorKey"])
def test_both_error_field_names_are_understood(field: str) -> None:
    assert isinstance(classify_error(400, {field: "invalid_grant"}), PermanentGrantError)
    assert isinstance(classify_error(400, {field: "invalid_client"}), ApplicationError)


@pytest.mark.parametrize("status", [400, 401])
def test_invalid_client_is_an_application_error_as_400_or_401(status: int) -> None:
    assert isinstance(classify_error(status, {"error": "invalid_client"}), ApplicationError)


@pytest.mark.parametrize("status", [400, 401])
@pytest.mark.parametrize(
    "code",
    [
        "invalid_client",
        "unauthorized_client",
        "invalid_scope",
        "invalid_request",
        "unsupported_grant_type",
        "forbidden",
    ],
)
def test_every_documented_application_error_is_application_wide(code: str, status: int) -> None:
    error = classify_error(status, {"error": code})
    assert isinstance(error, ApplicationError)
    assert error.error == code


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (400, {"error": "a_code_mercado_pago_never_documented"}),
        (400, {"errorKey": "invalid_token"}),
        (400, None),  # no code at all, e.g. a proxy's HTML page
        (404, {"error": "not_found"}),
        (403, {"error": "policy_agent_refused"}),
    ],
)
def test_an_error_we_do_not_understand_is_application_wide_never_a_dead_grant(
    status: int, body: Any
) -> None:
    # A dead grant relinks the seller; only `invalid_grant` itself may say so.
    assert isinstance(classify_error(status, body), ApplicationError)


def test_a_refresh_reply_without_account_fields_keeps_them_unknown() -> None:
    minimal = {k: REPLY[k] for k in ("access_token", "token_type", "expires_in", "scope")}
    tokens = parse_token_reply(minimal)
    assert (tokens.user_id, tokens.public_key, tokens.live_mode, tokens.refresh_token) == (
        None,
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    "body",
    [
        None,
        [],
        {"token_type": "bearer"},
        {**REPLY, "expires_in": "soon"},
        {**REPLY, "token_type": "mac"},
    ],
)
def test_a_malformed_success_reply_is_not_trusted(body: Any) -> None:
    with pytest.raises(TransientUpstreamError):
        parse_token_reply(body)


def test_error_messages_hold_no_secret() -> None:
    error = classify_error(400, {"error": "invalid_grant", "message": "bad TG-secret"})
    assert "TG-secret" not in str(error)
    assert json.dumps(repr(parse_token_reply(REPLY))).count("TG-abc-42") == 0


async def test_invalid_client_tries_the_next_secret_and_then_starts_with_it() -> None:
    app = OAuthApp("123", ("old", "new"), "https://b/cb", "https://a/x", "https://t/y")
    used: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        secret = dict(parse_qsl(request.content.decode()))["client_secret"]
        used.append(secret)
        if secret != "new":
            return httpx.Response(401, json={"error": "invalid_client", "status": 401})
        return httpx.Response(200, json=REPLY)

    mp = client(handler)
    await mp.refresh(app, "TG-1")
    await mp.refresh(app, "TG-2")
    assert used == ["old", "new", "new"]


async def test_each_application_rotates_its_secret_on_its_own() -> None:
    """One client serves every application: the secret that worked is remembered per
    application, so `ar` renewing its secret does not send `br` through its list."""
    ar = OAuthApp("111", ("ar-old", "ar-new"), "https://b/cb", "https://a/x", "https://t/y", "ar")
    br = OAuthApp(
        "222", ("br-only", "br-spare"), "https://b/cb", "https://a/x", "https://t/y", "br"
    )
    working = {"111": "ar-new", "222": "br-only"}
    used: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        form = dict(parse_qsl(request.content.decode()))
        used.append((form["client_id"], form["client_secret"]))
        if working[form["client_id"]] != form["client_secret"]:
            return httpx.Response(400, json={"error": "invalid_client", "status": 400})
        return httpx.Response(200, json=REPLY)

    mp = client(handler)
    for app in (ar, br, ar, br):
        await mp.refresh(app, "TG-1")
    assert used == [
        ("111", "ar-old"),
        ("111", "ar-new"),
        ("222", "br-only"),
        ("111", "ar-new"),
        ("222", "br-only"),
    ]


async def test_when_no_secret_works_invalid_client_is_raised() -> None:
    app = OAuthApp("123", ("a", "b"), "https://b/cb", "https://a/x", "https://t/y")

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": "invalid_client", "status": 400})

    with pytest.raises(ApplicationError, match="invalid_client"):
        await client(handler).refresh(app, "TG-1")


async def test_invalid_grant_is_not_retried_with_another_secret() -> None:
    app = OAuthApp("123", ("a", "b"), "https://b/cb", "https://a/x", "https://t/y")
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(400, json={"error": "invalid_grant", "status": 400})

    with pytest.raises(PermanentGrantError):
        await client(handler).refresh(app, "TG-1")
    assert calls == 1


async def test_calls_to_mercado_pago_ignore_the_environments_proxy(
    settings: Settings, simulator: Simulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stray HTTP(S)_PROXY must not route seller tokens and client secrets elsewhere: the
    broker's own pools (Upstream.open) go straight to MP_API_URL, here the loopback simulator.
    (Through the proxy, a closed port, the check could not be made at all.)"""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    upstream = Upstream.open(settings, utcnow, None)
    try:
        assert await upstream.mercadopago.check_token(settings.mp_api_url, "not-a-token") == (
            TokenCheck.REVOKED
        )
    finally:
        await upstream.close()
