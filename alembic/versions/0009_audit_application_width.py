"""audit entries name any application: `audit_events.application` from 32 to 100 characters

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-23 09:00:00

A seller whose application is no longer configured is audited as `unconfigured:<client_id>`
(`Applications.name_of`), and a client_id may be 64 characters: 32 did not hold it, and the
change it recorded (an operator's unlink, say) failed with it. Widening a varchar rewrites
nothing in PostgreSQL (only the catalog changes), so the lock on `audit_events` is momentary
and bounded by the lock timeout; replicas of 0008 write names of at most 32 and run unchanged.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

LOCK_TIMEOUT = "SET lock_timeout = '5s'"


def upgrade() -> None:
    op.execute(LOCK_TIMEOUT)
    op.alter_column(
        "audit_events", "application", type_=sa.String(100), existing_type=sa.String(32)
    )


def downgrade() -> None:
    op.execute(LOCK_TIMEOUT)
    op.execute(  # what 32 characters cannot hold is cut, not lost with the row
        "UPDATE audit_events SET application = left(application, 32) WHERE length(application) > 32"
    )
    op.alter_column(
        "audit_events", "application", type_=sa.String(32), existing_type=sa.String(100)
    )
