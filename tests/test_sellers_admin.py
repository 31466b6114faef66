"""The admin view of sellers: status, listing with a cursor, unlink (local: tokens destroyed)."""

from __future__ import annotations

import asyncpg
import httpx
import pytest

from service.core.config import Settings
from tests.support import (
    Broker,
    FakeClock,
    SellerBrowser,
    Simulator,
    assert_problem,
    calling_with,
    new_key,
    seed_sellers,
)


async def test_sellers_are_listed_by_status_and_expiry_a_page_at_a_time(
    broker: Broker, simulator: Simulator, settings: Settings, sql: asyncpg.Connection
) -> None:
    await seed_sellers(sql, simulator, settings, 5, expires_in=3600, due=False)
    await sql.execute(
        "UPDATE sellers SET status = 'relink_required' WHERE seller_id = 'seller-00003'"
    )
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(5):  # bounded
        params: dict[str, str | int] = {"limit": 2, "status": "linked"}
        if cursor:
            params["cursor"] = cursor
        page = (await broker.http.get("/sellers", params=params)).json()
        seen += [s["seller_id"] for s in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == ["seller-00000", "seller-00001", "seller-00002", "seller-00004"]
    soon = (
        await broker.http.get(
            "/sellers",
            params={
                "expiring_before": (await sql.fetchval("SELECT now() + interval '2h'")).isoformat()
            },
        )
    ).json()
    assert len(soon["items"]) == 5
    later = (
        await broker.http.get("/sellers", params={"expiring_before": "2000-01-01T00:00:00Z"})
    ).json()
    assert later == {"items": [], "next_cursor": None}


async def test_an_admin_unlinks_a_seller_and_a_relink_keeps_its_id_and_history(
    broker: Broker, clock: FakeClock, sql: asyncpg.Connection
) -> None:
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link("seller-1"), user_id=11)
    reply = await broker.http.delete("/sellers/seller-1")
    assert reply.status_code == 200
    assert (reply.json()["status"], reply.json()["status_reason"]) == (
        "unlinked",
        "unlinked_by_platform",
    )
    row = await sql.fetchrow("SELECT * FROM sellers")
    assert (row["access_token"], row["refresh_token"]) == (None, None)
    assert (await broker.token("seller-1")).status_code == 404
    assert (await broker.http.delete("/sellers/nobody")).status_code == 404
    async with SellerBrowser() as browser:
        page = await browser.link(await broker.start_link("seller-1"), user_id=11)
    assert page.status_code == 200
    assert (await broker.token("seller-1")).status_code == 200
    actions = [
        r["action"]
        for r in await sql.fetch(
            "SELECT action FROM audit_events WHERE seller_id = 'seller-1' ORDER BY id"
        )
    ]
    assert actions == [
        "link.created",
        "seller.linked",
        "seller.unlinked",
        "link.created",
        "seller.relinked",
    ]


async def test_a_namespaced_admin_key_lists_only_its_sellers(
    broker: Broker,
    simulator: Simulator,
    settings: Settings,
    sql: asyncpg.Connection,
    database_url: str,
    clock: FakeClock,
) -> None:
    await seed_sellers(sql, simulator, settings, 2, expires_in=3600, due=False)
    await sql.execute(
        "UPDATE sellers SET seller_id = 'billing/' || seller_id WHERE seller_id = 'seller-00001'"
    )
    from service.core import db
    from service.serving import apikeys

    engine = db.make_engine(database_url, "tests", pool_size=1)
    async with db.transaction(db.make_sessionmaker(engine)) as session:
        _, secret = await apikeys.create(session, "b", clock.now, ("sellers:admin",), "billing/")
    await engine.dispose()
    async with httpx.AsyncClient(
        base_url=broker.url, headers={"Authorization": f"Bearer {secret}"}
    ) as billing:
        listed = (await billing.get("/sellers")).json()
        assert [s["seller_id"] for s in listed["items"]] == ["billing/seller-00001"]
        assert (await billing.delete("/sellers/seller-00000")).status_code == 403


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/sellers"), ("GET", "/sellers/seller-00000"), ("DELETE", "/sellers/seller-00000")],
)
async def test_a_key_without_sellers_admin_is_403_on_the_admin_routes(
    broker: Broker,
    simulator: Simulator,
    settings: Settings,
    sql: asyncpg.Connection,
    database_url: str,
    method: str,
    path: str,
) -> None:
    await seed_sellers(sql, simulator, settings, 1, expires_in=3600, due=False)
    key = await new_key(database_url, scopes=("links:write", "tokens:read"))
    async with calling_with(broker, key) as caller:
        assert_problem(await caller.request(method, path), 403, "forbidden")
    assert await sql.fetchval("SELECT status FROM sellers") == "linked"
