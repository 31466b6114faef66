"""Rolling upgrade: the release before and this one side by side, under reads and a refresh wave.

The previous release (PREVIOUS_RELEASE, exported from git) migrates an empty database and
serves it: an API replica and a refresher, a wave of due sellers under way and reads
throughout. Then, as a deploy does it: this release's `broker migrate` runs while the old
replicas serve, this release's API replica and refresher start beside them, the balancer
stops sending to the old API replica and both old processes get SIGTERM. Afterwards: no read
answered anything but 200, every seller was refreshed exactly once (no invalid_grant: no
refresh token sent twice across the two releases' lease rules) and holds the token the
simulator last issued.

And for the revisions still to come: each migration after the previous release's head only
expands (`test_migrations_after_the_previous_release_only_expand`), so that the release before
it keeps running on it, as here.
"""

from __future__ import annotations

import ast
import asyncio
import io
import signal
import socket
import subprocess
import tarfile
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pytest

from service.core import db
from service.core.config import Settings
from tests.support import Simulator, create_api_key, seed_sellers, settings_keyring
from tests.support.balancer import Balancer
from tests.support.config import ROOT
from tests.support.db import admin_connect, execute, with_database
from tests.support.processes import (
    api_process,
    api_process_of,
    broker_process,
    env_for,
    free_port,
    run_cli,
)
from tests.test_chaos_crash import grants, stored

# The release this one upgrades from: main as it landed before this release's migrations.
# At each release, move it to the commit that release landed at (and its head below).
PREVIOUS_RELEASE = "916c3aa5eae1283999b23c56f7a058f1a700835e"
PREVIOUS_HEAD = "0009"

SELLERS = 360
RATE = 25  # refreshes a second: the wave lasts 14 s, through the whole switch-over


def export(commit: str, into: Path) -> Path:
    """The code of `commit` (what a deploy of it runs), from this repository's history."""
    try:
        archive = subprocess.run(  # noqa: S603 (our own repository, a fixed commit)
            ["git", "-C", str(ROOT), "archive", "--format=tar", commit],  # noqa: S607
            check=True,
            capture_output=True,
            timeout=60,
        ).stdout
    except subprocess.CalledProcessError as exc:
        raise AssertionError(
            f"{commit} is not in this clone's history (a shallow clone?): {exc.stderr!r}"
        ) from exc
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


async def linked_unrefreshed(url: str) -> int:
    sql = await admin_connect(url)
    try:
        count: int = await sql.fetchval(
            "SELECT count(*) FROM sellers WHERE version < 2 AND status = 'linked'"
        )
        return count
    finally:
        await sql.close()


