"""notify replicas of seller and API key changes (their token caches)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 20:10:00

Triggers rather than calls in the code: every write, from any code path or an operator's SQL,
notifies inside its own transaction (delivered at commit). Lease claims and attempt bookkeeping
do not change what a token read serves, so they do not notify.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        CREATE FUNCTION broker_notify_seller() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' THEN
                PERFORM pg_notify('broker_cache', 's:' || OLD.version || ':' || OLD.seller_id);
            ELSE
                PERFORM pg_notify('broker_cache', 's:' || NEW.version || ':' || NEW.seller_id);
            END IF;
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER sellers_notify_update AFTER UPDATE ON sellers FOR EACH ROW
        WHEN (OLD.version IS DISTINCT FROM NEW.version
              OR OLD.status IS DISTINCT FROM NEW.status
              OR OLD.refresh_failures IS DISTINCT FROM NEW.refresh_failures
              OR OLD.expires_at IS DISTINCT FROM NEW.expires_at)
        EXECUTE FUNCTION broker_notify_seller()
        """
    )
    op.execute(
        """
        CREATE TRIGGER sellers_notify_delete AFTER DELETE ON sellers FOR EACH ROW
        EXECUTE FUNCTION broker_notify_seller()
        """
    )
    op.execute(
        """
        CREATE FUNCTION broker_notify_api_key() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('broker_cache', 'k:' || OLD.prefix);
            RETURN NULL;
        END $$
        """
    )
    op.execute(
        """
        CREATE TRIGGER api_keys_notify AFTER UPDATE OR DELETE ON api_keys FOR EACH ROW
        EXECUTE FUNCTION broker_notify_api_key()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER api_keys_notify ON api_keys")
    op.execute("DROP FUNCTION broker_notify_api_key()")
    op.execute("DROP TRIGGER sellers_notify_delete ON sellers")
    op.execute("DROP TRIGGER sellers_notify_update ON sellers")
    op.execute("DROP FUNCTION broker_notify_seller()")
