"""The data keys of a process: from BROKER_ENCRYPTION_KEYS, or unwrapped by a key service.

With `BROKER_KEY_SERVICE=transit` the `data_keys` table holds every data key *wrapped* by the
key service (service/core/keyservice.py); nothing in the database or the configuration opens a
sealed value without it. Each process unwraps the keys at start-up and holds them in memory.

- The primary (the key that seals) is the key promoted last. The first start creates and
  promotes `dk1`; `broker keys add` adds one that only opens, `broker keys promote` makes it
  seal. Every process re-reads the table every BROKER_KEY_CHECK_SECONDS, so a key added is
  known everywhere within that time: promote only after it (the README's procedure).
- `broker keys rewrap` after rotating the key-encryption key rewrites only `data_keys`, never a
  seller row: the data keys themselves do not change.
- The same re-read is the key service's health check: unwrapping is all a restart would need
  from it. While it fails the process keeps serving with the keys it holds (a key-service
  outage must not become a broker outage), and says so: `broker_key_service_up` 0, an ERROR
  log line per failed check, `key_service` in `/readyz`'s answer. At start-up there is no key
  to fall back on: the process waits BROKER_KEY_SERVICE_WAIT_SECONDS for the key service, then
  exits (it never starts serving, and never falls back to a key in the environment).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from service.core import logs, metrics
from service.core.config import Settings
from service.core.crypto import Keyring, generate_key_spec, parse_spec
from service.core.db import transaction
from service.core.keyservice import KeyService, KeyServiceError
from service.core.models import DataKey

log = logging.getLogger("broker.keys")

FIRST_KEY = "dk1"
KEY_NUMBER = re.compile(r"^dk(\d+)$")


def local_keyring(settings: Settings) -> Keyring:
    """BROKER_ENCRYPTION_KEYS, or in dev without them a key kept in the data dir."""
    if settings.broker_encryption_keys is not None:
        return Keyring.parse(settings.broker_encryption_keys.get_secret_value())
    # Dev only (production refuses to start without keys): a local key kept in the data dir.
    path: Path = settings.broker_data_dir / "dev-encryption-key"
    if not path.exists():
        settings.broker_data_dir.mkdir(parents=True, exist_ok=True)
        # Written aside, then linked into place: of two processes starting at once (API and
        # refresher on a shared volume), one key wins and both read it whole.
        draft = path.with_name(f"{path.name}.{os.getpid()}")
        draft.write_text(generate_key_spec("dev1") + "\n")
        draft.chmod(0o600)
        try:
            os.link(draft, path)
            log.warning("dev.encryption_key_generated", extra={"fields": {"path": str(path)}})
        except FileExistsError:
            pass
        finally:
            draft.unlink()
    return Keyring.parse(path.read_text().strip())


async def unwrapped(sessions: async_sessionmaker[AsyncSession], service: KeyService) -> Keyring:
    """Every data key of the table, unwrapped; the first start creates `dk1`."""
    async with sessions() as session:
        rows = list(await session.scalars(select(DataKey).order_by(DataKey.created_at)))
    if not rows:
        await _insert(sessions, FIRST_KEY, await service.wrap(secrets.token_bytes(32)), service)
        async with transaction(sessions) as session:
            # Of two processes starting at once, the row that won is the one both use.
            await session.execute(
                update(DataKey)
                .where(DataKey.key_id == FIRST_KEY, DataKey.promoted_at.is_(None))
                .values(promoted_at=func.now())
            )
        return await unwrapped(sessions, service)
    keys = {row.key_id: await service.unwrap(row.wrapped) for row in rows}
    promoted = [row for row in rows if row.promoted_at is not None] or rows[:1]
    primary = max(promoted, key=lambda row: row.promoted_at or row.created_at).key_id
    return Keyring.of(keys, primary)


async def _insert(
    sessions: async_sessionmaker[AsyncSession], key_id: str, wrapped: str, service: KeyService
) -> bool:
    async with transaction(sessions) as session:
        inserted = await session.execute(
            insert(DataKey)
            .values(key_id=key_id, wrapped=wrapped, wrapped_by=service.name)
            .on_conflict_do_nothing()
            .returning(DataKey.key_id)
        )
        return inserted.first() is not None


async def open_keyring(
    settings: Settings,
    sessions: async_sessionmaker[AsyncSession],
    service: KeyService | None,
    wait_seconds: float = 0.0,
) -> Keyring:
    """The process's keyring. With a key service, tries for up to `wait_seconds`, saying why
    each try failed; then the last error is raised (never a fallback to a local key)."""
    if service is None:
        return local_keyring(settings)
    loop = asyncio.get_running_loop()
    give_up = loop.time() + wait_seconds
    while True:
        try:
            keyring = await unwrapped(sessions, service)
        except KeyServiceError as exc:
            _failed(exc, starting=True)
            if loop.time() >= give_up:
                raise
            await asyncio.sleep(min(1.0, max(give_up - loop.time(), 0)))
            continue
        _up(keyring)
        return keyring


def _failed(exc: KeyServiceError, *, starting: bool) -> None:
    metrics.KEY_SERVICE_UP.set(0)
    metrics.KEY_SERVICE_FAILURES.labels(exc.reason).inc()
    what = "keys.unavailable_at_start" if starting else "keys.service_failed"
    logs.event(log, what, {"reason": exc.reason, "detail": exc.detail}, logging.ERROR)


def _up(keyring: Keyring) -> None:
    metrics.KEY_SERVICE_UP.set(1)
    metrics.DATA_KEYS.set(len(keyring.keys))


@dataclass
class KeyWatch:
    """Re-reads the data keys every BROKER_KEY_CHECK_SECONDS: new and promoted keys, and the
    key service's health (`failing` is the reason of the last failed check, or None)."""

    keyring: Keyring
    sessions: async_sessionmaker[AsyncSession]
    service: KeyService
    every: float
    failing: str | None = None

    async def check(self) -> None:
        try:
            fresh = await unwrapped(self.sessions, self.service)
        except KeyServiceError as exc:
            self.failing = exc.reason
            _failed(exc, starting=False)
            return
        except Exception as exc:  # noqa: BLE001 the database is watched elsewhere; try again
            logs.event(log, "keys.check_failed", {"error": type(exc).__name__}, logging.WARNING)
            return
        if self.failing is not None:
            logs.event(log, "keys.service_back", {"after": self.failing})
        self.failing = None
        if fresh.primary != self.keyring.primary or fresh.keys.keys() != self.keyring.keys.keys():
            logs.event(log, "keys.changed", {"primary": fresh.primary, "keys": sorted(fresh.keys)})
        self.keyring.adopt(fresh)
        _up(fresh)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every)
            if not stop.is_set():
                await self.check()


