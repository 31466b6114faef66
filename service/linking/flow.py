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
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from service.core import logs, metrics
from service.core.applications import Application
from service.core.config import Settings
from service.core.crypto import Keyring
from service.core.db import transaction
from service.core.domain import KeyView, Status
from service.core.errors import (
    ApplicationMismatch,
    InvalidRequest,
    LiveModeMismatch,
    UnknownApplication,
)
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
from service.serving import apikeys

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


# A browser binder is `<nonce>.<tag>`: the tag (a MAC under the keyring) shows the broker issued
# it, so a cookie planted with a value of someone's choosing is never adopted (#13 finding 5).
BINDER_FORMAT = re.compile(r"^([A-Za-z0-9_-]{43})\.([A-Za-z0-9_-]{43})$")


def new_binder(keyring: Keyring) -> str:
    nonce = secrets.token_urlsafe(32)
    return f"{nonce}.{keyring.tag('binder:' + nonce)}"


def issued_binder(keyring: Keyring, binder: str) -> bool:
    match = BINDER_FORMAT.fullmatch(binder)
    return match is not None and keyring.tagged("binder:" + match[1], match[2])


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
    # Exchanged, but neither the reply nor `GET /users/me` named the Mercado Pago account.
    ACCOUNT_UNKNOWN = "account_unknown"


class Refusal(StrEnum):
    """Why a seller's browser was turned away before anything changed or Mercado Pago was called."""

    LINK_NOT_FOUND = "link_not_found"
    LINK_EXPIRED = "link_expired"
    LINK_USED = "link_used"
    INVALID_CALLBACK = "invalid_callback"
    UNKNOWN_STATE = "unknown_state"
    UNBOUND_BROWSER = "unbound_browser"
    ATTEMPT_EXPIRED = "attempt_expired"
    # The seller is linked through another of the platform's applications (another country).
    APPLICATION_MISMATCH = "application_mismatch"


SUCCESS = {Outcome.LINKED, Outcome.RELINKED}


@dataclass(frozen=True)
class CallbackResult:
    result: Outcome | Refusal
    seller_id: str | None = None
    return_url: str | None = None


def _event(name: str, level: int = logging.INFO, **fields: object) -> None:
    logs.event(log, name, fields, level)


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
    # Browsers resolve dot segments, `%2e` ones included, before they request: /sellers/../admin
    # is /admin. Such a path is refused (the prefix below is matched on the path as sent).
    if any(segment in (".", "..") for segment in unquote(path).split("/")):
        raise refuse
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


def chosen_application(flow: Linking, key: KeyView, name: str | None) -> Application:
    """The application a link is for: named, or the only one; and one the key may use.

    A key limited to applications learns nothing of the others: a name outside them is the
    same 403 whether it exists or not, and the list it is offered holds only its own."""
    apps = flow.upstream.apps
    app = apps.chosen(name)
    if name is not None or app is not None:  # a name, or the only application
        apikeys.authorize_application(key, None if app is None else app.client_id)
    if app is None:
        usable = [a.name for a in apps.values() if apikeys.may_use(key, a.client_id)]
        known = ", ".join(sorted(usable))
        if name is None:
            raise UnknownApplication(f"Name the application to link through: one of {known}.")
        raise UnknownApplication(f"No application {name!r}; the broker serves: {known}.")
    return app


def crosses_applications(flow: Linking, seller: Seller | None, client_id: str) -> bool:
    """A seller linked through one application is not linked through another, unless account
    changes are allowed (the same override): its tokens would move to another country's app."""
    return (
        seller is not None
        and seller.status != Status.UNLINKED
        and seller.client_id != client_id
        and not flow.settings.broker_allow_account_change
    )


