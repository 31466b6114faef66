"""The link flow: link → attempt (state + PKCE + browser binding) → callback → stored tokens.

Routes call these functions and render what they return; the rules live here.
"""

from __future__ import annotations

import logging
import re
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.core import logs, metrics
from service.core.config import Settings
from service.core.crypto import Keyring
from service.core.db import transaction
from service.core.domain import KeyView, Status
from service.core.errors import InvalidRequest, LiveModeMismatch
from service.core.mercadopago import (
    MercadoPagoError,
    TokenSet,
    TransientUpstreamError,
)
from service.core.models import Link, LinkAttempt, Seller
from service.core.runtime import Clock, Database, Tasks, Upstream
from service.lifecycle import audit
from service.lifecycle.sellers import Pair, sealed_pair, store_linked
from service.linking import pkce

log = logging.getLogger("broker.linking")


@dataclass(frozen=True)
class Linking:
    """The parts of the process the link flow uses."""

    settings: Settings
    clock: Clock
    db: Database
    keyring: Keyring
    upstream: Upstream
    tasks: Tasks


BINDER_FORMAT = re.compile(r"^[A-Za-z0-9_-]{43}$")


class Outcome(StrEnum):
    """How a link attempt ended; also the `status` parameter sent back to `return_url`."""

    EXCHANGING = "exchanging"
    LINKED = "linked"
    RELINKED = "relinked"
    DENIED = "denied"
    EXCHANGE_FAILED = "exchange_failed"
    UPSTREAM_UNAVAILABLE = "upstream_unavailable"
    ACCOUNT_MISMATCH = "account_mismatch"
    LIVE_MODE_MISMATCH = "live_mode_mismatch"


class Refusal(StrEnum):
    """Why a seller's browser was turned away before anything changed or Mercado Pago was called."""

    LINK_NOT_FOUND = "link_not_found"
    LINK_EXPIRED = "link_expired"
    LINK_USED = "link_used"
    INVALID_CALLBACK = "invalid_callback"
    UNKNOWN_STATE = "unknown_state"
    UNBOUND_BROWSER = "unbound_browser"
    ATTEMPT_EXPIRED = "attempt_expired"


SUCCESS = {Outcome.LINKED, Outcome.RELINKED}


@dataclass(frozen=True)
class CallbackResult:
    result: Outcome | Refusal
    seller_id: str | None = None
    return_url: str | None = None


def _event(name: str, **fields: object) -> None:
    logs.event(log, name, fields)


# -- return_url ----------------------------------------------------------------------------


def _origin(parts: tuple[str, str, int | None]) -> tuple[str, str, int]:
    scheme, host, port = parts
    return scheme, host, port or (443 if scheme == "https" else 80)


def check_return_url(url: str, allowlist: list[str]) -> str:
    """Accept `url` only if it matches an allowlist entry by scheme, host, port and path prefix."""
    refuse = InvalidRequest("return_url is not on the allowlist.")
    if any(ch.isspace() or ord(ch) < 32 or ch == "\\" for ch in url):
        raise refuse
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise refuse from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise refuse
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise refuse
    origin = _origin((parts.scheme, parts.hostname, port))
    path = parts.path or "/"
    for entry in allowlist:
        allowed = urlsplit(entry)
        if _origin((allowed.scheme, allowed.hostname or "", allowed.port)) != origin:
            continue
        prefix = allowed.path or "/"
        # A prefix matches whole segments: /sellers allows /sellers/42, not /sellers-evil.
        if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return url
    raise refuse


