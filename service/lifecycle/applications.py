"""Each configured application at a glance: its sellers, breaker and refresh work queue.

One function answers both `GET /applications` and `broker applications list`.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.core.applications import Application
from service.core.domain import Status
from service.core.metrics import queue_query
from service.core.models import AppBreaker, Seller
from service.core.schemas import ApplicationSummary, ClosedBreaker, OpenBreaker, SellerCounts


async def summaries(
    session: AsyncSession, apps: Iterable[Application], now: datetime
) -> list[ApplicationSummary]:
    """One summary per application, in the order given."""
    apps = list(apps)
    client_ids = [app.client_id for app in apps]
    counts: dict[str, dict[str, int]] = {cid: dict.fromkeys(Status, 0) for cid in client_ids}
    grouped = await session.execute(
        select(Seller.client_id, Seller.status, func.count())
        .where(Seller.client_id.in_(client_ids))
        .group_by(Seller.client_id, Seller.status)
    )
    for client_id, status, total in grouped:
        counts[client_id][status] = total
    breakers = {
        row.client_id: row
        for row in await session.scalars(
            select(AppBreaker).where(AppBreaker.client_id.in_(client_ids))
        )
    }
    found = []
    for app in apps:
        next_refresh_at, backlog = (await session.execute(queue_query(app.client_id, now))).one()
        breaker = breakers.get(app.client_id)
        found.append(
            ApplicationSummary(
                name=app.name,
                client_id=app.client_id,
                auth_url=app.oauth.auth_url,
                pkce=app.pkce,
                sellers=SellerCounts.model_validate(counts[app.client_id]),
                breaker=ClosedBreaker()
                if breaker is None
                else OpenBreaker(
                    reason=breaker.reason,
                    tripped_at=breaker.tripped_at,
                    probe_after=breaker.probe_after,
                ),
                refresh_backlog=backlog,
                next_refresh_at=next_refresh_at,
            )
        )
    return found
