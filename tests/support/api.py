"""Calling the internal API as a given key, and what its problem+json refusals look like."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import httpx

from service.core import db
from service.core.domain import KeyView
from service.core.errors import PROBLEM_JSON
from service.serving import apikeys
from tests.support.servers import Broker

# A key of every scope and application, for calling the flows' functions directly.
ANY_KEY = KeyView(
    id="k-any",
    name="tests",
    prefix="00000000",
    digest="0" * 64,
    scopes=apikeys.SCOPES,
    namespace=None,
    client_ids=None,
    revoked=False,
)


def assert_problem(reply: httpx.Response, status: int, code: str) -> None:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == PROBLEM_JSON
    body = reply.json()
    assert body["code"] == code
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]


async def new_key(
    database_url: str,
    scopes: tuple[str, ...] = apikeys.SCOPES,
    namespace: str | None = None,
    client_ids: list[str] | None = None,
) -> str:
    engine = db.make_engine(database_url, "tests", pool_size=1)
    try:
        async with db.transaction(db.make_sessionmaker(engine)) as session:
            _, secret = await apikeys.create(
                session,
                f"k-{namespace}-{uuid.uuid4().hex[:8]}",
                datetime.now(UTC),
                scopes,
                namespace,
                client_ids,
            )
    finally:
        await engine.dispose()
    return secret


@asynccontextmanager
async def calling_with(broker: Broker, key: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        base_url=broker.url, headers={"Authorization": f"Bearer {key}"}
    ) as caller:
        yield caller
