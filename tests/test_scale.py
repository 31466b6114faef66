"""At a million sellers the hot queries stay on their indexes (checked with EXPLAIN)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg

from service.lifecycle.events import expiring_query
from service.refresh.sql import CLAIM_DUE
from service.serving.tokens import READ
from tests.support import CLIENT_ID, Broker
from tests.support.db import plan

SELLERS = 1_000_000


async def test_due_work_and_token_reads_use_indexes_with_a_million_sellers(
    broker: Broker, sql: asyncpg.Connection
) -> None:
    # Cheap rows (the ciphertexts are placeholders: only the plan matters here). A few are due.
    await sql.execute(
        """
        INSERT INTO sellers (seller_id, client_id, mp_user_id, status, access_token,
            refresh_token, live_mode, expires_at, next_refresh_at, version, linked_at,
            updated_at, refresh_failures)
        SELECT 'seller-' || lpad(n::text, 7, '0'), $2, n,
               CASE WHEN n % 50 = 0 THEN 'unlinked' ELSE 'linked' END, 'x', 'x', true,
               now() + (n % 180) * interval '1 day',
               now() + (n % 1000) * interval '1 hour' - interval '10 hours', 1, now(), now(),
               CASE WHEN n % 5000 = 1 THEN 2 ELSE 0 END  -- a few failing
        FROM generate_series(1, $1::int) AS n
        """,
        SELLERS,
        CLIENT_ID,
    )
    await sql.execute("ANALYZE sellers")
    now = datetime.now(UTC)
    # The claim as the refresher sends it.
    claim = CLAIM_DUE.args(
        owner="bench-owner",
        lease_until=now + timedelta(minutes=1),
        now=now,
        client_id=CLIENT_ID,
        grace=timedelta(seconds=60),
        limit=50,
    )
    due_plan = await plan(sql, CLAIM_DUE.sql, *claim)
    assert "ix_sellers_client_id_next_refresh_at_linked" in due_plan, due_plan
    assert "Seq Scan on sellers" not in due_plan, due_plan

    # The refresher's look for tokens that will lapse unrefreshed (every few minutes).
    expiring = expiring_query(now, now + timedelta(days=7)).compile(
        dialect=broker.refresher.db.engine.dialect, compile_kwargs={"render_postcompile": True}
    )
    expiring_plan = await plan(
        sql, str(expiring), *(expiring.params[name] for name in expiring.positiontup or ())
    )
    assert "ix_sellers_expires_at_at_risk" in expiring_plan, expiring_plan
    assert "Seq Scan on sellers" not in expiring_plan, expiring_plan

    for read in (
        (READ.sql, ["seller-0500000"]),
        ("SELECT * FROM sellers WHERE seller_id = $1", "x"),
    ):
        read_plan = await plan(sql, *read)  # the token read, and what session.get runs
        assert "pk_sellers" in read_plan, read_plan
        assert "Seq Scan" not in read_plan, read_plan
