"""Serving a seller's access token to internal callers, refreshing it on read when needed."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Any

import asyncpg
from sqlalchemy import any_, bindparam, select
from starlette.responses import Response

from service.core import db
from service.core.batches import Batches
from service.core.config import LEASE_MARGIN_SECONDS, Settings
from service.core.crypto import Keyring
from service.core.db import Hot
from service.core.domain import KeyView, Reason, SellerView, Status, TokenWarning
from service.core.errors import InvalidRequest, RelinkRequired, SellerNotFound, UpstreamUnavailable
from service.core.mercadopago import TokenCheck, TransientUpstreamError
from service.core.models import Seller
from service.core.runtime import Clock, Database, Upstream
from service.core.schemas import TokenResponse
from service.lifecycle import sellers
from service.lifecycle.audit import ReadCounter
from service.refresh.engine import Outcome, Refresher
from service.serving import apikeys
from service.serving.cache import Cache

log = logging.getLogger("broker.tokens")


REPORT_COOLDOWN_SECONDS = 30.0  # one /users/me check per seller and token in this window
REPORTS_REMEMBERED = 10_000


@dataclass
class Reports:
    """Reports that Mercado Pago refused a token, coalesced per seller and token (`version`):
    callers reporting at once share one `/users/me` check, and a report within
    REPORT_COOLDOWN_SECONDS of a finished check makes none (fifty reports were fifty calls)."""

    inflight: dict[tuple[str, int], asyncio.Task[None]] = field(default_factory=dict)
    checked: OrderedDict[tuple[str, int], float] = field(default_factory=OrderedDict)

    async def once(
        self, key: tuple[str, int], check: Callable[[], Coroutine[Any, Any, None]]
    ) -> None:
        loop = asyncio.get_running_loop()
        if self.checked.get(key, -REPORT_COOLDOWN_SECONDS) > loop.time() - REPORT_COOLDOWN_SECONDS:
            return
        task = self.inflight.get(key)
        if task is None:
            task = self.inflight[key] = loop.create_task(check())
            task.add_done_callback(lambda done: self._finished(key, done))
        await asyncio.shield(task)

    def _finished(self, key: tuple[str, int], task: asyncio.Task[None]) -> None:
        self.inflight.pop(key, None)
        if not task.cancelled() and task.exception() is None:  # a failed check counts for none
            self.checked[key] = asyncio.get_running_loop().time()
            while len(self.checked) > REPORTS_REMEMBERED:
                self.checked.popitem(last=False)


@dataclass(frozen=True)
class Serving:
    """The parts of the process token reads use (the fast path and the documented route alike)."""

    settings: Settings
    clock: Clock
    db: Database
    keyring: Keyring
    cache: Cache
    reads: ReadCounter
    refresher: Refresher
    upstream: Upstream
    reports: Reports = field(default_factory=Reports)
    misses: Batches[str, SellerView] = field(init=False)  # the cache's misses, read together

    def __post_init__(self) -> None:
        object.__setattr__(self, "misses", Batches(partial(_read, self), MISSES_PER_READ))


# Response header set when the token served is valid but its seller needs attention.
WARNING_HEADER = "Broker-Token-Warning"
WARNING = WARNING_HEADER.lower().encode()
NO_STORE = ((b"cache-control", b"no-store"), (b"pragma", b"no-cache"))  # never cache a token
POLL_SECONDS = 0.05
ONE_SECOND = timedelta(seconds=1)  # what a read asks at least (min_ttl 0 or 1)


@dataclass(slots=True)
class Served:
    seller: SellerView
    warning: TokenWarning | None
    at: datetime  # when it was decided (the audit counts the read in that minute)


# Token reads: primary-key lookups of the columns a view needs (the hot path's one statement,
# on the direct pool, prepared once per connection by asyncpg's statement cache), for one
# seller or for the cache misses of one turn of the event loop (`Batches`).
READ = Hot.compile(
    "token_read",
    select(*(getattr(Seller, n) for n in SellerView.__slots__ if n not in ("body", "head"))).where(
        Seller.seller_id == any_(bindparam("seller_ids"))
    ),
)
MISSES_PER_READ = 256


def view_of(flow: Serving, seller: asyncpg.Record) -> SellerView:
    """A seller row as token reads see it: the access token decrypted, the reply serialized."""
    access_token = (
        flow.keyring.open_column(
            Seller.access_token, seller["seller_id"], seller["client_id"], seller["access_token"]
        )
        if seller["access_token"] is not None
        else None
    )
    body = (
        TokenResponse(
            access_token=access_token,
            expires_at=seller["expires_at"],
            mp_user_id=seller["mp_user_id"],
            live_mode=seller["live_mode"],
            scope=seller["scope"],
        )
        .model_dump_json()
        .encode()
        if access_token is not None
        else b""
    )
    head = (
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *NO_STORE,
    )
    return SellerView(**{**dict(seller), "access_token": access_token, "body": body, "head": head})


async def _read(flow: Serving, seller_ids: list[str]) -> dict[str, SellerView]:
    """These sellers from PostgreSQL, into the cache (a load that began before a change to a
    row does not store it: `Cache.begin`)."""
    begun = flow.cache.begin()
    async with db.direct(flow.db.direct) as connection:
        rows = await connection.fetch(READ.sql, *READ.args(seller_ids=seller_ids))
    views = {}
    for row in rows:
        view = views[row["seller_id"]] = view_of(flow, row)
        flow.cache.store_seller(view, begun)
    return views


async def _load(flow: Serving, seller_id: str, *, fresh: bool = False) -> SellerView:
    """The seller from the cache, else from PostgreSQL: a miss is read with the other misses
    of its turn of the event loop; `fresh` (a decision to take) reads now, on its own, what
    PostgreSQL says after this moment."""
    if fresh:
        view = (await _read(flow, [seller_id])).get(seller_id)
    else:
        view = flow.cache.seller(seller_id) or await flow.misses.get(seller_id)
    if view is None or not _servable(view):
        raise SellerNotFound(f"No linked seller {seller_id!r}.")
    return view


async def _load_for(
    flow: Serving, key: KeyView, seller_id: str, *, fresh: bool = False
) -> SellerView:
    """`_load` for a key that may be limited to applications: before anything is refreshed or
    said about the seller, one outside them is a 403, the same as one that does not exist."""
    try:
        view = await _load(flow, seller_id, fresh=fresh)
    except SellerNotFound:
        apikeys.authorize_application(key, None)
        raise
    apikeys.authorize_application(key, view.client_id)
    return view


def _servable(seller: SellerView) -> bool:
    return seller.status != Status.UNLINKED and seller.access_token is not None


def _wanted(min_ttl: int) -> timedelta:
    return ONE_SECOND if min_ttl <= 1 else timedelta(seconds=min_ttl)


def _warning(seller: SellerView) -> TokenWarning | None:
    if seller.status == Status.RELINK_REQUIRED:
        return TokenWarning.RELINK_REQUIRED
    return TokenWarning.REFRESH_FAILING if seller.refresh_failures else None


def answer_at_once(
    flow: Serving, key: KeyView, seller_id: str, min_ttl: int
) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    """`answer` when the cache holds what it needs, decided without awaiting anything (the hot
    path: no coroutine per step); None for anything else, which `answer` then reads and
    decides. A refusal it can tell at once (scope, namespace, min_ttl) it raises itself."""
    apikeys.authorize(key, "tokens:read", seller_id)
    if min_ttl > flow.settings.broker_min_ttl_max_seconds:
        # Refused rather than lowered: the caller would believe it got what it asked for.
        raise InvalidRequest(f"min_ttl is at most {flow.settings.broker_min_ttl_max_seconds}.")
    seller = flow.cache.seller(seller_id)
    if seller is None or not _servable(seller) or not apikeys.may_use(key, seller.client_id):
        return None
    now = flow.clock()
    if seller.expires_at - now < _wanted(min_ttl):
        return None
    return _reply(flow, key, Served(seller, _warning(seller), now))


async def answer(
    flow: Serving, key: KeyView, seller_id: str, min_ttl: int
) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """A token read once the caller is known: the body and headers of its 200 (the documented
    route wraps them in a Response, the fast path sends them as they are)."""
    reply = answer_at_once(flow, key, seller_id, min_ttl)
    if reply is not None:
        return reply
    return _reply(flow, key, await read_token(flow, key, seller_id, min_ttl))


def _reply(flow: Serving, key: KeyView, served: Served) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    flow.reads.add(key.name, served.seller.seller_id, served.seller.client_id, served.at)
    # The body and its headers were built once, when the seller was loaded: no per-read work.
    headers = list(served.seller.head)
    if served.warning:
        headers.append((WARNING, served.warning.encode()))
    return served.seller.body, headers


async def serve(flow: Serving, key: KeyView, seller_id: str, min_ttl: int) -> Response:
    body, headers = await answer(flow, key, seller_id, min_ttl)
    response = Response(body)
    response.raw_headers = headers
    return response


async def read_token(flow: Serving, key: KeyView, seller_id: str, min_ttl: int) -> Served:
    """The seller's token, refreshed first when less than `min_ttl` seconds remain."""
    wanted = _wanted(min_ttl)
    first = await _load_for(flow, key, seller_id)
    now = flow.clock()
    if first.expires_at - now >= wanted:
        return Served(first, _warning(first), now)  # the hot path: usually from memory
    # Something to decide: from here on, only what PostgreSQL says now.
    first = await _load(flow, seller_id, fresh=True)
    seller = first
    if first.status == Status.LINKED and first.expires_at - flow.clock() < wanted:
        outcome = await flow.refresher.refresh(seller_id, on_read=True)
        if outcome == Outcome.BUSY:
            seller = await _wait_for_other_refresh(flow, first)
        else:
            seller = await _load(flow, seller_id, fresh=True)
        now = flow.clock()
        if (
            seller.version != first.version
            and seller.status == Status.LINKED
            and seller.expires_at > now
        ):
            return Served(seller, None, now)  # a fresh pair, even if it cannot meet min_ttl
    now = flow.clock()
    if seller.expires_at - now >= wanted:
        return Served(seller, _warning(seller), now)
    cooldown = timedelta(seconds=flow.settings.broker_on_read_cooldown_seconds)
    refreshed_lately = (
        seller.last_refreshed_at is not None and seller.last_refreshed_at > now - cooldown
    )
    if seller.status == Status.LINKED and refreshed_lately and seller.expires_at > now:
        return Served(seller, None, now)  # the pair another caller just got; no second refresh
    if seller.status == Status.RELINK_REQUIRED:
        raise RelinkRequired(str(seller.status_reason))
    retry_after = cooldown.total_seconds()
    if seller.attempt_sent_at is not None:
        retry_after = (seller.attempt_sent_at + cooldown - now).total_seconds()
    raise UpstreamUnavailable(
        "The token cannot be refreshed right now.",
        headers={"Retry-After": str(max(1, int(retry_after) + 1))},
    )