@pytest.mark.chaos
async def test_the_previous_release_and_this_one_side_by_side_through_migrate_and_switch_over(
    settings: Settings,
    server_url: str,
    sockets: tuple[socket.socket, socket.socket],
    simulator: Simulator,
    tmp_path: Path,
) -> None:
    old = export(PREVIOUS_RELEASE, tmp_path / "previous")
    name = f"broker_roll_{tmp_path.name[-12:].replace('-', '_')}"
    await execute(server_url, f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
    try:
        env = env_for(
            settings,
            url,
            BROKER_REFRESH_RATE_PER_SECOND=str(RATE),
            BROKER_REFRESH_POLL_SECONDS="0.2",
        )
        code, out, err = await run_cli("migrate", env=env, code=old)
        assert code == 0, out + err
        sql = await admin_connect(url)
        try:
            assert await sql.fetchval("SELECT version_num FROM alembic_version") == PREVIOUS_HEAD
            sellers = await seed_sellers(
                sql, simulator, settings, SELLERS, expires_in=3600, due=False
            )
        finally:
            await sql.close()
        api_key = await create_api_key(url)
        sockets[0].close()
        await roll(settings, url, env, old, sellers, simulator, api_key, tmp_path)
        sql = await admin_connect(url)
        try:
            ring = settings_keyring(settings)
            live = await grants(simulator)
            for seller in sellers:
                row = await stored(sql, ring, seller)
                assert row["status"] == "linked", seller
                issued = live[str(row["mp_user_id"])]["refresh_token_fingerprint"]
                assert row["refresh_fingerprint"] == issued, seller
            assert (
                await sql.fetchval("SELECT version_num FROM alembic_version") == (db.revisions()[0])
            )
        finally:
            await sql.close()
    finally:
        await execute(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def roll(
    settings: Settings,
    url: str,
    env: dict[str, str],
    old: Path,
    sellers: list[str],
    simulator: Simulator,
    api_key: str,
    tmp_path: Path,
) -> None:
    old_port, new_port = free_port(), free_port()
    extra = {k: env[k] for k in ("BROKER_REFRESH_RATE_PER_SECOND", "BROKER_REFRESH_POLL_SECONDS")}
    async with AsyncExitStack() as stack:
        old_api = await stack.enter_async_context(
            api_process_of(old, settings, url, old_port, tmp_path / "old-api.log", **extra)
        )
        old_refresher = await stack.enter_async_context(
            broker_process(["refresher"], env, None, tmp_path / "old-refresher.log", old)
        )
        http = await stack.enter_async_context(
            httpx.AsyncClient(headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
        )
        balancer = Balancer(http, sellers, [f"http://127.0.0.1:{old_port}"])
        balancer.start()
        stack.push_async_callback(balancer.close)
        sql = await admin_connect(url)
        await sql.execute("UPDATE sellers SET next_refresh_at = now() - interval '1 second'")
        await sql.close()
        for _ in range(200):  # bounded: the old refresher's wave is under way
            if await rotated(simulator) >= 20:
                break
            await asyncio.sleep(0.05)

        # -- the deploy ---------------------------------------------------------------------
        started = time.monotonic()
        code, out, err = await run_cli("migrate", env=env)  # while the old release serves
        assert code == 0, out + err
        migrated_at = await rotated(simulator)
        new_api, new_refresher = await asyncio.gather(
            stack.enter_async_context(
                api_process(settings, url, new_port, tmp_path / "new-api.log", **extra)
            ),
            stack.enter_async_context(
                broker_process(["refresher"], env, None, tmp_path / "new-refresher.log")
            ),
        )
        balancer.backends.append(f"http://127.0.0.1:{new_port}")
        await asyncio.sleep(0.5)  # both releases serve reads side by side
        balancer.backends.remove(f"http://127.0.0.1:{old_port}")  # drained from the balancer
        await asyncio.sleep(0.2)  # reads already sent to it finish
        for process in (old_api, old_refresher):
            process.send_signal(signal.SIGTERM)
        await asyncio.gather(old_api.wait(), old_refresher.wait())
        switched_at = await rotated(simulator)
        for _ in range(600):  # 30 s at most: the new refresher finishes the wave
            if not await linked_unrefreshed(url):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)  # a second refresh would come within the refresher's polls
        await balancer.close()
        assert new_api.returncode is None
        assert new_refresher.returncode is None
        assert (old_api.returncode, old_refresher.returncode) == (0, 0)

    log = Counter(e["outcome"] for e in await simulator.log() if e["grant_type"] == "refresh_token")
    statuses, by_backend = balancer.statuses(), balancer.by_backend()
    print(
        f"\n== rolling upgrade from {PREVIOUS_RELEASE[:7]} ==\n"
        f"  refreshes before the migration {migrated_at}, by the switch-over {switched_at};"
        f" deploy took {time.monotonic() - started:.1f} s to the end of the wave\n"
        f"  reads by status {dict(statuses)}, by replica {dict(by_backend)}\n"
        f"  upstream refresh requests by outcome: {dict(log)}"
    )
    assert set(statuses) == {200}, statuses
    assert len(by_backend) == 2  # both releases answered reads
    assert log == {"ok": SELLERS}  # each exactly once, across both releases' refreshers
    assert 0 < migrated_at < SELLERS  # the wave spanned the migration ...
    assert switched_at < SELLERS  # ... and the switch-over


async def rotated(simulator: Simulator) -> int:
    return sum(1 for e in await simulator.log() if e["grant_type"] == "refresh_token")


# -- expand only ----------------------------------------------------------------------------

# What a release before a migration cannot run on: its queries name what these remove or change.
CONTRACTING = {
    "drop_column",
    "drop_table",
    "drop_constraint",
    "rename_table",
    "alter_column",  # a rename, a narrower type, NOT NULL: widening is written as raw SQL
}


def contracting_calls(source: str) -> list[str]:
    """`op.<contracting>(...)` calls in a migration's upgrade(), and raw SQL that drops or
    renames."""
    tree = ast.parse(source)
    upgrade = next(
        node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "upgrade"
    )
    found = []
    for node in ast.walk(upgrade):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in CONTRACTING
        ):
            found.append(node.func.attr)
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.upper()
            if ("DROP " in text and "DROP INDEX" not in text) or " RENAME " in text:
                found.append(node.value)
    return found


def test_migrations_after_the_previous_release_only_expand() -> None:
    newer = db.revisions()[: db.revisions().index(PREVIOUS_HEAD)]
    assert newer  # this release has migrations of its own: the test above runs through them
    for revision in newer:
        [path] = (ROOT / "alembic" / "versions").glob(f"{revision}_*.py")
        assert contracting_calls(path.read_text()) == [], (
            f"{path.name} removes or changes what the release before it still uses: split it"
            " (expand now, contract in the release after the one that stops using it)"
        )


def test_the_expand_only_check_sees_a_contracting_migration() -> None:
    source = (
        "def upgrade():\n"
        "    op.drop_column('sellers', 'lease_owner')\n"
        "    op.execute('ALTER TABLE sellers RENAME COLUMN x TO y')\n"
        "def downgrade():\n"
        "    op.drop_index('ix')\n"
    )
    assert contracting_calls(source) == ["drop_column", "ALTER TABLE sellers RENAME COLUMN x TO y"]
