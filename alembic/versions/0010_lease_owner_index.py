"""an index of leased sellers by owner, for the dead-owner takeover

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-24 09:00:00

Every refresher looks, once a second, for the owners of leases whose process is gone
(`service/refresh/owners.py`): a partial index on `lease_owner` holds only the sellers leased
now (at most the refresh concurrency of each process), so that look reads a few rows at a
million sellers, never the table. Built CONCURRENTLY (no lock that blocks writes on `sellers`);
the release before it neither reads nor needs it, and runs unchanged beside it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LOCK_TIMEOUT = "SET lock_timeout = '5s'"
INDEX = "ix_sellers_lease_owner_leased"


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(LOCK_TIMEOUT)
        # A concurrent build that failed half-way leaves an invalid index that IF NOT EXISTS
        # would keep: drop it and build again.
        valid = op.get_bind().scalar(
            sa.text("SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(:name)"),
            {"name": INDEX},
        )
        if valid is False:
            op.execute(f"DROP INDEX CONCURRENTLY {INDEX}")
        op.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {INDEX} ON sellers (lease_owner)"
            " WHERE lease_owner IS NOT NULL"
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(LOCK_TIMEOUT)
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {INDEX}")
