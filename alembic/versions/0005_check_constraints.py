"""CHECK constraints on every status, reason and outcome column

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 09:00:00

Safe on a live database with rows: each constraint is added NOT VALID (a brief lock, no scan:
new writes are checked from then on), then validated in a transaction of its own (a scan that
blocks neither reads nor writes). Before that, an unlink reason that an operator typed freely
(`broker sellers unlink --reason`, before the reasons were fixed) becomes
`unlinked_by_operator`; the typed text stays in that unlink's audit entry.

The values are written out here, not imported: a revision is history and must not change when
the code does. tests/test_schema.py checks that they match the code's enums.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECKS = {
    ("sellers", "status"): ("linked", "relink_required", "unlinked"),
    ("sellers", "status_reason"): (
        "rotation_lost",
        "revoked",
        "deauthorized",
        "unlinked_by_platform",
        "unlinked_by_operator",
    ),
    ("sellers", "attempt_outcome"): (
        "sent",
        "ok",
        "unknown",
        "not_sent",
        "rejected",
        "invalid_grant",
    ),
    ("link_attempts", "outcome"): (
        "exchanging",
        "linked",
        "relinked",
        "denied",
        "exchange_failed",
        "upstream_unavailable",
        "account_mismatch",
        "live_mode_mismatch",
    ),
    ("events", "type"): (
        "seller.linked",
        "seller.relinked",
        "seller.relink_required",
        "seller.unlinked",
        "seller.recovered",
        "seller.expiring_soon",
        "token.refresh_failed",
    ),
    ("event_deliveries", "state"): ("pending", "delivered", "failed"),
}


def _name(table: str, column: str) -> str:
    return f"ck_{table}_{column}"  # the models' naming convention


def upgrade() -> None:
    reasons = ", ".join(f"'{v}'" for v in CHECKS[("sellers", "status_reason")])
    freely_typed = f"status = 'unlinked' AND status_reason NOT IN ({reasons})"
    op.execute(f"UPDATE sellers SET status_reason = 'unlinked_by_operator' WHERE {freely_typed}")  # noqa: S608
    for (table, column), values in CHECKS.items():
        allowed = ", ".join(f"'{v}'" for v in values)
        op.execute(
            f"ALTER TABLE {table} ADD CONSTRAINT {_name(table, column)}"
            f" CHECK ({column} IN ({allowed})) NOT VALID"
        )
    with op.get_context().autocommit_block():
        for table, column in CHECKS:
            op.execute(f"ALTER TABLE {table} VALIDATE CONSTRAINT {_name(table, column)}")


def downgrade() -> None:
    for table, column in CHECKS:
        op.execute(f"ALTER TABLE {table} DROP CONSTRAINT {_name(table, column)}")
