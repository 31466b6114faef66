"""PostgreSQL for tests: plain asyncpg connections and databases created from a template."""

from __future__ import annotations

import asyncpg
from sqlalchemy.engine import make_url

from service.core.db import asyncpg_params


async def admin_connect(url: str) -> asyncpg.Connection:
    """A plain asyncpg connection to `url` (the service's own URL conversion)."""
    return await asyncpg.connect(**asyncpg_params(url, "tests"))


def with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


async def execute(url: str, sql: str) -> None:
    conn = await admin_connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def plan(sql: asyncpg.Connection, query: str, *args: object) -> str:
    """PostgreSQL's plan for `query` (EXPLAIN), as one text."""
    rows = await sql.fetch(f"EXPLAIN {query}", *args)
    return "\n".join(row[0] for row in rows)
