"""drop api_keys.last_used_at (never written); stored namespaces end in `/`

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 09:00:00

`last_used_at` was never written: a write per token read would cost the hot path a
transaction, and the audit trail already says which key did what.

A namespace is whole seller-id segments ending in `/` (`billing/` must not reach
`billing2/…`). Keys created before that check may hold a bare `billing`; the code read those
as if they ended in `/`. Here they gain it once, so the code reads what is stored. The
downgrade keeps the `/`: the old code reads `billing/` the same way.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_column("api_keys", "last_used_at")
    op.execute(
        "UPDATE api_keys SET namespace = namespace || '/' "
        "WHERE namespace <> '' AND namespace NOT LIKE '%/'"
    )


def downgrade() -> None:
    op.add_column(
        "api_keys",
        sa.Column("last_used_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
    )
