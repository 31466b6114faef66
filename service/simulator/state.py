"""The simulator's in-memory model: clients, codes, grants, tokens, faults and the request log.

Nothing here does I/O, so the rules of the fake authorization server can be read (and
changed) without wading through HTTP handling. Errors are raised as `TokenError` and
`AuthorizationError`; `app.py` turns them into Mercado Pago-shaped responses.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCOPE = "offline_access read write"
DEFAULT_USER_ID = 241983636

# RFC 7636 section 4.1: 43-128 characters from the unreserved set. The same grammar
# applies to code challenges, so one pattern checks both.
_PKCE_VALUE = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
# "Plain" is accepted because Mercado Pago's own PKCE page spells it that way.
_PKCE_METHODS = {"S256": "S256", "plain": "plain", "Plain": "plain"}
# Any stable namespace works: it only makes public keys repeatable per client and user.
_PUBLIC_KEY_NAMESPACE = uuid.UUID("6f1c3f3e-6d2b-4f7c-9a51-3c1f6b0f2a10")
# Mercado Pago's tokens end in "-<user_id>"; an opaque token must not look like one, or a
# client could still find the account from it.
_USER_ID_SUFFIX = re.compile(r"-[0-9]+\Z")


@dataclass
class SimulatorClient:
    """A Mercado Pago application as configured in its developer panel."""

    client_id: str
    client_secret: str
    redirect_uris: tuple[str, ...]  # compared exactly, like Mercado Pago does
    pkce_required: bool = True  # an app with PKCE enabled: code_challenge is mandatory
    name: str | None = None  # shown on the consent page; defaults to "App <client_id>"

    @property
    def display_name(self) -> str:
        return self.name or f"App {self.client_id}"


@dataclass
class SimulatorConfig:
    clients: list[SimulatorClient]
    expires_in: int = 15552000  # 180 days, Mercado Pago's usual value
    code_ttl_seconds: int = 600
    clock: Callable[[], float] = time.time


class FaultPlan(BaseModel):
    """How `/oauth/token` and `/users/me` misbehave; replaced as a whole by
    `POST /_control/faults`."""

    model_config = ConfigDict(extra="forbid")

    latency_ms: int = Field(default=0, ge=0)
    status: int | None = Field(default=None, ge=400, le=599)
    error: str | None = Field(default=None, min_length=1)  # code in a status fault's body
    count: int | None = Field(default=None, ge=0)
    rate_limited: bool = False
    invalid_client_status: Literal[400, 401] = 400
    error_field: Literal["error", "errorKey"] = "error"
    token_type: Literal["bearer", "Bearer"] = "bearer"
    minimal_refresh_reply: bool = False
    after_rotate: Literal["drop", "hold"] | None = None
    omit_refresh_token: bool = False  # refresh replies lack it; the used one stays valid
    # Token replies (exchange, refresh, /_control/issue) as a plain RFC 6749 server sends
    # them: no user_id, public_key or live_mode, and opaque tokens (no "-<user_id>" tail).
    plain_reply: bool = False
    # /users/me answers this status, whatever the token. Not limited by `count`, which
    # only spends /oauth/token faults: it lasts until the plan is replaced.
    users_me_status: int | None = Field(default=None, ge=400, le=599)
    # The payments API (`/v1/...`, api.py): a delay before each answer, and a status every
    # one answers instead (bodies in Mercado Pago's error shape). Neither spends `count`.
    api_latency_ms: int = Field(default=0, ge=0)
    api_status: int | None = Field(default=None, ge=400, le=599)

    @model_validator(mode="after")
    def _error_needs_status(self) -> FaultPlan:
        # Refused rather than ignored, like unknown fields: a test that sets it means it.
        if self.error is not None and self.status is None:
            raise ValueError("error only applies to a status fault: set status too")
        return self


class AuthorizationError(Exception):
    """A bad `/authorization` request: shown as an error page, never redirected."""


class TokenError(Exception):
    """A refused `/oauth/token` request, with Mercado Pago's error code."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class AuthorizationRequest:
    client: SimulatorClient
    redirect_uri: str
    state: str | None
    code_challenge: str | None
    code_challenge_method: str | None  # normalised to "S256" or "plain"


