"""The Mercado Pago OAuth client: the authorization URL and `POST /oauth/token`.

Exceptions, the way callers see them:

    MercadoPagoError
    ├── PermanentGrantError   the grant is dead: invalid_grant (a used, expired or foreign code
    │                         or refresh token, a redirect_uri mismatch). Retrying cannot help.
    ├── ApplicationError      the application itself is refused: invalid_client,
    │                         unauthorized_client, invalid_scope, ... Every seller is affected.
    │                         Any other 4xx code we do not know lands here too: only
    │                         `invalid_grant` may ever send a seller to relink.
    └── TransientUpstreamError  5xx, 429 local_rate_limited, a timeout or a broken connection.
                              `not_sent` is True only when the request surely did not reach
                              Mercado Pago (connection refused, 429); otherwise its outcome is
                              UNKNOWN: the refresh token may have been rotated already.

Token requests are never retried here: a code and a refresh token are single-use, so a retry
after a lost reply burns them (the official SDKs retry, which is exactly that bug).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal
from urllib.parse import urlencode

import httpx

from service.core import metrics


class TokenCheck(StrEnum):
    WORKS = "works"  # 200
    REVOKED = "revoked"  # 401: the grant is gone (the only answer that may mark or unlink)
    FORBIDDEN = "forbidden"  # 403: this call is not allowed; it says nothing about the grant


HEADERS = {"Accept": "application/json", "User-Agent": "mp-token-broker"}  # every call's
TOKEN_CHECKS = {200: TokenCheck.WORKS, 401: TokenCheck.REVOKED, 403: TokenCheck.FORBIDDEN}


class MercadoPagoError(Exception):
    def __init__(self, error: str, status: int | None = None) -> None:
        # Only Mercado Pago's error code and status: its message may echo what we sent.
        super().__init__(f"{error} (HTTP {status})" if status else error)
        self.error = error
        self.status = status


class PermanentGrantError(MercadoPagoError):
    pass


class ApplicationError(MercadoPagoError):
    pass


class TransientUpstreamError(MercadoPagoError):
    def __init__(self, error: str, status: int | None = None, *, not_sent: bool = False) -> None:
        super().__init__(error, status)
        self.not_sent = not_sent


@dataclass(frozen=True, repr=False)
class TokenSet:
    """A successful token reply. Fields a refresh reply may omit are None."""

    access_token: str
    expires_in: int
    refresh_token: str | None
    scope: str | None
    user_id: int | None
    public_key: str | None
    live_mode: bool | None
    token_type: str = "bearer"

    def __repr__(self) -> str:
        return f"TokenSet(user_id={self.user_id}, expires_in={self.expires_in})"


def parse_token_reply(body: Any) -> TokenSet:
    if not isinstance(body, dict) or not isinstance(body.get("access_token"), str):
        raise TransientUpstreamError("malformed_reply", 200)
    token_type = str(body.get("token_type", "bearer"))
    if token_type.lower() != "bearer":
        raise TransientUpstreamError("unexpected_token_type", 200)
    try:
        expires_in = int(body["expires_in"])
        user_id = int(body["user_id"]) if body.get("user_id") is not None else None
    except (KeyError, TypeError, ValueError):
        raise TransientUpstreamError("malformed_reply", 200) from None
    if expires_in <= 0:
        raise TransientUpstreamError("malformed_reply", 200)
    live_mode = body.get("live_mode")
    return TokenSet(
        access_token=body["access_token"],
        expires_in=expires_in,
        refresh_token=body.get("refresh_token") or None,
        scope=body.get("scope"),
        user_id=user_id,
        public_key=body.get("public_key"),
        live_mode=live_mode if isinstance(live_mode, bool) else None,
        token_type=token_type,
    )


def classify_error(status: int, body: Any) -> MercadoPagoError:
    """Map an error reply to the exception tree. The code is in `error` (or `errorKey`)."""
    error = ""
    if isinstance(body, dict):
        error = str(body.get("error") or body.get("errorKey") or "")
    if status == 429:
        # Rate-limited before anything was processed: safe to send again.
        return TransientUpstreamError(error or "local_rate_limited", status, not_sent=True)
    if status >= 500 or (not error and status not in (400, 401, 403)):
        return TransientUpstreamError(error or "upstream_unavailable", status)
    if error == "invalid_grant":
        return PermanentGrantError(error, status)
    # The documented application codes (invalid_client, unauthorized_client, invalid_scope,
    # invalid_request, unsupported_grant_type, forbidden) and anything we cannot read: the
    # breaker pauses the application, while relinking a seller cannot be undone.
    if not error:
        error = "unauthorized" if status in (401, 403) else "bad_request"
    return ApplicationError(error, status)


@dataclass(frozen=True, repr=False)
class OAuthApp:
    """One Mercado Pago application (they are per country); the broker may serve several."""

    client_id: str
    client_secrets: tuple[str, ...]  # in order; more than one while the secret is renewed
    redirect_uri: str
    auth_url: str
    token_url: str
    name: str = "default"  # the broker's name for it (metrics)

    def __repr__(self) -> str:
        return f"OAuthApp(client_id={self.client_id!r})"

    def authorization_url(
        self, state: str, code_challenge: str | None, method: Literal["S256", "plain"] | None
    ) -> str:
        params = {
            "client_id": self.client_id,
            "response_type": "code",
            "platform_id": "mp",
            "state": state,
            "redirect_uri": self.redirect_uri,
        }
        if code_challenge and method:
            params |= {"code_challenge": code_challenge, "code_challenge_method": method}
        return f"{self.auth_url}?{urlencode(params)}"


@contextmanager
def _timed(application: str, endpoint: str) -> Iterator[None]:
    """Upstream latency, failures and timeouts included (they are what an outage looks like)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - started
        metrics.UPSTREAM_SECONDS.labels(application, endpoint).observe(elapsed)


