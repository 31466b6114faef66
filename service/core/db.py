"""One async engine per process; sessions that commit or roll back in one place.

Beside the engine, a plain asyncpg pool (`direct_pool`) carries the few statements that run
thousands of times a second (the cold token read, a refresh's claim and store): there,
SQLAlchemy's pool and execution layers cost about as much CPU as the statement itself. Those
statements are still written in SQLAlchemy Core against the models, and compiled once (`Hot`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, cast

import asyncpg
from sqlalchemy import ClauseElement, literal_column, make_url, text
from sqlalchemy.dialects.postgresql.asyncpg import PGDialect_asyncpg
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, ProgrammingError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import ColumnElement

from service.core.config import Settings

ROOT = Path(__file__).resolve().parents[2]  # where alembic/ and alembic.ini live
POOL_TIMEOUT_SECONDS = 5
CONNECT_TIMEOUT_SECONDS = 3
COMMAND_TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class Hot:
    """A statement of the hot path, built with SQLAlchemy Core against the models (a misspelt
    column fails at import) and compiled once for asyncpg, then run on the direct pool with
    named arguments: `connection.fetch(stmt.sql, *stmt.args(owner=..., now=...))`.

    Its text starts with `/* broker:<name> */`, which is how tests (and an operator reading
    pg_stat_activity) find it. Constants written into it (`const`) stay literals, so the
    planner can match them against partial indexes even in a generic plan."""

    name: str
    sql: str
    params: tuple[str, ...]  # asyncpg's positional order
    fixed: dict[str, Any] = field(default_factory=dict)  # values SQLAlchemy bound itself

    @classmethod
    def compile(cls, name: str, statement: ClauseElement) -> Hot:
        compiled = cast(SQLCompiler, statement.compile(dialect=_ASYNCPG))
        params = tuple(dict.fromkeys(compiled.positiontup or ()))
        fixed = {
            key: bind.value
            for key, bind in compiled.binds.items()
            if key in params and not bind.required
        }
        return cls(name, f"{cls.tag_of(name)} {compiled}", params, fixed)

    @staticmethod
    def tag_of(name: str) -> str:
        return f"/* broker:{name} */"

    @property
    def tag(self) -> str:
        """How the statement's text starts (pg_stat_activity shows it)."""
        return self.tag_of(self.name)

    def args(self, **values: Any) -> tuple[Any, ...]:
        given = {**self.fixed, **values}
        if given.keys() != set(self.params):
            raise TypeError(f"{self.name} takes {sorted(set(self.params) - self.fixed.keys())}")
        return tuple(given[name] for name in self.params)


_ASYNCPG = PGDialect_asyncpg()  # type: ignore[no-untyped-call]


def const(value: str) -> ColumnElement[Any]:
    """One of our own enum values, written into a hot statement as a literal (never input)."""
    return literal_column("'" + value.replace("'", "''") + "'")


# Client-side states of a connection whose server end went away under it (a terminated
# backend, a restart): asyncpg may report these instead of a connection error.
BROKEN_CONNECTION = (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError)