# Operator commands (`broker keys …`).


async def add(sessions: async_sessionmaker[AsyncSession], service: KeyService) -> str:
    """A new data key that opens but does not seal yet; its id."""
    async with sessions() as session:
        ids = list(await session.scalars(select(DataKey.key_id)))
    numbers = [int(m[1]) for key_id in ids if (m := KEY_NUMBER.match(key_id))]
    key_id = f"dk{max(numbers, default=0) + 1}"
    if not await _insert(sessions, key_id, await service.wrap(secrets.token_bytes(32)), service):
        raise ValueError(f"{key_id} was added at the same time by another command: run it again")
    return key_id


async def promote(sessions: async_sessionmaker[AsyncSession], key_id: str) -> bool:
    async with transaction(sessions) as session:
        done = await session.execute(
            update(DataKey)
            .where(DataKey.key_id == key_id)
            .values(promoted_at=func.now())
            .returning(DataKey.key_id)
        )
        return done.first() is not None


async def rewrap(sessions: async_sessionmaker[AsyncSession], service: KeyService) -> int:
    """Every data key wrapped again under the key service's newest key version."""
    async with sessions() as session:
        rows = list(await session.scalars(select(DataKey)))
    for row in rows:
        async with transaction(sessions) as session:
            await session.execute(
                update(DataKey)
                .where(DataKey.key_id == row.key_id, DataKey.wrapped == row.wrapped)
                .values(wrapped=await service.rewrap(row.wrapped), wrapped_by=service.name)
            )
    return len(rows)


async def import_local(
    sessions: async_sessionmaker[AsyncSession], service: KeyService, spec: str
) -> list[str]:
    """BROKER_ENCRYPTION_KEYS wrapped into the table (the move to a key service), its primary
    promoted: the rows sealed under them open unchanged. The ids imported."""
    raw, primary = parse_spec(spec)
    imported = []
    for key_id, key in raw.items():
        if await _insert(sessions, key_id, await service.wrap(key), service):
            imported.append(key_id)
    await promote(sessions, primary)
    return imported


async def listing(sessions: async_sessionmaker[AsyncSession]) -> list[DataKey]:
    async with sessions() as session:
        return list(await session.scalars(select(DataKey).order_by(DataKey.created_at)))
