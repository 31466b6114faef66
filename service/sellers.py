"""Seller lifecycle changes outside the link and refresh flows."""

from __future__ import annotations

import logging
from datetime import datetime

from sqlalchemy import Select, select, update

from service import audit, events
from service.db import transaction
from service.models import Seller
from service.runtime import Runtime

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
