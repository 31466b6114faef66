"""Seller lifecycle changes outside the link and refresh flows."""

from __future__ import annotations

import logging

from sqlalchemy import update

from service import audit
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
        )
        done = bool(result.rowcount)  # type: ignore[attr-defined]
        if done:
            audit.record(session, rt.clock(), actor, "seller.unlinked", seller_id, reason)
    if done:
        log.warning("seller.unlinked", extra={"fields": {"seller_id": seller_id, "reason": reason}})
    return done