class MercadoPagoClient:
    """Calls on httpx transports (connection pools), not `httpx.AsyncClient`s: the client's own
    layers (request building and merging, cookies, auth, redirects, hooks), none of which a
    call to Mercado Pago uses, cost a third of a bare POST's CPU. For the same reason, and so
    that a stray HTTPS_PROXY cannot send seller tokens through an unconfigured proxy, the
    environment's proxy variables are not read: an egress proxy is an MP_*_URL of its own.
    """

    def __init__(
        self,
        transport: httpx.AsyncBaseTransport | Sequence[httpx.AsyncBaseTransport],
        timeout: float,
        clock: Callable[[], datetime],
    ) -> None:
        # Several pools, used in turn: httpcore scans every pooled connection on each
        # request, so one pool of N connections costs O(N) per request; shards keep N small.
        self.transports = list(transport) if isinstance(transport, Sequence) else [transport]
        self.turn = itertools.cycle(self.transports)
        self.timeout = timeout
        self.clock = clock
        self.working_secret: dict[str, int] = {}  # client_id -> index of the secret that worked

    async def aclose(self) -> None:
        for transport in self.transports:
            await transport.aclose()

    async def _send(self, request: httpx.Request) -> httpx.Response:
        """One request on the next pool, its reply read whole (no redirects are followed)."""
        reply = await next(self.turn).handle_async_request(request)
        try:
            await reply.aread()
        finally:
            await reply.aclose()
        return reply

    async def exchange_code(
        self, app: OAuthApp, code: str, code_verifier: str | None, *, test: bool
    ) -> tuple[TokenSet, datetime]:
        """Exchange an authorization code. Returns the tokens and when the request left."""
        form = {
            "client_id": app.client_id,
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": app.redirect_uri,
        }
        if code_verifier:
            form["code_verifier"] = code_verifier
        if test:
            form["test_token"] = "true"
        return await self._token_request(app, form)

    async def refresh(self, app: OAuthApp, refresh_token: str) -> tuple[TokenSet, datetime]:
        form = {
            "client_id": app.client_id,
            "grant_type": "refresh_token",
            "refresh_token": refresh_token,
        }
        return await self._token_request(app, form)

    async def _token_request(
        self, app: OAuthApp, form: dict[str, str]
    ) -> tuple[TokenSet, datetime]:
        """Authenticate with the secret that worked last; on `invalid_client`, try the next.

        `invalid_client` means Mercado Pago refused us before looking at the grant, so the
        code or refresh token is not spent and sending it again with another secret is safe.
        """
        secrets = app.client_secrets
        start = self.working_secret.get(app.client_id, 0) % len(secrets)
        order = [*range(start, len(secrets)), *range(start)]
        for position, index in enumerate(order):
            try:
                result = await self._post(app, form | {"client_secret": secrets[index]})
            except ApplicationError as exc:
                if exc.error != "invalid_client" or position == len(order) - 1:
                    raise
                continue
            self.working_secret[app.client_id] = index
            return result
        raise AssertionError("unreachable")

    async def _post(self, app: OAuthApp, form: dict[str, str]) -> tuple[TokenSet, datetime]:
        sent_at = self.clock()  # expires_at counts from when the request left, not the reply
        try:
            # One deadline for connect + send + read: a slow drip cannot stretch it.
            with _timed(app.name, "oauth_token"):
                async with asyncio.timeout(self.timeout):
                    reply = await self._send(
                        httpx.Request("POST", app.token_url, data=form, headers=HEADERS)
                    )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # No connection, so nothing was sent.
            raise TransientUpstreamError(type(exc).__name__, not_sent=True) from None
        except (TimeoutError, httpx.HTTPError) as exc:
            raise TransientUpstreamError(type(exc).__name__) from None
        try:
            body = reply.json()
        except ValueError:
            body = None
        if reply.status_code != 200:
            raise classify_error(reply.status_code, body)
        return parse_token_reply(body), sent_at

    async def check_token(
        self, api_url: str, access_token: str, application: str = ""
    ) -> TokenCheck:
        """What Mercado Pago says of an access token (`GET /users/me`). Anything but 200, 401
        or 403 is transient: the check could not be made."""
        reply = await self._users_me(api_url, access_token, application)
        if reply.status_code in TOKEN_CHECKS:
            return TOKEN_CHECKS[reply.status_code]
        raise TransientUpstreamError("upstream_unavailable", reply.status_code)

    async def account_id(self, api_url: str, access_token: str, application: str = "") -> int:
        """The Mercado Pago account (`id` of `GET /users/me`) an access token acts for."""
        reply = await self._users_me(api_url, access_token, application)
        if reply.status_code != 200:
            try:
                body = reply.json()
            except ValueError:
                body = None
            raise classify_error(reply.status_code, body)
        try:
            account = int(reply.json()["id"])
        except (ValueError, TypeError, KeyError):
            raise TransientUpstreamError("malformed_reply", 200) from None
        if account <= 0:
            raise TransientUpstreamError("malformed_reply", 200)
        return account

    async def _users_me(self, api_url: str, access_token: str, application: str) -> httpx.Response:
        try:
            with _timed(application, "users_me"):
                async with asyncio.timeout(self.timeout):
                    return await self._send(
                        httpx.Request(
                            "GET",
                            f"{api_url.rstrip('/')}/users/me",
                            headers={"Authorization": f"Bearer {access_token}", **HEADERS},
                        )
                    )
        except (TimeoutError, httpx.HTTPError) as exc:
            raise TransientUpstreamError(type(exc).__name__) from None