@dataclass
class AuthorizationCode:
    client_id: str
    redirect_uri: str
    code_challenge: str | None
    code_challenge_method: str | None
    user_id: int
    issued_at: float
    used: bool = False


@dataclass
class Grant:
    """One seller's link to one app: the chain of rotating refresh tokens."""

    client_id: str
    user_id: int
    live_mode: bool
    public_key: str
    refresh_token: str | None = None  # the only refresh token that still works
    refreshes: int = 0
    revoked: bool = False


@dataclass(frozen=True)
class AccessToken:
    grant: Grant
    expires_at: float


@dataclass(frozen=True)
class IssuedTokens:
    grant: Grant
    access_token: str
    refresh_token: str | None  # None when the grant's refresh token was not rotated
    expires_in: int
    # Decided with the tokens, so a held reply keeps the shape its (opaque) tokens have.
    plain: bool = False


@dataclass
class GrantSummary:
    """`GET /_control/grants` per seller: counts and a fingerprint, never the token."""

    grants: int = 0
    active_grants: int = 0
    refreshes: int = 0
    refresh_token_fingerprint: str | None = None
    client_id: str | None = None  # the app holding that newest live grant


@dataclass
class LogEntry:
    """What the log keeps of a token request: never a secret, code or token."""

    grant_type: str | None
    client_id: str | None
    has_code_verifier: bool
    test_token: bool
    content_type: Literal["form", "json"]
    outcome: str = "pending"  # "held" while an after_rotate=hold reply waits
    user_id: int | None = None  # the grant's seller, once the reply is "ok"
    # When it arrived (time.monotonic(), seconds): tests read the spacing of requests from it.
    at: float = field(default_factory=time.monotonic)


@dataclass
class ApiCall:
    """A call to the payments API (`/v1/...`): what the proxy tests count, never a token."""

    method: str
    path: str
    status: int
    user_id: int | None  # the seller the bearer token acts for, when it is valid
    idempotency_key: str | None
    header_names: list[str] = field(default_factory=list)  # what arrived, never the values
    at: float = field(default_factory=time.monotonic)


