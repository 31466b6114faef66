"""Seller lifecycle changes outside the link and refresh flows."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from datetime import datetime, timedelta

from sqlalchemy import Select, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core.crypto import Keyring, context
from service.core.db import transaction
from service.core.errors import SellerNotFound
from service.core.models import Seller
from service.core.runtime import Runtime
from service.core.schemas import SellerStatus
from service.lifecycle import audit, events
from service.refresh.engine import fingerprint

log = logging.getLogger("broker.sellers")


async def unlink(
    rt: Runtime,
    seller_id: str,
    reason: str,
    expected_version: int | None = None,
    actor: str = "system",
) -> bool:
    """Destroy the stored tokens and keep the row, as `unlinked`, for its history.

    The rotation `version` moves, so a refresh in flight cannot store a pair back into an
    unlinked row. Mercado Pago has no revoke endpoint: this is local only.
    """
    conditions = [Seller.seller_id == seller_id, Seller.status != "unlinked"]
    if expected_version is not None:
        conditions.append(Seller.version == expected_version)
    async with transaction(rt.sessions) as session:
        result = await session.execute(
            update(Seller)
            .where(*conditions)
            .values(
                status="unlinked",
                status_reason=reason,
                access_token=None,
                refresh_token=None,
                next_refresh_at=None,
                lease_owner=None,
                lease_until=None,
                version=Seller.version + 1,
                updated_at=rt.clock(),
            )
            .returning(Seller.version, Seller.mp_user_id)
        )
        row = result.one_or_none()
        done = row is not None
        if row is not None:
            audit.record(session, rt.clock(), actor, "seller.unlinked", seller_id, reason)
            events.emit(
                session,
                rt.settings,
                rt.clock(),
                "seller.unlinked",
                seller_id,
                row.version,
                status="unlinked",
                reason=reason,
                mp_user_id=row.mp_user_id,
            )
    if done:
        log.warning("seller.unlinked", extra={"fields": {"seller_id": seller_id, "reason": reason}})
    return done


async def status(rt: Runtime, seller_id: str) -> SellerStatus:
    """What the admin routes show of a seller: its status and expiries, never a secret."""
    async with rt.sessions() as session:
        seller = await session.get(Seller, seller_id)
    if seller is None:
        raise SellerNotFound(f"No seller {seller_id!r}.")
    return SellerStatus.of(seller)


def page_query(
    namespace: str | None,
    status: str | None,
    expiring_before: datetime | None,
    cursor: str | None,
    limit: int,
) -> Select[Seller]:
    """One page of sellers in seller_id order (one row more than `limit`: is there a next?)."""
    stmt = select(Seller).order_by(Seller.seller_id).limit(limit + 1)
    if namespace:
        stmt = stmt.where(Seller.seller_id.startswith(namespace, autoescape=True))
    if status is not None:
        stmt = stmt.where(Seller.status == status)
    if expiring_before is not None:
        stmt = stmt.where(Seller.expires_at < expiring_before)
    if cursor is not None:
        stmt = stmt.where(Seller.seller_id > cursor)
    return stmt


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
                    .where(Seller.status == "linked", Seller.seller_id > cursor)
                    .order_by(Seller.seller_id)
                    .limit(batch_size)
                    .with_for_update(skip_locked=True)
                )
            )
            for seller in rows:
                assert seller.refresh_token is not None
                token = keyring.open(
                    seller.refresh_token,
                    context("sellers", seller.seller_id, "refresh_token", seller.client_id),
                )
                seller.attempt_fingerprint = fingerprint(token)
                seller.attempt_outcome = "unknown"
                seller.next_refresh_at = now + spread * random.random()  # noqa: S311
                marked += 1
        if not rows:
            break
        cursor = rows[-1].seller_id
        if report:
            report(marked, total)
    log.warning("sellers.marked_restored", extra={"fields": {"sellers": marked}})
    return marked


async def _count_linked(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.count()).where(Seller.status == "linked")) or 0)
