"""At a million sellers the hot queries stay on their indexes (checked with EXPLAIN)."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
from sqlalchemy import select
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import ClauseElement

from service.models import Seller
from service.refresh import Refresher
from tests.conftest import CLIENT_ID, Broker

SELLERS = 1_000_000


def sql_of(statement: ClauseElement) -> str:
    compiled = statement.compile(
        dialect=postgresql.dialect(),  # type: ignore[no-untyped-call]
        compile_kwargs={"literal_binds": True},
    )
    return str(compiled)


async def plan(sql: asyncpg.Connection, query: str) -> str:
    rows = await sql.fetch(f"EXPLAIN {query}")
    return "\n".join(row[0] for row in rows)


async def test_due_work_and_token_reads_use_indexes_with_a_million_sellers(
    broker: Broker, sql: asyncpg.Connection
) -> None:
    # Cheap rows (the ciphertexts are placeholders: only the plan matters here). A few are due.
    await sql.execute(
        """
        INSERT INTO sellers (seller_id, client_id, mp_user_id, status, access_token,
            refresh_token, live_mode, expires_at, next_refresh_at, version, linked_at,
            updated_at)
        SELECT 'seller-' || lpad(n::text, 7, '0'), $2, n,
               CASE WHEN n % 50 = 0 THEN 'unlinked' ELSE 'linked' END, 'x', 'x', true,
               now() + interval '150 days',
               now() + (n % 1000) * interval '1 hour' - interval '10 hours', 1, now(), now()
        FROM generate_series(1, $1::int) AS n
        """,
        SELLERS,
        CLIENT_ID,
    )
    await sql.execute("ANALYZE sellers")
    refresher: Refresher = broker.refresher

    due = select(Seller.seller_id).where(Seller.seller_id.in_(refresher.due(datetime.now(UTC), 50)))
    due_plan = await plan(sql, sql_of(due))
    assert "ix_sellers_next_refresh_at_linked" in due_plan, due_plan
    assert "Seq Scan on sellers" not in due_plan, due_plan

    read = select(Seller).where(Seller.seller_id == "seller-0500000")  # what session.get runs
    read_plan = await plan(sql, sql_of(read))
    assert "pk_sellers" in read_plan, read_plan
    assert "Seq Scan" not in read_plan, read_plan
