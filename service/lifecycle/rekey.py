"""`broker keys reencrypt`: rewrite every sealed value under the primary encryption key.

Online and resumable: it works in small batches, each its own short transaction, and only ever
picks rows that still hold a value sealed under another key, so an interrupted run simply
continues where it stopped. Rows under a refresh lease are skipped (a later run takes them):
the refresh will write a fresh pair anyway. Each write is guarded by the row's rotation
`version` and does not bump it: re-encryption never writes an old token pair over a new one,
and never looks like a rotation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, func, not_, or_, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.elements import ColumnElement

from service.core.crypto import Keyring
from service.core.db import transaction
from service.core.models import LinkAttempt, Seller
from service.lifecycle import sellers


@dataclass
class Progress:
    total: int
    done: int = 0
    skipped_leased: int = 0


Report = Callable[[Progress], None]


def _stale(column: InstrumentedAttribute[str | None], prefix: str) -> ColumnElement[bool]:
    """A value sealed under a key other than the primary."""
    return and_(column.is_not(None), not_(column.startswith(prefix)))


def _seller_stale(prefix: str) -> ColumnElement[bool]:
    return or_(_stale(Seller.access_token, prefix), _stale(Seller.refresh_token, prefix))


async def pending(sessions: async_sessionmaker[AsyncSession], keyring: Keyring) -> int:
    prefix = f"v1.{keyring.primary}."
    async with sessions() as session:
        sellers = await session.scalar(select(func.count()).where(_seller_stale(prefix)))
        attempts = await session.scalar(
            select(func.count()).where(_stale(LinkAttempt.code_verifier, prefix))
        )
    return int(sellers or 0) + int(attempts or 0)


async def reencrypt(
    sessions: async_sessionmaker[AsyncSession],
    keyring: Keyring,
    now: Callable[[], datetime],
    batch_size: int = 200,
    report: Report | None = None,
) -> Progress:
    progress = Progress(total=await pending(sessions, keyring))
    prefix = f"v1.{keyring.primary}."
    after = ""
    while True:  # sellers, in seller_id order; a restart finds only what is left
        async with transaction(sessions) as session:
            rows = list(
                await session.scalars(
                    select(Seller)
                    .where(
                        Seller.seller_id > after,
                        or_(
                            _stale(Seller.access_token, prefix),
                            _stale(Seller.refresh_token, prefix),
                        ),
                    )
                    .order_by(Seller.seller_id)
                    .limit(batch_size)
                    # A locked row is a refresh storing right now: skip it, a later run takes it.
                    .with_for_update(skip_locked=True)
                )
            )
            for seller in rows:
                after = seller.seller_id
                if seller.lease_until is not None and seller.lease_until >= now():
                    progress.skipped_leased += 1
                    continue
                await sellers.reseal(session, keyring, seller)
                progress.done += 1
        if report:
            report(progress)
        if len(rows) < batch_size:
            break
    after = ""
    while True:
        async with transaction(sessions) as session:
            attempts = list(
                await session.scalars(
                    select(LinkAttempt)
                    .where(LinkAttempt.id > after, _stale(LinkAttempt.code_verifier, prefix))
                    .order_by(LinkAttempt.id)
                    .limit(batch_size)
                    .with_for_update(skip_locked=True)
                )
            )
            for attempt in attempts:
                after = attempt.id
                if attempt.code_verifier is not None:  # the query picks only sealed ones
                    attempt.code_verifier = keyring.reseal_column(
                        LinkAttempt.code_verifier,
                        attempt.id,
                        attempt.client_id,
                        attempt.code_verifier,
                    )
                progress.done += 1
        if report:
            report(progress)
        if len(attempts) < batch_size:
            break
    return progress