async def start_link(
    flow: Linking,
    key: KeyView,
    seller_id: str,
    application: str | None,
    return_url: str | None,
    *,
    test: bool,
) -> tuple[str, datetime]:
    app = chosen_application(flow, key, application)
    if return_url is not None:
        check_return_url(return_url, flow.settings.broker_return_url_allowlist)
    now = flow.clock()
    token = secrets.token_urlsafe(32)
    expires_at = now + timedelta(seconds=flow.settings.broker_link_ttl_seconds)
    async with transaction(flow.db.sessions) as session:
        seller = await session.get(Seller, seller_id)
        if seller is not None and seller.status != Status.UNLINKED:
            # A key outside the seller's application learns nothing about it: the same 403.
            apikeys.authorize_application(key, seller.client_id)
        if crosses_applications(flow, seller, app.client_id):
            raise ApplicationMismatch(
                "This seller is linked through another application; unlink it first."
            )
        if seller is not None and seller.status != Status.UNLINKED and seller.live_mode == test:
            held = "live" if seller.live_mode else "sandbox"
            raise LiveModeMismatch(f"This seller holds {held} credentials; unlink them first.")
        session.add(
            Link(
                id_hash=pkce.digest(token),
                seller_id=seller_id,
                client_id=app.client_id,
                return_url=return_url,
                test=test,
                created_by=key.id,
                created_at=now,
                expires_at=expires_at,
            )
        )
        audit.record(
            session,
            now,
            key.name,
            "link.created",
            seller_id,
            "test" if test else None,
            application=app.name,
        )
    _event("link.created", seller_id=seller_id, application=app.name, test=test, api_key=key.name)
    return f"{flow.settings.broker_public_url.rstrip('/')}/link/{token}", expires_at


# -- GET /link/{token} -----------------------------------------------------------------------


def _unusable(link: Link, now: datetime) -> Refusal | None:
    """Why a link can start or finish no attempt any more: it linked once, or expired."""
    if link.completed_at is not None:
        return Refusal.LINK_USED  # a link links once; a forwarded copy is dead after that
    return Refusal.LINK_EXPIRED if link.expires_at <= now else None


async def open_link(
    flow: Linking, token: str, binder: str | None
) -> tuple[str, str] | CallbackResult:
    """Start an attempt. Returns (authorization URL, browser binder) or why not."""
    now = flow.clock()
    async with transaction(flow.db.sessions) as session:
        link = await session.get(Link, pkce.digest(token))
        # A link of an application no longer configured cannot be completed.
        app = flow.upstream.apps.by_client_id.get(link.client_id) if link else None
        refusal = Refusal.LINK_NOT_FOUND if link is None or app is None else _unusable(link, now)
        if refusal is None and link is not None:
            seller = await session.get(Seller, link.seller_id)
            if crosses_applications(flow, seller, link.client_id):
                refusal = Refusal.APPLICATION_MISMATCH  # before the seller consents for nothing
        if refusal is not None or link is None or app is None:
            _event("link.refused", reason=refusal)
            return CallbackResult(refusal or Refusal.LINK_NOT_FOUND)
        method = app.challenge_method
        # One binder per browser: a seller with two tabs open keeps both attempts usable.
        if binder is None or not issued_binder(flow.keyring, binder):
            binder = new_binder(flow.keyring)
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
    _event("link.opened", seller_id=link.seller_id, application=app.name, attempt=attempt_id)
    challenge = pkce.challenge(verifier, method) if method else None
    return app.oauth.authorization_url(state, challenge, method), binder


# -- GET /oauth/callback ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Claimed:
    attempt_id: str
    seller_id: str
    app: Application
    test: bool
    verifier: str | None
    return_url: str | None


async def handle_callback(
    flow: Linking,
    state: str | None,
    code: str | None,
    error: str | None,
    binder: str | None,
    callback: Application | None = None,
) -> CallbackResult:
    """Mercado Pago's redirect back, on the shared callback URL or on `callback`'s own."""
    result, app = await _handle_callback(flow, state, code, error, binder, callback)
    metrics.LINK_ATTEMPTS.labels(app.name if app else "", result.result).inc()
    return result


