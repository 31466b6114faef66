"""The seller lifecycle: the one module that writes a seller's status, token pair, failure
counters and rotation `version`.

Every transition is a function here:

    store_linked              first link and relink (the callback's exchange)
    store_refreshed_healthy   a refreshed pair, the common case in one statement
    store_refreshed           a refreshed pair otherwise (`recovered` over relink_required)
    record_failure            a refresh failed and the grant is not blamed
    mark_relink_required      the grant is dead: `rotation_lost` or `revoked`
    unlink                    tokens destroyed, the row kept as `unlinked`
    mark_restored             after a restore: every token possibly rotated since
    reseal                    the pair under the primary key (not a rotation)

Other modules read sellers freely; besides these, only the refresh engine writes a seller, and
only its lease and attempt columns (`service/refresh/engine.py`). tests/test_layout.py fails
when another module writes a column this one owns.

A token reply may omit fields, and what that means is decided once, in `sealed_pair`: an
omitted or empty refresh token, scope or public key, and an omitted live mode, are `None`.
A refresh keeps the stored value for each `None`; a link replaces them all (a new grant says
nothing about the old one's scope) and must carry a refresh token.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

import asyncpg
from sqlalchemy import (
    Boolean,
    DateTime,
    Select,
    bindparam,
    func,
    insert,
    literal_column,
    null,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core.applications import Applications
from service.core.config import Settings
from service.core.crypto import Keyring, fingerprint
from service.core.db import Hot, const, transaction
from service.core.domain import AttemptOutcome, EventType, KeyView, Reason, Status
from service.core.errors import SellerNotFound
from service.core.mercadopago import TokenSet
from service.core.models import AuditEvent, Seller
from service.core.runtime import Clock, Database
from service.core.schemas import SellerStatus
from service.lifecycle import audit, events
from service.refresh import policy
from service.serving.apikeys import authorize_application

log = logging.getLogger("broker.sellers")


@dataclass(frozen=True)
class Admin:
    """The parts of the process the admin routes use."""

    settings: Settings
    clock: Clock
    db: Database


class Stored(StrEnum):
    REFRESHED = "refreshed"
    RECOVERED = "recovered"  # a late success over a relink_required set meanwhile
    SUPERSEDED = "superseded"  # the version moved (a relink, an unlink): this pair is not needed


@dataclass(frozen=True)
class Pair:
    """A new token pair sealed for its row, and what came with it; `None`: the reply omitted it."""

    access_token: str
    refresh_token: str | None
    expires_at: datetime
    next_refresh_at: datetime
    scope: str | None
    public_key: str | None
    live_mode: bool | None


def sealed_pair(
    keyring: Keyring,
    settings: Settings,
    seller_id: str,
    client_id: str,
    tokens: TokenSet,
    sent_at: datetime,
) -> Pair:
    """The stored form of a token reply. Lifetimes count from when the request was sent."""
    return Pair(
        access_token=keyring.seal_column(
            Seller.access_token, seller_id, client_id, tokens.access_token
        ),
        refresh_token=keyring.seal_column(
            Seller.refresh_token, seller_id, client_id, tokens.refresh_token
        )
        if tokens.refresh_token
        else None,
        expires_at=sent_at + timedelta(seconds=tokens.expires_in),
        next_refresh_at=policy.next_refresh_at(sent_at, tokens.expires_in, settings),
        scope=tokens.scope or None,  # an empty value says no more than an absent one
        public_key=tokens.public_key or None,
        live_mode=tokens.live_mode,
    )


async def _locked(session: AsyncSession, seller_id: str) -> Seller | None:
    """The seller's row under a row lock until the transaction ends: a concurrent transition
    waits, then sees what this one wrote (every guard below is checked under it)."""
    return await session.get(Seller, seller_id, with_for_update=True)


# -- linking --------------------------------------------------------------------------------


def store_linked(
    session: AsyncSession,
    settings: Settings,
    now: datetime,
    seller: Seller | None,
    *,
    seller_id: str,
    client_id: str,
    mp_user_id: int,
    live_mode: bool,
    pair: Pair,
) -> Seller:
    """The first pair of a link or relink, into the caller's unit of work. `seller` is the row
    as read under lock (None: a first link). Audit and event say `linked` or `relinked`."""
    if pair.refresh_token is None:
        raise ValueError("a link must carry a refresh token")
    relinked = seller is not None
    if seller is None:
        seller = Seller(seller_id=seller_id, version=0, linked_at=now)
        session.add(seller)
    seller.client_id = client_id
    seller.mp_user_id = mp_user_id
    seller.status, seller.status_reason = Status.LINKED, None
    seller.access_token, seller.refresh_token = pair.access_token, pair.refresh_token
    seller.scope, seller.public_key, seller.live_mode = pair.scope, pair.public_key, live_mode
    seller.expires_at, seller.next_refresh_at = pair.expires_at, pair.next_refresh_at
    seller.last_refreshed_at = None
    seller.refresh_failures, seller.last_refresh_error = 0, None
    seller.lease_owner = seller.lease_until = None
    seller.version = (seller.version or 0) + 1
    seller.linked_at = seller.updated_at = now
    event = EventType.RELINKED if relinked else EventType.LINKED
    audit.record(
        session,
        now,
        "seller",
        event,
        seller_id,
        f"mp_user_id={mp_user_id}",
        application=settings.apps.name_of(client_id),
    )
    events.emit_for(session, settings, now, event, seller)
    return seller


# -- refresh --------------------------------------------------------------------------------


def _store_healthy() -> Hot:
    """The common store in one statement (one round trip, atomic): the pair, where the seller is
    still at the claimed `version`, linked and not failing, and its audit row. `None` keeps the
    stored value (see `sealed_pair`)."""
    now = bindparam("now", type_=DateTime(timezone=True))
    stored = (
        update(Seller)
        .where(
            Seller.seller_id == bindparam("seller_id"),
            Seller.version == bindparam("version"),
            Seller.status == const(Status.LINKED),
            Seller.refresh_failures == literal_column("0"),
        )
        .values(
            access_token=bindparam("access_token"),
            refresh_token=func.coalesce(bindparam("refresh_token"), Seller.refresh_token),
            expires_at=bindparam("expires_at", type_=DateTime(timezone=True)),
            next_refresh_at=bindparam("next_refresh_at", type_=DateTime(timezone=True)),
            scope=func.coalesce(bindparam("scope"), Seller.scope),
            public_key=func.coalesce(bindparam("public_key"), Seller.public_key),
            live_mode=func.coalesce(bindparam("live_mode", type_=Boolean()), Seller.live_mode),
            last_refreshed_at=now,
            updated_at=now,
            last_refresh_error=null(),
            attempt_outcome=const(AttemptOutcome.OK),
            lease_owner=null(),
            lease_until=null(),
            version=Seller.version + literal_column("1"),
        )
        .returning(Seller.seller_id)
        .cte("stored")
    )
    audited = select(
        now,
        const("system"),
        const(f"seller.{Stored.REFRESHED}"),
        stored.c.seller_id,
        bindparam("application", type_=AuditEvent.application.type),
    )
    return Hot.compile(
        "store_healthy",
        insert(AuditEvent)
        .from_select(["at", "actor", "action", "seller_id", "application"], audited)
        .returning(AuditEvent.seller_id),
    )


STORE_HEALTHY = _store_healthy()


async def store_refreshed_healthy(
    connection: asyncpg.Connection,
    seller_id: str,
    version: int,
    pair: Pair,
    now: datetime,
    application: str,
) -> bool:
    """A refreshed pair when the seller is linked, not failing and still at `version`; False
    when any of that is not so (then `store_refreshed` decides)."""
    stored = await connection.fetchval(
        STORE_HEALTHY.sql,
        *STORE_HEALTHY.args(
            seller_id=seller_id,
            version=version,
            access_token=pair.access_token,
            refresh_token=pair.refresh_token,
            expires_at=pair.expires_at,
            next_refresh_at=pair.next_refresh_at,
            scope=pair.scope,
            public_key=pair.public_key,
            live_mode=pair.live_mode,
            now=now,
            application=application,
        ),
    )
    return stored is not None


async def store_refreshed(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    now: datetime,
    seller_id: str,
    version: int,
    pair: Pair,
) -> Stored:
    """A refreshed pair whatever the seller's state, guarded by the `version` read at claim
    time: a late success wins even over a relink_required set meanwhile."""
    async with transaction(sessions) as session:
        seller = await _locked(session, seller_id)
        if seller is None or seller.version != version:
            return Stored.SUPERSEDED
        recovered = seller.status == Status.RELINK_REQUIRED
        was_failing = recovered or seller.refresh_failures > 0
        seller.access_token = pair.access_token
        if pair.refresh_token is not None:
            seller.refresh_token = pair.refresh_token
        seller.expires_at, seller.next_refresh_at = pair.expires_at, pair.next_refresh_at
        if pair.scope is not None:
            seller.scope = pair.scope
        if pair.public_key is not None:
            seller.public_key = pair.public_key
        if pair.live_mode is not None:
            seller.live_mode = pair.live_mode
        seller.status, seller.status_reason = Status.LINKED, None
        seller.last_refreshed_at = seller.updated_at = now
        seller.refresh_failures, seller.last_refresh_error = 0, None
        seller.attempt_outcome = AttemptOutcome.OK
        seller.lease_owner = seller.lease_until = None
        seller.version = version + 1
        stored = Stored.RECOVERED if recovered else Stored.REFRESHED
        audit.record(
            session,
            now,
            "system",
            f"seller.{stored}",
            seller_id,
            application=settings.apps.name_of(seller.client_id),
        )
        if was_failing:  # closes a token.refresh_failed or a relink_required
            events.emit_for(session, settings, now, EventType.RECOVERED, seller)
    return stored


async def record_failure(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    now: datetime,
    seller_id: str,
    lease_owner: str,
    outcome: AttemptOutcome,
    error: str,
    *,
    back_off: bool,
) -> None:
    """A refresh failed and the seller's grant is not blamed: its status stays, the lease is
    given back, and it counts as failing (reads carry the warning; the streak's first failure
    is an event). `back_off`: retry later (a transient error); otherwise it stays due (refused
    by the application's breaker, which holds every refresh until it closes). Nothing happens
    if `lease_owner` no longer holds the seller."""
    async with transaction(sessions) as session:
        seller = await _locked(session, seller_id)
        if seller is None or seller.lease_owner != lease_owner:
            return
        seller.refresh_failures += 1
        seller.last_refresh_error = error
        seller.attempt_outcome = outcome
        if back_off:
            seller.next_refresh_at = now + policy.backoff(
                seller.refresh_failures,
                settings.broker_backoff_base_seconds,
                settings.broker_backoff_max_seconds,
            )
        seller.lease_owner = seller.lease_until = None
        if seller.refresh_failures == 1:  # once per failing streak, not once per retry
            events.emit_for(session, settings, now, EventType.REFRESH_FAILED, seller)


async def mark_relink_required(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    now: datetime,
    seller_id: str,
    version: int,
    reason: Reason,
    *,
    refresh_error: str | None = None,
    lease_owner: str | None = None,
) -> bool:
    """The grant is dead: the seller must link again. Only if the seller is still at `version`
    (False otherwise: someone rotated meanwhile, a race and not a revocation). A refresh that
    Mercado Pago refused says so with `refresh_error` (the failure counts) and gives back its
    lease (`lease_owner`)."""
    async with transaction(sessions) as session:
        seller = await _locked(session, seller_id)
        if seller is None or seller.version != version:
            return False
        seller.status, seller.status_reason = Status.RELINK_REQUIRED, reason
        seller.next_refresh_at = None
        seller.updated_at = now
        if refresh_error is not None:
            seller.attempt_outcome = AttemptOutcome.INVALID_GRANT
            seller.last_refresh_error = refresh_error
            seller.refresh_failures += 1
        if lease_owner is not None and seller.lease_owner == lease_owner:
            seller.lease_owner = seller.lease_until = None
        audit.record(
            session,
            now,
            "system",
            EventType.RELINK_REQUIRED,
            seller_id,
            reason,
            application=settings.apps.name_of(seller.client_id),
        )
        events.emit_for(session, settings, now, EventType.RELINK_REQUIRED, seller)
    return True


# -- after linking --------------------------------------------------------------------------


async def unlink(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    now: datetime,
    seller_id: str,
    reason: Reason,
    *,
    expected_version: int | None = None,
    actor: str = "system",
) -> bool:
    """Destroy the stored tokens and keep the row, as `unlinked`, for its history.

    The rotation `version` moves, so a refresh in flight cannot store a pair back into an
    unlinked row. Mercado Pago has no revoke endpoint: this is local only.
    """
    conditions = [Seller.seller_id == seller_id, Seller.status != Status.UNLINKED]
    if expected_version is not None:
        conditions.append(Seller.version == expected_version)
    async with transaction(sessions) as session:
        result = await session.execute(
            update(Seller)
            .where(*conditions)
            .values(
                status=Status.UNLINKED,
                status_reason=reason,
                access_token=None,
                refresh_token=None,
                next_refresh_at=None,
                lease_owner=None,
                lease_until=None,
                version=Seller.version + 1,
                updated_at=now,
            )
            .returning(Seller.version, Seller.mp_user_id, Seller.client_id)
        )
        row = result.one_or_none()
        if row is not None:
            application = settings.apps.name_of(row.client_id)
            audit.record(
                session,
                now,
                actor,
                EventType.UNLINKED,
                seller_id,
                reason,
                application=application,
            )
            events.emit(
                session,
                settings,
                now,
                EventType.UNLINKED,
                seller_id,
                row.version,
                application=application,
                client_id=row.client_id,
                status=Status.UNLINKED,
                reason=reason,
                mp_user_id=row.mp_user_id,
            )
    if row is not None:
        log.warning("seller.unlinked", extra={"fields": {"seller_id": seller_id, "reason": reason}})
    return row is not None


async def mark_restored(
    sessions: async_sessionmaker[AsyncSession],
    keyring: Keyring,
    now: datetime,
    spread: timedelta,
    batch_size: int = 500,
    report: Callable[[int, int], None] | None = None,
) -> int:
    """After a database restore (or a failover to a replica that lagged): treat every linked
    seller's refresh token as possibly rotated after the restore point.

    Each one's last attempt is marked as of unknown outcome with its current token, and its
    next refresh moved within `spread` from now. The refresher then re-validates them all soon:
    a token Mercado Pago already rotated answers `invalid_grant`, which the ordinary path turns
    into `relink_required` / `rotation_lost` with its event; the others simply refresh. Resumable:
    a seller already marked for its current token is skipped.
    """
    marked, cursor = 0, ""
    total = await _count_linked(sessions)
    while True:
        async with transaction(sessions) as session:
            rows = list(
                await session.scalars(
                    select(Seller)
                    .where(Seller.status == Status.LINKED, Seller.seller_id > cursor)
                    .order_by(Seller.seller_id)
                    .limit(batch_size)
                    .with_for_update(skip_locked=True)
                )
            )
            for seller in rows:
                if seller.refresh_token is None:  # never so for a linked seller
                    continue
                token = keyring.open_column(
                    Seller.refresh_token, seller.seller_id, seller.client_id, seller.refresh_token
                )
                seller.attempt_fingerprint = fingerprint(token)
                seller.attempt_outcome = AttemptOutcome.UNKNOWN
                seller.next_refresh_at = now + spread * random.random()  # noqa: S311
                marked += 1
        if not rows:
            break
        cursor = rows[-1].seller_id
        if report:
            report(marked, total)
    log.warning("sellers.marked_restored", extra={"fields": {"sellers": marked}})
    return marked


async def reseal(session: AsyncSession, keyring: Keyring, seller: Seller) -> bool:
    """Reseal the pair read in `seller` under the primary key; False (nothing written) if the
    row's `version` moved since that read. `rekey.reencrypt` reads under a row lock, so the
    guard is its second line: it holds even for a caller that reads without one. The version
    is left alone: this is not a rotation."""
    values = {}
    for column in (Seller.access_token, Seller.refresh_token):
        sealed = getattr(seller, column.key)
        if sealed is not None:
            values[column.key] = keyring.reseal_column(
                column, seller.seller_id, seller.client_id, sealed
            )
    written = await session.execute(
        update(Seller)
        .where(Seller.seller_id == seller.seller_id, Seller.version == seller.version)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return int(written.rowcount) == 1  # type: ignore[attr-defined]


# -- reads ------------------------------------------------------------------------------------


async def status(
    sessions: async_sessionmaker[AsyncSession], apps: Applications, seller_id: str
) -> SellerStatus:
    """What the admin routes show of a seller: its status and expiries, never a secret."""
    async with sessions() as session:
        seller = await session.get(Seller, seller_id)
    if seller is None:
        raise SellerNotFound(f"No seller {seller_id!r}.")
    return SellerStatus.of(seller, apps)


async def authorize_seller(
    sessions: async_sessionmaker[AsyncSession], key: KeyView, seller_id: str
) -> None:
    """For a key limited to applications: the seller must be of one of them (a seller that
    does not exist gets the same 403). Any other key: nothing to check, nothing read."""
    if key.client_ids is None:
        return
    async with sessions() as session:
        client_id = await session.scalar(
            select(Seller.client_id).where(Seller.seller_id == seller_id)
        )
    authorize_application(key, client_id)


def page_query(
    namespace: str | None,
    client_ids: frozenset[str] | None,
    status: str | None,
    expiring_before: datetime | None,
    cursor: str | None,
    limit: int,
) -> Select[Seller]:
    """One page of sellers in seller_id order (one row more than `limit`: is there a next?)."""
    stmt = select(Seller).order_by(Seller.seller_id).limit(limit + 1)
    if namespace:
        stmt = stmt.where(Seller.seller_id.startswith(namespace, autoescape=True))
    if client_ids is not None:
        stmt = stmt.where(Seller.client_id.in_(sorted(client_ids)))
    if status is not None:
        stmt = stmt.where(Seller.status == status)
    if expiring_before is not None:
        stmt = stmt.where(Seller.expires_at < expiring_before)
    if cursor is not None:
        stmt = stmt.where(Seller.seller_id > cursor)
    return stmt


async def _count_linked(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        linked = select(func.count()).where(Seller.status == Status.LINKED)
        return int(await session.scalar(linked) or 0)
