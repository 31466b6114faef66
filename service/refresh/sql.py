"""The statements every refresh of a wave runs, on the direct asyncpg pool (`db.Hot`).

SQLAlchemy's statement building and execution cost more CPU than PostgreSQL spends on these,
so they are built here once, against the models, and run as compiled text with named
arguments. The store of a refreshed pair is the seller lifecycle's (`STORE_HEALTHY`).
"""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    DateTime,
    Interval,
    Text,
    bindparam,
    case,
    exists,
    func,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.sql.dml import Update
from sqlalchemy.sql.elements import ColumnElement

from service.core.db import Hot, const
from service.core.domain import AttemptOutcome, Status
from service.core.models import AppBreaker, RefreshPause, Seller

NOW = bindparam("now", type_=DateTime(timezone=True))
LEASE_UNTIL = bindparam("lease_until", type_=DateTime(timezone=True))
GRACE = bindparam("grace", type_=Interval())  # the late-reply grace (see `free`)


def free() -> ColumnElement[bool]:
    """Whether nobody may be refreshing the seller. A lease that lapsed over an attempt still
    marked `sent` (its owner never said how it ended: it may be paused, or its clock may lag;
    an owner that died is taken over sooner, `owners.py`) stays taken for one grace more. The
    request's own deadline is shorter than a lease, so by then any reply to it has landed or
    been dropped, and re-sending that refresh token cannot burn a pair that is still on its way
    to be stored."""
    still_sent = case(
        (Seller.attempt_outcome == const(AttemptOutcome.SENT), GRACE),
        else_=literal_column("interval '0'"),
    )
    return or_(Seller.lease_until.is_(None), Seller.lease_until < NOW - still_sent)


def _claim(where: ColumnElement[bool]) -> Update:
    return (
        update(Seller)
        .where(where)
        .values(
            lease_owner=bindparam("owner"),
            lease_until=LEASE_UNTIL,
            # If this owner dies, the background refresher retries as soon as the seller is
            # free again (an on-read claim may be of a seller not due for days).
            next_refresh_at=func.least(
                func.coalesce(Seller.next_refresh_at, LEASE_UNTIL), LEASE_UNTIL + GRACE
            ),
        )
        .returning(
            Seller.seller_id,
            Seller.client_id,
            Seller.version,
            Seller.refresh_token,
            Seller.attempt_fingerprint,
            Seller.attempt_outcome,
        )
    )


_linked = Seller.status == const(Status.LINKED)

# One application's oldest `limit` due sellers, on its part of the partial index (client_id,
# next_refresh_at): a paused or backed-up application is never scanned past by another's
# claim. SKIP LOCKED: concurrent refreshers each take different due rows, never waiting.
_due = (
    select(Seller.seller_id)
    .where(
        _linked,
        Seller.client_id == bindparam("client_id"),
        Seller.next_refresh_at <= NOW,
        free(),
        ~exists().where(
            AppBreaker.client_id == bindparam("client_id"), AppBreaker.probe_after > NOW
        ),
        ~exists().select_from(RefreshPause),  # `broker refresher pause`
    )
    .order_by(Seller.next_refresh_at)
    .limit(bindparam("limit"))
    .with_for_update(skip_locked=True)
)
CLAIM_DUE = Hot.compile("claim_due", _claim(Seller.seller_id.in_(_due.scalar_subquery())))

# One seller, on demand, of any configured application; `cooldown`, when set: at most one
# on-read refresh per window.
_cooldown = bindparam("cooldown", type_=DateTime(timezone=True))
CLAIM_ONE = Hot.compile(
    "claim_one",
    _claim(
        (Seller.seller_id == bindparam("seller_id"))
        & _linked
        & (Seller.client_id == func.any(bindparam("client_ids", type_=ARRAY(Text()))))
        & free()
        & or_(
            _cooldown.is_(None),
            Seller.attempt_sent_at.is_(None),
            Seller.attempt_sent_at < _cooldown,
        )
    ),
)

# After a failed claim: false when someone holds the seller (NULL: no such seller).
IS_FREE = Hot.compile("is_free", select(free()).where(Seller.seller_id == bindparam("seller_id")))

# Each claimed seller's attempt, written in the claim's transaction (one executemany).
RECORD_ATTEMPT = Hot.compile(
    "record_attempt",
    update(Seller)
    .where(Seller.seller_id == bindparam("seller_id"))
    .values(
        attempt_fingerprint=bindparam("fingerprint"),
        attempt_sent_at=bindparam("sent_at", type_=DateTime(timezone=True)),
        attempt_outcome=const(AttemptOutcome.SENT),
    ),
)
