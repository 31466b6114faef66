"""Rows a test starts from: API keys, and linked sellers whose grants exist at the simulator."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from bench.seed import copy_rows
from bench.seed import row as sealed_row
from service.core.config import Settings
from service.core.crypto import Keyring
from tests.support.servers import Simulator


async def create_api_key(database_url: str, scopes: tuple[str, ...] | None = None) -> str:
    from service.core import db
    from service.serving import apikeys

    engine = db.make_engine(database_url, "tests", pool_size=1)
    try:
        async with db.transaction(db.make_sessionmaker(engine)) as session:
            _, secret = await apikeys.create(
                session,
                f"test-{uuid.uuid4().hex[:6]}",
                datetime.now(UTC),
                scopes or apikeys.SCOPES,
            )
    finally:
        await engine.dispose()
    return secret


def settings_keyring(settings: Settings) -> Keyring:
    """The keyring the broker under test seals with."""
    keys = settings.broker_encryption_keys
    assert keys is not None
    return Keyring.parse(keys.get_secret_value())


async def seed_sellers(
    sql: asyncpg.Connection,
    simulator: Simulator,
    settings: Settings,
    count: int,
    *,
    expires_in: int,
    due: bool,
    keyring: Keyring | None = None,
) -> list[str]:
    """Linked sellers whose grants exist in the simulator (issued directly, in one call, no
    browser); user ids from 10,000."""
    ring = keyring or settings_keyring(settings)
    client_id = settings.mp_client_id or ""
    reply = await simulator.http.post(
        "/_control/issue", json={"client_id": client_id, "user_id": 10_000, "count": count}
    )
    reply.raise_for_status()
    now = datetime.now(UTC)
    expires_at = now + timedelta(seconds=expires_in)
    next_refresh_at = now - timedelta(seconds=1) if due else now + timedelta(days=1)
    rows = [
        sealed_row(
            ring,
            client_id,
            f"seller-{n:05d}",
            grant["user_id"],
            grant["access_token"],
            grant["refresh_token"],
            now,
            expires_at,
            next_refresh_at,
        )
        for n, grant in enumerate(reply.json())
    ]
    await copy_rows(sql, rows)  # sealed the broker's way, like the benchmark's rows
    return [row[0] for row in rows]