def with_status(return_url: str, outcome: str, seller_id: str) -> str:
    parts = urlsplit(return_url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    query += [("status", outcome), ("seller_id", seller_id)]
    return urlunsplit(parts._replace(query=urlencode(query)))


# -- POST /link/start ----------------------------------------------------------------------


async def start_link(
    flow: Linking, key: KeyView, seller_id: str, return_url: str | None, *, test: bool
) -> tuple[str, datetime]:
    if return_url is not None:
        check_return_url(return_url, flow.settings.broker_return_url_allowlist)
    now = flow.clock()
    token = secrets.token_urlsafe(32)
    expires_at = now + timedelta(seconds=flow.settings.broker_link_ttl_seconds)
    async with transaction(flow.db.sessions) as session:
        seller = await session.get(Seller, seller_id)
        if seller is not None and seller.status != Status.UNLINKED and seller.live_mode == test:
            held = "live" if seller.live_mode else "sandbox"
            raise LiveModeMismatch(f"This seller holds {held} credentials; unlink them first.")
        session.add(
            Link(
                id_hash=pkce.digest(token),
                seller_id=seller_id,
                client_id=flow.upstream.oauth.client_id,
                return_url=return_url,
                test=test,
                created_by=key.id,
                created_at=now,
                expires_at=expires_at,
            )
        )
        audit.record(session, now, key.name, "link.created", seller_id, "test" if test else None)
    _event("link.created", seller_id=seller_id, test=test, api_key=key.name)
    return f"{flow.settings.broker_public_url.rstrip('/')}/link/{token}", expires_at


# -- GET /link/{token} -----------------------------------------------------------------------


async def open_link(
    flow: Linking, token: str, binder: str | None
) -> tuple[str, str] | CallbackResult:
    """Start an attempt. Returns (authorization URL, browser binder) or why not."""
    now = flow.clock()
    method = None if flow.settings.mp_pkce_method == "off" else flow.settings.mp_pkce_method
    async with transaction(flow.db.sessions) as session:
        link = await session.get(Link, pkce.digest(token))
        refusal = (
            Refusal.LINK_NOT_FOUND
            if link is None
            else Refusal.LINK_USED
            if link.completed_at is not None
            else Refusal.LINK_EXPIRED
            if link.expires_at <= now
            else None
        )
        if refusal is not None or link is None:
            _event("link.refused", reason=refusal)
            return CallbackResult(refusal or Refusal.LINK_NOT_FOUND)
        # One binder per browser: a seller with two tabs open keeps both attempts usable.
        if binder is None or not BINDER_FORMAT.match(binder):
            binder = secrets.token_urlsafe(32)
        state, verifier, attempt_id = pkce.new_state(), pkce.new_verifier(), str(uuid.uuid4())
        session.add(
            LinkAttempt(
                id=attempt_id,
                link_id_hash=link.id_hash,
                seller_id=link.seller_id,
                client_id=link.client_id,
                state_hash=pkce.digest(state),
                binder_hash=pkce.digest(binder),
                code_verifier=flow.keyring.seal_column(
                    LinkAttempt.code_verifier, attempt_id, link.client_id, verifier
                )
                if method
                else None,
                challenge_method=method,
                test=link.test,
                created_at=now,
                expires_at=now + timedelta(seconds=flow.settings.broker_attempt_ttl_seconds),
            )
        )
    _event("link.opened", seller_id=link.seller_id, attempt=attempt_id)
    challenge = pkce.challenge(verifier, method) if method else None
    return flow.upstream.oauth.authorization_url(state, challenge, method), binder


# -- GET /oauth/callback ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Claimed:
    attempt_id: str
    seller_id: str
    client_id: str
    test: bool
    verifier: str | None
    return_url: str | None


async def handle_callback(
    flow: Linking,
    state: str | None,
    code: str | None,
    error: str | None,
    binder: str | None,
) -> CallbackResult:
    result = await _handle_callback(flow, state, code, error, binder)
    metrics.LINK_ATTEMPTS.labels(result.result).inc()
    return result


async def _handle_callback(
    flow: Linking,
    state: str | None,
    code: str | None,
    error: str | None,
    binder: str | None,
) -> CallbackResult:
    if not state or not (code or error):
        _event("callback.refused", reason=Refusal.INVALID_CALLBACK)
        return CallbackResult(Refusal.INVALID_CALLBACK)
    # Past the check above, a callback without a code carries an error: the seller said no.
    claimed = await _claim_attempt(flow, state, binder, denied=not code)
    if isinstance(claimed, CallbackResult):
        return claimed
    if not code:
        _event("callback.outcome", outcome=Outcome.DENIED, seller_id=claimed.seller_id)
        return CallbackResult(Outcome.DENIED, claimed.seller_id, claimed.return_url)
    # The exchange belongs to the process: a seller closing the tab cannot cancel it between
    # Mercado Pago's reply and our write.
    outcome = await flow.tasks.owned(_exchange_and_store(flow, claimed, code))
    return CallbackResult(outcome, claimed.seller_id, claimed.return_url)


async def _claim_attempt(
    flow: Linking, state: str, binder: str | None, *, denied: bool
) -> _Claimed | CallbackResult:
    """Consume the attempt exactly once and commit that before anything is sent upstream."""
    now = flow.clock()
    async with transaction(flow.db.sessions) as session:
        attempt = await session.scalar(
            select(LinkAttempt)
            .where(LinkAttempt.state_hash == pkce.digest(state))
            # Two submissions of one callback: the second waits here, then sees it used.
            .with_for_update()
        )
        if attempt is None:
            _event("callback.refused", reason=Refusal.UNKNOWN_STATE)
            return CallbackResult(Refusal.UNKNOWN_STATE)
        if binder is None or not secrets.compare_digest(pkce.digest(binder), attempt.binder_hash):
            _event("callback.refused", reason=Refusal.UNBOUND_BROWSER, attempt=attempt.id)
            return CallbackResult(Refusal.UNBOUND_BROWSER, attempt.seller_id)
        link = await session.get(Link, attempt.link_id_hash)
        return_url = link.return_url if link else None
        if attempt.consumed_at is not None:
            # A resubmitted callback shows what happened the first time.
            recorded = Outcome(attempt.outcome or Outcome.EXCHANGE_FAILED)
            _event("callback.replayed", outcome=recorded, attempt=attempt.id)
            return CallbackResult(recorded, attempt.seller_id, return_url)
        if attempt.expires_at <= now:
            _event("callback.refused", reason=Refusal.ATTEMPT_EXPIRED, attempt=attempt.id)
            return CallbackResult(Refusal.ATTEMPT_EXPIRED, attempt.seller_id)
        attempt.consumed_at = now
        attempt.outcome = Outcome.DENIED if denied else Outcome.EXCHANGING
        verifier = (
            flow.keyring.open_column(
                LinkAttempt.code_verifier, attempt.id, attempt.client_id, attempt.code_verifier
            )
            if attempt.code_verifier
            else None
        )
        claimed = _Claimed(
            attempt.id, attempt.seller_id, attempt.client_id, attempt.test, verifier, return_url
        )
    return claimed


async def _exchange_and_store(flow: Linking, claimed: _Claimed, code: str) -> Outcome:
    error: str | None = None
    try:
        tokens, sent_at = await flow.upstream.mercadopago.exchange_code(
            flow.upstream.oauth, code, claimed.verifier, test=claimed.test
        )
    except TransientUpstreamError as exc:
        outcome, error = Outcome.UPSTREAM_UNAVAILABLE, exc.error
    except MercadoPagoError as exc:
        outcome, error = Outcome.EXCHANGE_FAILED, exc.error
    else:
        outcome = await _store_tokens(flow, claimed, tokens, sent_at)
    metrics.TOKEN_EXCHANGES.labels(outcome).inc()
    if outcome not in SUCCESS:
        async with transaction(flow.db.sessions) as session:
            await session.execute(
                update(LinkAttempt)
                .where(LinkAttempt.id == claimed.attempt_id)
                .values(outcome=outcome)
            )
    _event(
        "callback.outcome",
        outcome=outcome,
        seller_id=claimed.seller_id,
        attempt=claimed.attempt_id,
        upstream_error=error,
    )
    return outcome


def _user_id(tokens: TokenSet) -> int | None:
    if tokens.user_id is not None:
        return tokens.user_id
    # Access tokens end in `-{user_id}`: a reply without user_id still names the account.
    tail = tokens.access_token.rsplit("-", 1)[-1]
    return int(tail) if tail.isdigit() else None


async def _store_tokens(
    flow: Linking, claimed: _Claimed, tokens: TokenSet, sent_at: datetime
) -> Outcome:
    user_id = _user_id(tokens)
    pair = sealed_pair(
        flow.keyring, flow.settings, claimed.seller_id, claimed.client_id, tokens, sent_at
    )
    if user_id is None or pair.refresh_token is None:
        return Outcome.EXCHANGE_FAILED
    live_mode = pair.live_mode if pair.live_mode is not None else not claimed.test
    for _ in range(3):
        try:
            async with transaction(flow.db.sessions) as session:
                return await _store_linked(
                    flow, session, claimed, pair, user_id, live_mode=live_mode
                )
        except IntegrityError:
            continue  # two first links of one seller raced on the insert; the loser re-reads
    raise RuntimeError("could not store the seller's tokens")


async def _store_linked(
    flow: Linking,
    session: AsyncSession,
    claimed: _Claimed,
    pair: Pair,
    user_id: int,
    *,
    live_mode: bool,
) -> Outcome:
    """The link's rules (one account per seller, one mode), then the lifecycle's store."""
    now = flow.clock()
    seller = await session.get(Seller, claimed.seller_id, with_for_update=True)
    outcome = Outcome.LINKED
    if seller is not None and seller.status != Status.UNLINKED:
        if seller.mp_user_id != user_id and not flow.settings.broker_allow_account_change:
            outcome = Outcome.ACCOUNT_MISMATCH
        elif seller.live_mode != live_mode:
            outcome = Outcome.LIVE_MODE_MISMATCH
        else:
            outcome = Outcome.RELINKED
    elif seller is not None:
        outcome = Outcome.RELINKED
    attempt = await session.get(LinkAttempt, claimed.attempt_id)
    if attempt is None:  # claimed in an earlier transaction; attempts are never deleted early
        raise RuntimeError("the claimed attempt is gone")
    attempt.outcome, attempt.mp_user_id = outcome, user_id
    if outcome not in SUCCESS:
        return outcome  # the new tokens are dropped: they belong to an account we refused
    store_linked(
        session,
        flow.settings,
        now,
        seller,
        seller_id=claimed.seller_id,
        client_id=claimed.client_id,
        mp_user_id=user_id,
        live_mode=live_mode,
        pair=pair,
    )
    link = await session.get(Link, attempt.link_id_hash)
    if link is not None:
        link.completed_at = now  # a link links once; a forwarded copy is dead after that
    return outcome
