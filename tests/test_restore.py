"""After a restore from backup, burned refresh tokens become `rotation_lost`, never silent."""

from __future__ import annotations

import json

import asyncpg

from service.core.config import Settings
from tests.support import Broker, Simulator, seed_sellers
from tests.support.processes import env_for, run_cli


async def test_a_restored_database_is_re_validated_and_burned_tokens_are_named_rotation_lost(
    broker: Broker,
    simulator: Simulator,
    settings: Settings,
    database_url: str,
    sql: asyncpg.Connection,
) -> None:
    sellers = await seed_sellers(sql, simulator, settings, 10, expires_in=86400, due=False)
    await sql.execute("CREATE TABLE backup AS SELECT * FROM sellers")  # the nightly backup
    rotated_after_backup = sellers[:4]
    for seller in rotated_after_backup:
        assert await broker.refresher.refresh(seller) == "refreshed"
    # Disaster, then the restore: the rotations since the backup are gone from our side only.
    await sql.execute("DELETE FROM sellers; INSERT INTO sellers SELECT * FROM backup")

    code, out, _ = await run_cli(
        "sellers", "mark-restored", "--spread-minutes", "0", env=env_for(settings, database_url)
    )
    assert (code, out.strip()) == (0, "marked 10 linked seller(s); each is re-validated soon")
    outcomes = {seller: await broker.refresher.refresh(seller) for seller in sellers}

    assert {s for s, o in outcomes.items() if o == "relink_required"} == set(rotated_after_backup)
    assert {s for s, o in outcomes.items() if o == "refreshed"} == set(sellers[4:])
    reasons = await sql.fetch(
        "SELECT seller_id, status_reason FROM sellers WHERE status = 'relink_required'"
    )
    assert {r["status_reason"] for r in reasons} == {"rotation_lost"}
    events = await sql.fetch(
        "SELECT seller_id, data FROM events WHERE type = 'seller.relink_required'"
    )
    assert {e["seller_id"] for e in events} == set(rotated_after_backup)
    assert {json.loads(e["data"])["reason"] for e in events} == {"rotation_lost"}