async def _handle_callback(
    flow: Linking,
    state: str | None,
    code: str | None,
    error: str | None,
    binder: str | None,
    callback: Application | None,
) -> tuple[CallbackResult, Application | None]:
    if not state or not (code or error):
        _event("callback.refused", reason=Refusal.INVALID_CALLBACK)
        return CallbackResult(Refusal.INVALID_CALLBACK), callback
    # Past the check above, a callback without a code carries an error: the seller said no.
    claimed = await _claim_attempt(flow, state, binder, callback, denied=not code)
    if isinstance(claimed, tuple):
        return claimed
    if not code:
        _event("callback.outcome", outcome=Outcome.DENIED, seller_id=claimed.seller_id)
        return CallbackResult(Outcome.DENIED, claimed.seller_id, claimed.return_url), claimed.app
    # The exchange belongs to the process: a seller closing the tab cannot cancel it between
    # Mercado Pago's reply and our write.
    outcome = await flow.tasks.owned(_exchange_and_store(flow, claimed, code))
    return CallbackResult(outcome, claimed.seller_id, claimed.return_url), claimed.app


async def _claim_attempt(
    flow: Linking, state: str, binder: str | None, callback: Application | None, *, denied: bool
) -> _Claimed | tuple[CallbackResult, Application | None]:
    """Consume the attempt exactly once and commit that before anything is sent upstream; a
    refusal comes with the application it counts for (the attempt's, once it is known)."""
    now = flow.clock()
    async with transaction(flow.db.sessions) as session:
        attempt = await session.scalar(
            select(LinkAttempt)
            .where(LinkAttempt.state_hash == pkce.digest(state))
            # Two submissions of one callback: the second waits here, then sees it used.
            .with_for_update()
        )
        app = flow.upstream.apps.by_client_id.get(attempt.client_id) if attempt else None
        if attempt is None or app is None or (callback is not None and callback != app):
            # Unknown here, of an application no longer configured, or come back on another
            # application's callback URL (whose redirect_uri the exchange would not match).
            _event("callback.refused", reason=Refusal.UNKNOWN_STATE)
            return CallbackResult(Refusal.UNKNOWN_STATE), callback
        if binder is None or not secrets.compare_digest(pkce.digest(binder), attempt.binder_hash):
            _event("callback.refused", reason=Refusal.UNBOUND_BROWSER, attempt=attempt.id)
            return CallbackResult(Refusal.UNBOUND_BROWSER, attempt.seller_id), app
        # Locked: of two attempts of one link (a forwarded copy), one claims at a time.
        link = await session.get(Link, attempt.link_id_hash, with_for_update=True)
        return_url = link.return_url if link else None
        if attempt.consumed_at is not None:
            # A resubmitted callback shows what happened the first time.
            recorded = Outcome(attempt.outcome or Outcome.EXCHANGE_FAILED)
            _event("callback.replayed", outcome=recorded, attempt=attempt.id)
            return CallbackResult(recorded, attempt.seller_id, return_url), app
        # The link itself must still be usable: one that linked (through another attempt, say
        # a forwarded copy left at the consent page) or expired completes nothing, before any
        # code reaches Mercado Pago.
        link_refusal = (
            Refusal.LINK_USED  # retention deletes a link with its attempts: only a race gets here
            if link is None
            else _unusable(link, now)
            or (Refusal.ATTEMPT_EXPIRED if attempt.expires_at <= now else None)
        )
        if link_refusal is not None:
            _event("callback.refused", reason=link_refusal, attempt=attempt.id)
            return CallbackResult(link_refusal, attempt.seller_id), app
        if not denied and await _another_exchanging(flow, session, attempt, now):
            # Another attempt of this link is exchanging its code: this one waits its turn
            # (reload: the link is then used, or free again if that exchange failed).
            _event("callback.refused", reason="link_exchanging", attempt=attempt.id)
            return CallbackResult(Outcome.EXCHANGING, attempt.seller_id, return_url), app
        if not denied and crosses_applications(
            flow, await session.get(Seller, attempt.seller_id), attempt.client_id
        ):
            # Linked through another application since the link was opened: nothing changes
            # and the code is not exchanged (the attempt stays unconsumed, so says the same).
            _event("callback.refused", reason=Refusal.APPLICATION_MISMATCH, attempt=attempt.id)
            return CallbackResult(Refusal.APPLICATION_MISMATCH, attempt.seller_id), app
        attempt.consumed_at = now
        attempt.outcome = Outcome.DENIED if denied else Outcome.EXCHANGING
        verifier = (
            flow.keyring.open_column(
                LinkAttempt.code_verifier, attempt.id, attempt.client_id, attempt.code_verifier
            )
            if attempt.code_verifier
            else None
        )
        claimed = _Claimed(attempt.id, attempt.seller_id, app, attempt.test, verifier, return_url)
    return claimed