def is_database_outage(exc: BaseException) -> bool:
    """Whether `exc` means "the database cannot be reached now" (a 503), not a bug (a 500)."""
    if isinstance(exc, (OperationalError, InterfaceError, PoolTimeout, OSError, TimeoutError)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    cause = exc.orig if isinstance(exc, DBAPIError) else exc
    # asyncpg's own classes, raw from the direct pool: ConnectionDoesNotExistError, and the
    # server's connection-exception (08xxx) and operator-intervention (57P01-03: a terminated
    # backend, a shutdown, a server starting) SQLSTATEs, and 25006: a write on a session whose
    # server is now a standby (a switchover demoted it; a new connection finds the primary).
    sqlstate = str(getattr(cause, "sqlstate", None) or "")
    return (
        isinstance(cause, (OSError, TimeoutError))
        or sqlstate.startswith("08")
        or sqlstate in ("57P01", "57P02", "57P03", "25006")
        or any(name in type(cause).__name__ for name in ("Connection", "CannotConnect"))
        or isinstance(cause, BROKEN_CONNECTION)
    )


def database_url(settings: Settings) -> str:
    """`DATABASE_URL` when set; otherwise the embedded server (never in production: see config)."""
    if settings.database_url:
        return settings.database_url
    from service.ops import embedded  # dev and tests only: production sets DATABASE_URL

    return embedded.start(settings.broker_data_dir)


def make_engine(url: str, application_name: str, pool_size: int = 10) -> AsyncEngine:
    # application_name tells broker processes apart in pg_stat_activity.
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=False,
        # A database that went away must cost a request seconds, never a hang: bounded waits
        # for a pooled connection, for a new one, and for any statement.
        pool_timeout=POOL_TIMEOUT_SECONDS,
        connect_args={
            "server_settings": {"application_name": application_name},
            "timeout": CONNECT_TIMEOUT_SECONDS,
            "command_timeout": COMMAND_TIMEOUT_SECONDS,
        },
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def transaction(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A short unit of work: commits on success, rolls back on any exception."""
    async with sessions() as session, session.begin():
        yield session


@cache
def revisions() -> tuple[str, ...]:
    """The Alembic revisions this code ships, newest (its head: what `broker migrate` brings a
    schema to) first."""
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    config = Config()
    config.set_main_option("script_location", str(ROOT / "alembic"))
    known = tuple(s.revision for s in ScriptDirectory.from_config(config).walk_revisions())
    if not known:
        raise RuntimeError(f"no Alembic revision under {ROOT / 'alembic'}")
    return known


def schema_behind(revision: str | None) -> bool:
    """Whether the schema lacks something this code needs: never migrated, or at one of this
    code's older revisions. A revision this code does not know is a newer release's (during a
    rolling upgrade, `broker migrate` runs before the old replicas leave): migrations only
    expand while a release before them still runs (tests/test_rolling_upgrade.py), so this
    code serves on it as it did on its own head."""
    return revision is None or revision in revisions()[1:]


async def schema_revision(session: AsyncSession) -> str | None:
    try:
        revision: str | None = await session.scalar(text("SELECT version_num FROM alembic_version"))
        return revision
    except ProgrammingError:  # no alembic_version table: never migrated
        await session.rollback()
        return None


def asyncpg_params(url: str, application_name: str = "broker-cache") -> dict[str, Any]:
    """`connect()` keywords for a raw asyncpg connection (the cache's LISTEN, `direct_pool`,
    the owner lock): SQLAlchemy's own reading of the URL, so that both see the same servers,
    also several (`?host=a:5432&host=b:5432&target_session_attrs=read-write`)."""
    _, params = _ASYNCPG.create_connect_args(make_url(url))  # type: ignore[no-untyped-call]
    params.setdefault("user", "postgres")
    params.setdefault("host", "127.0.0.1")
    params["server_settings"] = {"application_name": application_name}
    return dict(params)


async def _stateless(_connection: asyncpg.Connection) -> None:
    """No reset query on release: a direct connection runs single statements and short
    transactions and keeps no session state, so asyncpg's default reset query (one more round
    trip per use) buys nothing. asyncpg still rolls back a transaction left open, first."""


async def direct_pool(url: str, application_name: str, size: int) -> asyncpg.Pool:
    """A fixed-ceiling asyncpg pool; connections open on demand and stay (no overflow churn:
    a connection opened and closed per request costs PostgreSQL a backend start each time)."""
    return await asyncpg.create_pool(
        **asyncpg_params(url, application_name),
        min_size=0,
        max_size=size,
        timeout=CONNECT_TIMEOUT_SECONDS,
        command_timeout=COMMAND_TIMEOUT_SECONDS,
        reset=_stateless,
    )


@asynccontextmanager
async def direct(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection of `direct_pool`, bounded in wait; one left in an unknown protocol state
    is closed rather than handed out again (the pool opens a new one)."""
    async with pool.acquire(timeout=POOL_TIMEOUT_SECONDS) as connection:
        try:
            yield connection
        except BROKEN_CONNECTION:
            connection.terminate()
            raise
