"""Seeding linked sellers fast, in constant memory, sealed as the broker seals them
(tests/support/seed.py builds its rows with `row` too).

Rows are built in chunks by a process pool (sealing is most of the CPU: two AES-GCM seals per
seller) and written with COPY (`copy_records_to_table`), at most `workers + 1` chunks in memory.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import secrets
from collections import deque
from collections.abc import Iterable
from concurrent.futures import Future, ProcessPoolExecutor
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from service.core import db
from service.core.crypto import Keyring
from service.core.models import Seller

SCOPE = "offline_access read write"
COLUMNS = (
    "seller_id",
    "client_id",
    "mp_user_id",
    "status",
    "access_token",
    "refresh_token",
    "scope",
    "live_mode",
    "expires_at",
    "next_refresh_at",
    "version",
    "linked_at",
    "updated_at",
)
READ_USER_BASE = 100_000_000  # mp_user_id of seller-0000000

_worker: dict[str, Any] = {}


def seller_id(n: int) -> str:
    return f"seller-{n:07d}"


def _init_worker(key_spec: str, client_id: str) -> None:
    _worker["ring"] = Keyring.parse(key_spec)
    _worker["client_id"] = client_id


def row(
    ring: Keyring,
    client_id: str,
    sid: str,
    user_id: int,
    access_token: str,
    refresh_token: str,
    now: datetime,
    expires_at: datetime,
    next_refresh_at: datetime,
) -> tuple[Any, ...]:
    """One `sellers` row, sealed the way the broker seals it (the context comes from the column)."""
    return (
        sid,
        client_id,
        user_id,
        "linked",
        ring.seal_column(Seller.access_token, sid, client_id, access_token),
        ring.seal_column(Seller.refresh_token, sid, client_id, refresh_token),
        SCOPE,
        True,
        expires_at,
        next_refresh_at,
        1,
        now,
        now,
    )


def read_chunk(start: int, stop: int, now: datetime) -> list[tuple[Any, ...]]:
    """Sellers start..stop-1 for the read benchmark: valid 150 days, next refresh far away."""
    ring: Keyring = _worker["ring"]
    client_id: str = _worker["client_id"]
    stamp = now.strftime("%m%d%H")
    expires_at = now + timedelta(days=150)
    next_refresh_at = now + timedelta(days=3650)
    rows = []
    for n in range(start, stop):
        user_id = READ_USER_BASE + n
        # Mercado Pago's shapes, about 70 characters each.
        access = f"APP_USR-{client_id}-{stamp}-{secrets.token_hex(16)}-{user_id}"
        refresh = f"TG-{client_id}-{stamp}-{secrets.token_hex(16)}-{user_id}"
        sid = seller_id(n)
        rows.append(
            row(ring, client_id, sid, user_id, access, refresh, now, expires_at, next_refresh_at)
        )
    return rows


async def copy_rows(connection: Any, rows: Iterable[tuple[Any, ...]]) -> None:
    await connection.copy_records_to_table("sellers", records=rows, columns=COLUMNS)


async def seed_read_sellers(
    url: str, key_spec: str, client_id: str, count: int, now: datetime, chunk: int = 10_000
) -> None:
    """Write `count` linked sellers seller-0000000.. with COPY, chunk by chunk."""
    workers = max(1, min(os.cpu_count() or 1, 8))
    loop = asyncio.get_running_loop()
    connection = await asyncpg.connect(**db.asyncpg_params(url, "broker-bench"))
    try:
        with ProcessPoolExecutor(
            workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker,
            initargs=(key_spec, client_id),
        ) as pool:
            starts = iter(range(0, count, chunk))
            pending: deque[asyncio.Future[list[tuple[Any, ...]]]] = deque()

            def submit() -> bool:
                start = next(starts, None)
                if start is None:
                    return False
                future: Future[list[tuple[Any, ...]]] = pool.submit(
                    read_chunk, start, min(start + chunk, count), now
                )
                pending.append(asyncio.wrap_future(future, loop=loop))
                return True

            for _ in range(workers + 1):
                submit()
            while pending:
                rows = await pending.popleft()
                submit()  # the next chunk is built while this one is copied
                await copy_rows(connection, rows)
        await connection.execute("VACUUM (ANALYZE) sellers")
    finally:
        await connection.close()