async def for_call(flow: Serving, key: KeyView, seller_id: str, min_ttl: int) -> SellerView:
    """The seller's token for a call made for it (the proxy): refreshed first like a read with
    `min_ttl`; a seller to link again, or unlinked, is `RelinkRequired` (nothing is sent for
    it, although a token read would still serve a valid token with a warning)."""
    known = flow.cache.seller(seller_id) or await flow.misses.get(seller_id)
    if known is not None and known.status == Status.UNLINKED:
        apikeys.authorize_application(key, known.client_id)
        raise RelinkRequired("unlinked")
    seller = (await read_token(flow, key, seller_id, min_ttl)).seller
    if seller.status == Status.RELINK_REQUIRED:
        raise RelinkRequired(str(seller.status_reason))
    return seller


async def seller_now(flow: Serving, seller_id: str) -> SellerView | None:
    """What PostgreSQL says of the seller now (the cache is not asked, but updated)."""
    return (await _read(flow, [seller_id])).get(seller_id)


async def _wait_for_other_refresh(flow: Serving, before: SellerView) -> SellerView:
    """Another process holds the lease: wait (bounded) until it stores or lets go."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + flow.upstream.mercadopago.timeout + LEASE_MARGIN_SECONDS
    while True:
        seller = await _load(flow, before.seller_id, fresh=True)
        lease_held = seller.lease_until is not None and seller.lease_until >= flow.clock()
        if seller.version != before.version or not lease_held or loop.time() >= give_up:
            return seller
        await asyncio.sleep(POLL_SECONDS)


async def report_invalid(flow: Serving, key: KeyView, seller_id: str) -> None:
    """A caller says Mercado Pago refused the token: check it, and mark the seller if revoked."""
    seller = await _load_for(flow, key, seller_id, fresh=True)
    await flow.reports.once((seller_id, seller.version), lambda: _check_reported(flow, seller))


async def _check_reported(flow: Serving, seller: SellerView) -> None:
    access_token = seller.access_token
    app = flow.upstream.apps.by_client_id.get(seller.client_id)
    if access_token is None or app is None:  # `_load` never returns an unlinked seller
        raise SellerNotFound(f"No linked seller {seller.seller_id!r}.")
    try:
        check = await flow.upstream.mercadopago.check_token(app.api_url, access_token, app.name)
    except TransientUpstreamError:
        raise UpstreamUnavailable("Mercado Pago could not confirm the token now.") from None
    if check != TokenCheck.REVOKED:
        return  # it works, or a 403 (a scope, not a dead grant): nothing changes
    # Only the token we checked: a refresh that landed meanwhile made it moot.
    if await sellers.mark_relink_required(
        flow.db.sessions,
        flow.settings,
        flow.clock(),
        seller.seller_id,
        seller.version,
        Reason.REVOKED,
    ):
        log.warning("seller.revoked", extra={"fields": {"seller_id": seller.seller_id}})
