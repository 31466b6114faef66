"""Async Alembic environment: migrations run over asyncpg, the broker's only driver."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from service.core.models import Base

config = context.config
target_metadata = Base.metadata


def url() -> str:
    given = config.get_main_option("sqlalchemy.url")
    if given:
        return given
    from service.core.config import get_settings
    from service.core.db import database_url

    return database_url(get_settings())


def run_with(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        context.run_migrations()


async def run_online() -> None:
    engine = create_async_engine(url(), poolclass=NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(run_with)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(run_online())
