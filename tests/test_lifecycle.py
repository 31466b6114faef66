"""The seller lifecycle is one module's: who may write a seller, sealed columns, CHECK
constraints, what a reply that omits fields keeps, and the hot statements."""

from __future__ import annotations

import ast
import asyncio
import re
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import get_args

import asyncpg
import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy.ext.asyncio import create_async_engine

from service.core import db
from service.core.config import Settings
from service.core.crypto import Keyring, SealError, context, generate_key_spec
from service.core.db import Hot
from service.core.domain import (
    AttemptOutcome,
    DeliveryState,
    EventType,
    Reason,
    Status,
    StatusName,
)
from service.core.mercadopago import TokenSet
from service.core.models import Link, LinkAttempt, Seller
from service.lifecycle import sellers
from service.linking.flow import Outcome as LinkOutcome
from service.refresh import sql as refresh_sql
from service.serving import tokens

ROOT = Path(__file__).resolve().parent.parent
OWNER = "service/lifecycle/sellers.py"
# A seller's status, token pair (and what comes with it), failure counters and version.
OWNED = {
    "access_token",
    "refresh_token",
    "expires_at",
    "scope",
    "public_key",
    "live_mode",
    "mp_user_id",
    "client_id",
    "status",
    "status_reason",
    "refresh_failures",
    "last_refresh_error",
    "last_refreshed_at",
    "linked_at",
    "version",
}
# Attribute writes of those names that are not a seller's (reviewed: keep this list short).
NOT_A_SELLER = {
    ("service/core/mercadopago.py", "self.status"),  # an upstream error's HTTP status
    ("service/linking/flow.py", "attempt.mp_user_id"),  # the link attempt's record
}


def _chain_root(node: ast.expr) -> ast.expr:
    while isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        node = node.func.value
    return node


