"""several Mercado Pago applications: keys limited to applications, per-application work queue

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-15 09:00:00

Rows already name their application by `client_id` (which every sealed value's associated data
binds), so existing sellers, links and attempts become the `default` application, or whichever
declared application has their `client_id`, without rewriting a row.

Safe under a rolling upgrade (replicas of 0006 and 0007 running at once against this schema):
- `api_keys.client_ids` and `audit_events.application` are nullable columns without a default:
  a catalog change, no table rewrite; old code neither reads nor writes them (NULL: all
  applications, as before).
- `link_attempts.outcome` also allows `account_unknown` (the check is replaced NOT VALID, then
  validated without blocking writes). Old code never writes it.
- The refresher claims per application now, so its work queue is indexed by
  (client_id, next_refresh_at): built CONCURRENTLY (no lock that blocks writes on `sellers`),
  then the old index is dropped CONCURRENTLY. Old replicas' claims use the new index as well
  (they filter on one client_id too).
Each statement that needs a lock waits at most `lock_timeout` for it, so a long transaction
elsewhere makes the migration fail (to be run again) instead of queueing every query behind it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LOCK_TIMEOUT = "SET lock_timeout = '5s'"
# Written out, not imported: a revision is history (tests/test_schema.py checks the enum).
OUTCOMES = (
    "exchanging",
    "linked",
    "relinked",
    "denied",
    "exchange_failed",
    "upstream_unavailable",
    "account_mismatch",
    "live_mode_mismatch",
)
OLD_QUEUE = "ix_sellers_next_refresh_at_linked"
NEW_QUEUE = "ix_sellers_client_id_next_refresh_at_linked"


def _outcome_check(values: Sequence[str]) -> None:
    allowed = ", ".join(f"'{v}'" for v in values)
    op.execute("ALTER TABLE link_attempts DROP CONSTRAINT ck_link_attempts_outcome")
    op.execute(
        "ALTER TABLE link_attempts ADD CONSTRAINT ck_link_attempts_outcome"
        f" CHECK (outcome IN ({allowed})) NOT VALID"
    )


def _drop_if_invalid(index: str) -> None:
    """A concurrent build that failed half-way leaves an invalid index: drop it, build again."""
    invalid = op.get_bind().scalar(
        sa.text(
            "SELECT NOT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE c.relname = :name"
        ),
        {"name": index},
    )
    if invalid:
        op.execute(f"DROP INDEX CONCURRENTLY {index}")


def upgrade() -> None:
    op.execute(LOCK_TIMEOUT)
    op.add_column("api_keys", sa.Column("client_ids", postgresql.ARRAY(sa.Text), nullable=True))
    op.add_column("audit_events", sa.Column("application", sa.String(32), nullable=True))
    _outcome_check((*OUTCOMES, "account_unknown"))
    with op.get_context().autocommit_block():
        op.execute(LOCK_TIMEOUT)
        op.execute("ALTER TABLE link_attempts VALIDATE CONSTRAINT ck_link_attempts_outcome")
        _drop_if_invalid(NEW_QUEUE)
        op.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {NEW_QUEUE} ON sellers "
            "(client_id, next_refresh_at) WHERE status = 'linked'"
        )
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {OLD_QUEUE}")


def downgrade() -> None:
    op.execute(LOCK_TIMEOUT)
    op.execute(
        "UPDATE link_attempts SET outcome = 'exchange_failed' WHERE outcome = 'account_unknown'"
    )
    _outcome_check(OUTCOMES)
    op.drop_column("audit_events", "application")
    op.drop_column("api_keys", "client_ids")
    with op.get_context().autocommit_block():
        op.execute("ALTER TABLE link_attempts VALIDATE CONSTRAINT ck_link_attempts_outcome")
        op.execute(
            f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {OLD_QUEUE} ON sellers "
            "(next_refresh_at) WHERE status = 'linked'"
        )
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {NEW_QUEUE}")