async def _another_exchanging(
    flow: Linking, session: AsyncSession, attempt: LinkAttempt, now: datetime
) -> bool:
    """Whether another attempt of `attempt`'s link is exchanging now. One whose process died
    mid-exchange stops counting after twice the exchange's deadline."""
    since = now - timedelta(seconds=2 * flow.settings.mp_timeout_seconds)
    other = await session.scalar(
        select(LinkAttempt.id).where(
            LinkAttempt.link_id_hash == attempt.link_id_hash,
            LinkAttempt.id != attempt.id,
            LinkAttempt.outcome == Outcome.EXCHANGING,
            LinkAttempt.consumed_at > since,
        )
    )
    return other is not None


async def _exchange_and_store(flow: Linking, claimed: _Claimed, code: str) -> Outcome:
    error: str | None = None
    try:
        tokens, sent_at = await flow.upstream.mercadopago.exchange_code(
            claimed.app.oauth, code, claimed.verifier, test=claimed.test
        )
    except TransientUpstreamError as exc:
        outcome, error = Outcome.UPSTREAM_UNAVAILABLE, exc.error
    except MercadoPagoError as exc:
        outcome, error = Outcome.EXCHANGE_FAILED, exc.error
    else:
        outcome = await _store_tokens(flow, claimed, tokens, sent_at)
    metrics.TOKEN_EXCHANGES.labels(claimed.app.name, outcome).inc()
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
        application=claimed.app.name,
        attempt=claimed.attempt_id,
        upstream_error=error,
    )
    return outcome


async def _user_id(flow: Linking, claimed: _Claimed, tokens: TokenSet) -> int | None:
    """The Mercado Pago account the new tokens act for. Mercado Pago's reply names it; a plain
    RFC 6749 reply does not, and Mercado Pago already honoured the exchange: ask the account
    before giving the tokens up."""
    if tokens.user_id is not None:
        return tokens.user_id
    # Mercado Pago's access tokens end in `-{user_id}`.
    tail = tokens.access_token.rsplit("-", 1)[-1]
    if tail.isascii() and tail.isdigit():
        return int(tail)
    try:
        return await flow.upstream.mercadopago.account_id(
            claimed.app.api_url, tokens.access_token, claimed.app.name
        )
    except MercadoPagoError as exc:
        _event(
            "callback.account_unknown",
            logging.WARNING,
            seller_id=claimed.seller_id,
            application=claimed.app.name,
            upstream_error=exc.error,
        )
        return None


async def _store_tokens(
    flow: Linking, claimed: _Claimed, tokens: TokenSet, sent_at: datetime
) -> Outcome:
    pair = sealed_pair(
        flow.keyring, flow.settings, claimed.seller_id, claimed.app.client_id, tokens, sent_at
    )
    if pair.refresh_token is None:
        return Outcome.EXCHANGE_FAILED
    user_id = await _user_id(flow, claimed, tokens)
    if user_id is None:
        return Outcome.ACCOUNT_UNKNOWN
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
    if crosses_applications(flow, seller, claimed.app.client_id):
        # Linked through another application while this one exchanged: keep that link.
        outcome = Outcome.ACCOUNT_MISMATCH
    elif seller is not None and seller.status != Status.UNLINKED:
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
        client_id=claimed.app.client_id,
        mp_user_id=user_id,
        live_mode=live_mode,
        pair=pair,
    )
    link = await session.get(Link, attempt.link_id_hash)
    if link is not None:
        link.completed_at = now  # a link links once; a forwarded copy is dead after that
    return outcome