def fingerprint(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def opaque_token() -> str:
    """A token that says nothing about its seller, as a plain OAuth server issues."""
    while True:
        token = secrets.token_urlsafe(32)
        # About 1 in 290 random tokens happen to end in "-<digits>": draw again.
        if not _USER_ID_SUFFIX.search(token):
            return token


def s256(verifier: str) -> str:
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class Simulator:
    """All state of one simulator instance (one per app, hung on `app.state.sim`)."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.clients = {client.client_id: client for client in config.clients}
        self.release_event = asyncio.Event()
        self.held = 0  # replies waiting on release_event
        self.reset()

    def reset(self) -> None:
        self.clock_offset = 0.0
        self.expires_in = self.config.expires_in  # for tokens issued from now on
        self.codes: dict[str, AuthorizationCode] = {}
        self.grants: list[Grant] = []
        self.refresh_tokens: dict[str, Grant] = {}
        self.access_tokens: dict[str, AccessToken] = {}
        self.log: list[LogEntry] = []
        self.api_log: list[ApiCall] = []
        self.payments: dict[int, dict[str, Any]] = {}
        self.idempotent: dict[tuple[int, str], int] = {}  # (seller, X-Idempotency-Key) -> id
        self.faults = FaultPlan()
        self.faults_left: int | None = None
        # Wake anything held by the previous plan so no request hangs across a reset.
        self.release()

    def now(self) -> float:
        return self.config.clock() + self.clock_offset

    # -- faults --------------------------------------------------------------------------

    def set_faults(self, plan: FaultPlan) -> None:
        self.faults = plan
        self.faults_left = plan.count

    def take_fault(self) -> bool:
        """Whether this request gets the planned fault; spends one unit of `count`."""
        if self.faults_left is None:
            return True
        if self.faults_left <= 0:
            return False
        self.faults_left -= 1
        return True

    def release(self) -> int:
        released = self.held
        self.release_event.set()
        self.release_event = asyncio.Event()
        return released

    # -- /authorization ------------------------------------------------------------------

    def validate_authorization(self, params: Mapping[str, str]) -> AuthorizationRequest:
        client = self.clients.get(params.get("client_id", ""))
        if client is None:
            raise AuthorizationError("The application (client_id) does not exist.")
        if params.get("response_type") != "code":
            raise AuthorizationError("response_type must be 'code'.")
        redirect_uri = params.get("redirect_uri", "")
        if redirect_uri not in client.redirect_uris:
            raise AuthorizationError(
                "The redirect_uri does not match the application's configured Redirect URL."
            )
        challenge = params.get("code_challenge") or None
        raw_method = params.get("code_challenge_method") or None
        method: str | None = None
        if challenge is None and client.pkce_required:
            raise AuthorizationError("This application requires PKCE: code_challenge is missing.")
        if challenge is not None:
            method = _PKCE_METHODS.get(raw_method or "")
            if method is None:
                raise AuthorizationError("code_challenge_method must be S256 or plain.")
            if not _PKCE_VALUE.fullmatch(challenge):
                raise AuthorizationError("code_challenge is malformed.")
        return AuthorizationRequest(
            client=client,
            redirect_uri=redirect_uri,
            state=params.get("state"),
            code_challenge=challenge,
            code_challenge_method=method,
        )

    def create_code(self, request: AuthorizationRequest, user_id: int) -> str:
        code = secrets.token_urlsafe(24)
        self.codes[code] = AuthorizationCode(
            client_id=request.client.client_id,
            redirect_uri=request.redirect_uri,
            code_challenge=request.code_challenge,
            code_challenge_method=request.code_challenge_method,
            user_id=user_id,
            issued_at=self.now(),
        )
        return code

    # -- /oauth/token --------------------------------------------------------------------

    def token(self, params: Mapping[str, str]) -> IssuedTokens:
        """Apply the token endpoint's rules in the order an OAuth server checks them."""
        client = self._authenticate(params.get("client_id", ""), params.get("client_secret", ""))
        grant_type = params.get("grant_type")
        if not grant_type:
            raise TokenError("invalid_request", "grant_type is required")
        if grant_type == "authorization_code":
            return self._exchange_code(client, params)
        if grant_type == "refresh_token":
            return self._refresh(client, params)
        raise TokenError("unsupported_grant_type", "grant_type not supported")

    def _authenticate(self, client_id: str, client_secret: str) -> SimulatorClient:
        client = self.clients.get(client_id)
        if client is None or not hmac.compare_digest(
            client.client_secret.encode(), client_secret.encode()
        ):
            status = self.faults.invalid_client_status
            raise TokenError("invalid_client", "invalid client_id or client_secret", status)
        return client

    def _exchange_code(self, client: SimulatorClient, params: Mapping[str, str]) -> IssuedTokens:
        code_value = params.get("code")
        if not code_value:
            raise TokenError("invalid_request", "code is required")
        code = self.codes.get(code_value)
        if code is None or code.client_id != client.client_id:
            raise TokenError("invalid_grant", "invalid authorization code")
        if code.used:
            raise TokenError("invalid_grant", "authorization code already used")
        # Any attempt burns the code, so a failed exchange cannot be retried: the broker
        # must send the right redirect_uri and verifier the first time.
        code.used = True
        if self.now() - code.issued_at > self.config.code_ttl_seconds:
            raise TokenError("invalid_grant", "authorization code expired")
        if params.get("redirect_uri") != code.redirect_uri:
            raise TokenError("invalid_grant", "redirect_uri mismatch")
        self._check_pkce(code, params.get("code_verifier") or None)
        grant = self._new_grant(client, code.user_id, live_mode=not wants_sandbox(params))
        return self._issue(grant)

    @staticmethod
    def _check_pkce(code: AuthorizationCode, verifier: str | None) -> None:
        if code.code_challenge is None:
            if verifier is not None:
                raise TokenError("invalid_grant", "code_verifier sent for a code without PKCE")
            return
        if verifier is None:
            raise TokenError("invalid_grant", "code_verifier is required")
        if not _PKCE_VALUE.fullmatch(verifier):
            raise TokenError("invalid_grant", "code_verifier is malformed")
        expected = s256(verifier) if code.code_challenge_method == "S256" else verifier
        if not hmac.compare_digest(expected.encode(), code.code_challenge.encode()):
            raise TokenError("invalid_grant", "code_verifier does not match code_challenge")

    def _refresh(self, client: SimulatorClient, params: Mapping[str, str]) -> IssuedTokens:
        refresh_token = params.get("refresh_token")
        if not refresh_token:
            raise TokenError("invalid_request", "refresh_token is required")
        grant = self.refresh_tokens.get(refresh_token)
        if grant is None or grant.client_id != client.client_id or grant.revoked:
            raise TokenError("invalid_grant", "invalid refresh_token")
        grant.refreshes += 1
        if self.faults.omit_refresh_token:
            # A reply without a refresh_token leaves the presented one as the live one.
            return self._issue(grant, rotate=False)
        # Single use: the presented token dies now. Earlier access tokens stay valid
        # until their own expiry, as with Mercado Pago.
        del self.refresh_tokens[refresh_token]
        return self._issue(grant)

    # -- grants and tokens ---------------------------------------------------------------

    def issue_directly(self, client_id: str, user_id: int, *, test: bool) -> IssuedTokens:
        """Seed a linked seller without the browser dance (control API only)."""
        client = self.clients.get(client_id)
        if client is None:
            raise KeyError(client_id)
        return self._issue(self._new_grant(client, user_id, live_mode=not test))

    def _new_grant(self, client: SimulatorClient, user_id: int, *, live_mode: bool) -> Grant:
        prefix = "APP_USR" if live_mode else "TEST"
        key = uuid.uuid5(_PUBLIC_KEY_NAMESPACE, f"{client.client_id}:{user_id}")
        grant = Grant(client.client_id, user_id, live_mode, public_key=f"{prefix}-{key}")
        self.grants.append(grant)
        return grant

    def _issue(self, grant: Grant, *, rotate: bool = True) -> IssuedTokens:
        """A new access token, and unless `rotate` is false a new refresh token."""
        now = self.now()
        plain = self.faults.plain_reply
        if plain:
            access = opaque_token()
        else:
            prefix = "APP_USR" if grant.live_mode else "TEST"
            stamp = time.strftime("%m%d%H", time.gmtime(now))
            access = f"{prefix}-{grant.client_id}-{stamp}-{secrets.token_hex(16)}-{grant.user_id}"
        expires_in = self.expires_in
        self.access_tokens[access] = AccessToken(grant, expires_at=now + expires_in)
        if not rotate:
            return IssuedTokens(grant, access, None, expires_in, plain)
        refresh = opaque_token() if plain else f"TG-{secrets.token_hex(12)}-{grant.user_id}"
        grant.refresh_token = refresh
        self.refresh_tokens[refresh] = grant
        return IssuedTokens(grant, access, refresh, expires_in, plain)

    def user_for_access_token(self, token: str) -> int | None:
        record = self.access_tokens.get(token)
        if record is None or record.grant.revoked or self.now() >= record.expires_at:
            return None
        return record.grant.user_id

    def revoke_user(self, user_id: int) -> int:
        """Kill every grant of a seller, like removing the app under Connected apps."""
        revoked = 0
        for grant in self.grants:
            if grant.user_id == user_id and not grant.revoked:
                grant.revoked = True
                if grant.refresh_token is not None:
                    self.refresh_tokens.pop(grant.refresh_token, None)
                    grant.refresh_token = None
                revoked += 1
        return revoked

    def grants_by_user(self) -> dict[str, GrantSummary]:
        summary: dict[str, GrantSummary] = {}
        for grant in self.grants:
            entry = summary.setdefault(str(grant.user_id), GrantSummary())
            entry.grants += 1
            entry.refreshes += grant.refreshes
            if not grant.revoked and grant.refresh_token is not None:
                entry.active_grants += 1
                # Grants are kept in creation order, so the newest live grant wins.
                entry.refresh_token_fingerprint = fingerprint(grant.refresh_token)
                entry.client_id = grant.client_id
        return summary


def wants_sandbox(params: Mapping[str, str]) -> bool:
    """`test_token=true` (a JSON `true` arrives here as the string "true")."""
    return params.get("test_token", "").lower() == "true"
