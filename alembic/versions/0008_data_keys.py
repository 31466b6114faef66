"""data keys wrapped by a key service (OpenBao / Vault Transit): envelope encryption

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-22 09:00:00

A new table, written only with BROKER_KEY_SERVICE set (service/core/keys.py): nothing else
changes, so replicas of 0007 run against this schema unchanged. Every value in it is wrapped
by the key service; none opens anything without it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "data_keys",
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("wrapped", sa.Text(), nullable=False),
        sa.Column("wrapped_by", sa.String(200), nullable=False),
        sa.Column(
            "created_at",
            postgresql.TIMESTAMP(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("promoted_at", postgresql.TIMESTAMP(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("key_id", name=op.f("pk_data_keys")),
    )


def downgrade() -> None:
    # The wrapped keys are the only copy of the data keys: never drop one that sealed values
    # may still need. Move back to BROKER_ENCRYPTION_KEYS first (README: key management).
    if op.get_bind().execute(sa.text("SELECT count(*) FROM data_keys")).scalar():
        raise RuntimeError("data_keys holds wrapped data keys: move off the key service first")
    op.drop_table("data_keys")