def seller_writes(module: str, source: str) -> list[str]:
    """Every place in `source` that writes a column the lifecycle owns: an attribute
    assignment, `Seller(...)`, `update(Seller)/insert(Seller).values(...)`, or raw SQL that
    updates or inserts into `sellers`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            for sub in ast.walk(target):
                if (
                    isinstance(sub, ast.Attribute)
                    and isinstance(sub.ctx, ast.Store)
                    and sub.attr in OWNED
                    and (module, ast.unparse(sub)) not in NOT_A_SELLER
                ):
                    found.append(f"{module}:{sub.lineno} {ast.unparse(sub)} =")
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.search(r"(?i)\b(update\s+sellers|insert\s+into\s+sellers)\b", node.value)
        ):
            found.append(f"{module}:{node.lineno} raw SQL writes sellers")
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg or "**" for k in node.keywords}
        if isinstance(node.func, ast.Name) and node.func.id == "Seller" and keywords & OWNED:
            found.append(f"{module}:{node.lineno} Seller({', '.join(sorted(keywords & OWNED))})")
        if isinstance(node.func, ast.Attribute) and node.func.attr == "values":
            root = _chain_root(node.func.value)
            if (
                isinstance(root, ast.Call)
                and isinstance(root.func, ast.Name)
                and root.func.id in ("update", "insert")
                and any(isinstance(a, ast.Name) and a.id == "Seller" for a in root.args)
                and (keywords & OWNED or "**" in keywords)
            ):
                found.append(f"{module}:{node.lineno} {root.func.id}(Seller).values(...)")
    return found


def test_only_the_lifecycle_writes_a_sellers_status_pair_counters_or_version() -> None:
    writes = []
    for path in sorted((ROOT / "service").rglob("*.py")):
        module = path.relative_to(ROOT).as_posix()
        if module != OWNER and not module.startswith("service/simulator/"):
            writes += seller_writes(module, path.read_text())
    assert writes == [], "only service/lifecycle/sellers.py may write these"
    assert seller_writes(OWNER, (ROOT / OWNER).read_text())  # the scan sees the owner's writes


@pytest.mark.parametrize(
    "snippet",
    [
        "seller.status = 'linked'",
        "seller.refresh_failures += 1",
        "seller.status, seller.status_reason = 'x', None",
        "session.add(Seller(seller_id='s', version=1))",
        "update(Seller).where(Seller.seller_id == x).values(version=Seller.version + 1)",
        "update(Seller).values(**values)",
        "SQL = 'UPDATE sellers SET status = $1'",
        "SQL = 'insert into sellers (seller_id) values ($1)'",
    ],
)
def test_the_writer_scan_catches_each_kind_of_write(snippet: str) -> None:
    assert seller_writes("service/elsewhere.py", snippet)


def test_the_writer_scan_leaves_reads_and_other_tables_alone() -> None:
    source = (
        "x = seller.status\n"
        "update(Seller).values(lease_owner=None)\n"
        "attempt.outcome = 'linked'\n"
        "SQL = 'SELECT status FROM sellers'\n"
    )
    assert seller_writes("service/elsewhere.py", source) == []


# -- sealed columns ---------------------------------------------------------------------------


def test_no_module_but_crypto_spells_a_sealed_values_context() -> None:
    spelled = []
    for path in sorted((ROOT / "service").rglob("*.py")):
        module = path.relative_to(ROOT).as_posix()
        if module == "service/core/crypto.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                if name == "context" or name.endswith(("keyring.seal", "keyring.open")):
                    spelled.append(f"{module}:{node.lineno} {name}(...)")
    assert spelled == [], "seal and open columns with seal_column / open_column"


def test_a_sealed_column_derives_its_context_from_its_table_and_name() -> None:
    ring = Keyring.parse(generate_key_spec("k1"))
    sealed = ring.seal_column(Seller.refresh_token, "seller-1", "app-1", "TG-1")
    assert ring.open(sealed, context("sellers", "seller-1", "refresh_token", "app-1")) == "TG-1"
    assert ring.open_column(Seller.refresh_token, "seller-1", "app-1", sealed) == "TG-1"
    for column, row, app in (
        (Seller.access_token, "seller-1", "app-1"),  # another column
        (Seller.refresh_token, "seller-2", "app-1"),  # another row
        (Seller.refresh_token, "seller-1", "app-2"),  # another application
        (LinkAttempt.code_verifier, "seller-1", "app-1"),  # another table
    ):
        with pytest.raises(SealError):
            ring.open_column(column, row, app, sealed)


def test_a_column_not_declared_sealed_cannot_be_sealed() -> None:
    ring = Keyring.parse(generate_key_spec("k1"))
    with pytest.raises(ValueError, match="not a sealed column"):
        ring.seal_column(Seller.scope, "seller-1", "app-1", "x")
    with pytest.raises(ValueError, match="not a sealed column"):
        ring.seal_column(Link.return_url, "link-1", "app-1", "x")


# -- what a reply that omits fields keeps ------------------------------------------------------

SETTINGS = Settings(
    _env_file=None,
    broker_env="dev",
    mp_client_id="1234",
    mp_client_secret="secret-of-the-tests",
    mp_redirect_uri="http://127.0.0.1/oauth/callback",
)
RING = Keyring.parse(generate_key_spec("k1"))
CLIENT = "app-1"


def _reply(**omitted: object) -> TokenSet:
    fields: dict[str, object] = {
        "access_token": "APP_USR-new",
        "expires_in": 3600,
        "refresh_token": "TG-new",
        "scope": "offline_access read",
        "user_id": 42,
        "public_key": "APP_USR-pk-new",
        "live_mode": False,
    }
    return TokenSet(**(fields | omitted))  # type: ignore[arg-type]


def test_an_empty_field_in_a_reply_counts_as_omitted() -> None:
    pair = sellers.sealed_pair(
        RING, SETTINGS, "s", CLIENT, _reply(refresh_token="", scope="", public_key=""), NOW
    )
    assert (pair.refresh_token, pair.scope, pair.public_key) == (None, None, None)
    assert pair.expires_at == NOW + timedelta(seconds=3600)  # from when the request was sent


NOW = datetime(2026, 12, 1, 12, tzinfo=UTC)
STORED = ("TG-old", "offline_access read write", "APP_USR-pk-old", True)


async def _seed(sql: asyncpg.Connection, seller_id: str, *, failing: bool) -> None:
    await sql.execute(
        "INSERT INTO sellers (seller_id, client_id, mp_user_id, status, access_token, "
        "refresh_token, scope, public_key, live_mode, expires_at, next_refresh_at, version, "
        "linked_at, updated_at, refresh_failures) VALUES ($1, $2, 42, 'linked', $3, $4, $5, $6, "
        "$7, $8, $8, 1, $8, $8, $9)",
        seller_id,
        CLIENT,
        RING.seal_column(Seller.access_token, seller_id, CLIENT, "APP_USR-old"),
        RING.seal_column(Seller.refresh_token, seller_id, CLIENT, STORED[0]),
        *STORED[1:],
        NOW,
        1 if failing else 0,
    )


async def _stored(sql: asyncpg.Connection, seller_id: str) -> tuple[object, ...]:
    row = await sql.fetchrow(
        "SELECT refresh_token, scope, public_key, live_mode, version FROM sellers "
        "WHERE seller_id = $1",
        seller_id,
    )
    assert row is not None
    refresh = RING.open_column(Seller.refresh_token, seller_id, CLIENT, row["refresh_token"])
    return refresh, row["scope"], row["public_key"], row["live_mode"], row["version"]


@pytest.mark.parametrize("failing", [False, True], ids=["one-statement store", "row-lock store"])
@pytest.mark.parametrize(
    "reply",
    [
        {"refresh_token": None, "scope": None, "public_key": None, "live_mode": None},
        {"refresh_token": "", "scope": "", "public_key": ""},
    ],
    ids=["omitted", "empty"],
)
async def test_both_refresh_stores_keep_what_a_reply_omits(
    database_url: str, sql: asyncpg.Connection, failing: bool, reply: dict[str, object]
) -> None:
    await _seed(sql, "seller-1", failing=failing)
    pair = sellers.sealed_pair(RING, SETTINGS, "seller-1", CLIENT, _reply(**reply), NOW)
    engine = create_async_engine(database_url)
    try:
        healthy = await sellers.store_refreshed_healthy(sql, "seller-1", 1, pair, NOW, "default")
        assert healthy is not failing
        if failing:
            stored = await sellers.store_refreshed(
                db.make_sessionmaker(engine), SETTINGS, NOW, "seller-1", 1, pair
            )
            assert stored == sellers.Stored.REFRESHED
    finally:
        await engine.dispose()
    kept_live_mode = STORED[3] if "live_mode" in reply else False
    assert await _stored(sql, "seller-1") == (*STORED[:3], kept_live_mode, 2)


# -- CHECK constraints ----------------------------------------------------------------------

ENUMS: dict[tuple[str, str], type[StrEnum]] = {
    ("sellers", "status"): Status,
    ("sellers", "status_reason"): Reason,
    ("sellers", "attempt_outcome"): AttemptOutcome,
    ("link_attempts", "outcome"): LinkOutcome,
    ("events", "type"): EventType,
    ("event_deliveries", "state"): DeliveryState,
}


async def _checks(sql: asyncpg.Connection) -> dict[tuple[str, str], tuple[set[str], bool]]:
    rows = await sql.fetch(
        "SELECT conrelid::regclass::text AS tbl, conname, convalidated, "
        "pg_get_constraintdef(oid) AS def FROM pg_constraint WHERE contype = 'c' AND conrelid <> 0"
    )
    found = {}
    for row in rows:
        column = row["conname"].removeprefix(f"ck_{row['tbl']}_")
        values = set(re.findall(r"'([^']*)'::", row["def"]))
        found[(row["tbl"], column)] = (values, row["convalidated"])
    return found


async def test_every_status_reason_and_outcome_column_is_checked_against_its_enum(
    sql: asyncpg.Connection,
) -> None:
    checks = await _checks(sql)
    for (table, column), enum in ENUMS.items():
        assert checks[(table, column)] == ({e.value for e in enum}, True), (table, column)


def test_the_apis_status_parameter_lists_every_status() -> None:
    assert get_args(StatusName) == tuple(Status)


async def test_the_database_refuses_a_status_outside_the_enum(sql: asyncpg.Connection) -> None:
    await _seed(sql, "seller-1", failing=False)
    with pytest.raises(asyncpg.CheckViolationError):
        await sql.execute("UPDATE sellers SET status = 'relink-required'")
    with pytest.raises(asyncpg.CheckViolationError):
        await sql.execute("UPDATE sellers SET status_reason = 'because'")


def _alembic(url: str, action: str, revision: str) -> None:
    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "alembic"))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    getattr(command, action)(config, revision)


async def test_the_check_revision_applies_to_a_live_database_with_rows(
    database_url: str, sql: asyncpg.Connection
) -> None:
    await asyncio.to_thread(_alembic, database_url, "downgrade", "0004")
    assert await _checks(sql) == {}
    await _seed(sql, "seller-1", failing=False)
    await _seed(sql, "seller-2", failing=False)
    # An operator's free-text unlink reason, as `broker sellers unlink --reason` allowed.
    await sql.execute(
        "UPDATE sellers SET status = 'unlinked', status_reason = 'fraud ticket 7' "
        "WHERE seller_id = 'seller-2'"
    )
    await asyncio.to_thread(_alembic, database_url, "upgrade", "head")
    assert all(valid for _, valid in (await _checks(sql)).values())
    reasons = await sql.fetch("SELECT seller_id, status_reason FROM sellers ORDER BY 1")
    assert [tuple(r) for r in reasons] == [
        ("seller-1", None),
        ("seller-2", Reason.UNLINKED_BY_OPERATOR),
    ]


async def test_revision_0006_ends_a_namespace_stored_before_the_check_with_its_slash(
    database_url: str, sql: asyncpg.Connection
) -> None:
    await asyncio.to_thread(_alembic, database_url, "downgrade", "0005")
    await sql.execute(
        "INSERT INTO api_keys (id, name, prefix, digest, scopes, namespace, created_at) VALUES "
        "('1', 'old', 'aaaaaaaa', 'd', '{}', 'billing', now()),"
        "('2', 'new', 'bbbbbbbb', 'd', '{}', 'billing/', now()),"
        "('3', 'all', 'cccccccc', 'd', '{}', NULL, now())"
    )
    await asyncio.to_thread(_alembic, database_url, "upgrade", "head")
    rows = await sql.fetch("SELECT name, namespace FROM api_keys ORDER BY id")
    assert [tuple(r) for r in rows] == [("old", "billing/"), ("new", "billing/"), ("all", None)]
    await asyncio.to_thread(_alembic, database_url, "downgrade", "0005")
    assert await sql.fetchval("SELECT count(*) FROM api_keys WHERE last_used_at IS NULL") == 3


# -- hot statements ---------------------------------------------------------------------------

HOT = [
    refresh_sql.CLAIM_DUE,
    refresh_sql.CLAIM_ONE,
    refresh_sql.IS_FREE,
    refresh_sql.RECORD_ATTEMPT,
    sellers.STORE_HEALTHY,
    tokens.READ,
]


def test_each_hot_statement_is_tagged_once() -> None:
    assert len({hot.name for hot in HOT}) == len(HOT)
    assert all(hot.sql.startswith(hot.tag + " ") for hot in HOT)


async def test_each_hot_statement_prepares_against_the_migrated_schema(
    sql: asyncpg.Connection,
) -> None:
    for hot in HOT:
        prepared = await sql.prepare(hot.sql)  # PostgreSQL checks every table and column
        assert len(prepared.get_parameters()) == len(hot.params), hot.name


def test_a_hot_statement_takes_exactly_its_named_arguments() -> None:
    read = tokens.READ
    assert read.args(seller_ids=["s"]) == (["s"],)
    with pytest.raises(TypeError, match="token_read takes"):
        read.args(seller_id="s")
    with pytest.raises(TypeError):
        Hot.args(read, seller_ids=["s"], extra=1)
