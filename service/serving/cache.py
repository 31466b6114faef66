"""The hot path's memory: decrypted seller tokens and API keys, kept coherent across replicas.

Every write to `sellers` (a new token pair, a status change, a failure count) and to
`api_keys` fires a trigger that `pg_notify`s channel `broker_cache` inside the writing
transaction (migration 0003), so every replica hears of it right after the commit, whoever
wrote it. Payloads: `s:<version>:<seller_id>` and `k:<key prefix>`.

Three rules keep a stale entry from being served:
- A notification drops the entry unless the entry is newer (its `version` is higher).
- A load that began before a notification about the same row does not store what it read
  (it may have read the row before the change): each load notes the `generation` it began at.
- While the listening connection is down, nothing is cached or served from the cache, and the
  whole cache is flushed when the connection drops and again when it is back (notifications
  sent meanwhile are lost). A connection closed under us (the server ended it, a reset) stops
  the cache the moment asyncpg sees it close, and the listener reconnects without waiting for
  a ping; a ping every `PING_SECONDS` (timeout `PING_TIMEOUT_SECONDS`) notices a silent drop,
  so a change is never served stale for more than about a second.

Decrypted tokens live only in this process's memory; `BROKER_TOKEN_CACHE_SIZE=0` turns the
token cache off (every token read then goes to PostgreSQL; API keys are still kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
from collections import OrderedDict
from typing import Any

import asyncpg

from service.core import db, logs
from service.core.domain import KeyView, SellerView

log = logging.getLogger("broker.cache")

CHANNEL = "broker_cache"
PING_SECONDS = 0.25
PING_TIMEOUT_SECONDS = 0.5
RECONNECT_SECONDS = (0.1, 0.5, 1.0, 2.0, 5.0)
KEYS_MAX = 10_000  # API keys are few; the bound only guards against a flood of bogus ones
# A seller is kept as the plain tuple of its view's fields, not the SellerView object: CPython's
# collector stops tracking a tuple of strings, numbers, bytes and datetimes, so a full cache
# adds nothing to its collections, where one object per entry made every full (and, as entries
# churn, middle) collection walk them all: pauses of 50-300 ms at a million sellers, the p99 of
# cached reads (measured with gc.callbacks under `make bench`). A hit rebuilds the view (0.13 µs).
ENTRY = operator.attrgetter(*SellerView.__slots__)
VERSION = SellerView.__slots__.index("version")


class Cache:
    def __init__(self, size: int) -> None:
        self.size = size
        self.sellers: OrderedDict[str, tuple[Any, ...]] = OrderedDict()  # SellerView fields
        # Sellers missed once while the cache was full: only a second miss displaces another
        # (a doorkeeper, as in TinyLFU). Without it, reads spread over more sellers than the
        # cache holds (a million, uniformly) replaced an entry on nearly every read and were
        # slower than no cache at all; with it those reads cost what uncached ones do, and a
        # hot seller still gets in on its second read. Strings and None: a dict the garbage
        # collector never tracks, however large.
        self.seen: dict[str, None] = {}
        self.keys: dict[str, KeyView] = {}
        self.live = False  # True only while the listening connection is up
        self.generation = 0  # counts notifications and flushes
        self.floor = 0  # loads begun before this generation never store
        self.touched: dict[str, int] = {}  # row -> generation of its last notification

    # -- reads -------------------------------------------------------------------------------

    def seller(self, seller_id: str) -> SellerView | None:
        entry = self.sellers.get(seller_id)  # never filled at size 0, flushed when not live
        if entry is None or not self.live:
            return None
        self.sellers.move_to_end(seller_id)  # least recently read goes first
        return SellerView(*entry)

    def key(self, prefix: str) -> KeyView | None:
        return self.keys.get(prefix) if self.live else None  # keys: whatever the size

    # -- loads -------------------------------------------------------------------------------

    def begin(self) -> int:
        """Call before reading a row from the database; pass the result to `store_*`."""
        return self.generation

    def _fresh(self, row: str, begun: int) -> bool:
        return self.live and begun >= self.floor and self.touched.get(row, -1) <= begun

    def store_seller(self, view: SellerView, begun: int) -> None:
        if self.size <= 0 or not self._fresh(f"s:{view.seller_id}", begun):
            return
        current = self.sellers.get(view.seller_id)
        if current is not None and current[VERSION] > view.version:
            return  # never replace a newer entry with an older read
        if current is None and len(self.sellers) >= self.size and not self._admitted(view):
            return
        self.sellers[view.seller_id] = ENTRY(view)
        self.sellers.move_to_end(view.seller_id)
        while len(self.sellers) > self.size:
            self.sellers.popitem(last=False)

    def _admitted(self, view: SellerView) -> bool:
        if view.seller_id in self.seen:
            del self.seen[view.seller_id]
            return True
        if len(self.seen) >= self.size:
            self.seen.clear()  # forget old first misses: the window is one cache's worth
        self.seen[view.seller_id] = None
        return False

    def store_key(self, view: KeyView, begun: int) -> None:
        if self._fresh(f"k:{view.prefix}", begun):
            if len(self.keys) >= KEYS_MAX:
                self.keys.clear()  # a handful of keys in practice; never unbounded
            self.keys[view.prefix] = view

    # -- invalidation ------------------------------------------------------------------------

    def notified(self, payload: str) -> None:
        self.generation += 1
        kind, _, rest = payload.partition(":")
        if kind == "s":
            version, _, seller_id = rest.partition(":")
            self._touch(f"s:{seller_id}")
            entry = self.sellers.get(seller_id)
            if entry is not None and (not version.isdigit() or entry[VERSION] <= int(version)):
                del self.sellers[seller_id]
        elif kind == "k":
            self._touch(f"k:{rest}")
            self.keys.pop(rest, None)
        else:
            self.flush()  # unknown: be safe

    def _touch(self, row: str) -> None:
        self.touched[row] = self.generation
        if len(self.touched) > 4 * max(self.size, 1024):
            # Forget the marks, and with them every load that began before now.
            self.touched.clear()
            self.floor = self.generation + 1

    def flush(self) -> None:
        self.generation += 1
        self.floor = self.generation
        self.sellers.clear()
        self.seen.clear()
        self.keys.clear()
        self.touched.clear()

    # -- the listening connection -------------------------------------------------------------

    async def listen(self, url: str, stop: asyncio.Event) -> None:
        """Keep a LISTEN connection up until `stop`; the cache is live only while it is."""
        failures = 0
        while not stop.is_set():
            connection: Any = None
            lost = asyncio.Event()

            def closed(_connection: object, lost: asyncio.Event = lost) -> None:
                # Called by asyncpg as soon as it sees the connection close: do not wait for
                # the next ping to stop serving what a lost notification may have changed.
                self._bypass("ConnectionLost")
                lost.set()

            try:
                connection = await asyncpg.connect(**db.asyncpg_params(url), timeout=5)
                connection.add_termination_listener(closed)
                await connection.add_listener(CHANNEL, self._on_notify)
                self.flush()  # whatever changed while we were not listening
                self.live, failures = True, 0
                logs.event(log, "cache.listening", {})
                while not stop.is_set():
                    await _first(stop, lost, PING_SECONDS)
                    if lost.is_set():
                        break
                    await connection.fetchval("SELECT 1", timeout=PING_TIMEOUT_SECONDS)
            except Exception as exc:  # noqa: BLE001 any failure: stop serving from memory at once
                self._bypass(type(exc).__name__)
            finally:
                self.live = False
                self.flush()
                if connection is not None:
                    connection.remove_termination_listener(closed)
                    connection.terminate()
            failures += 1
            delay = RECONNECT_SECONDS[min(failures, len(RECONNECT_SECONDS)) - 1]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    def _bypass(self, error: str) -> None:
        if self.live:
            logs.event(log, "cache.bypassed", {"error": error}, 30)
        self.live = False
        self.flush()

    def _on_notify(self, _connection: object, _pid: int, _channel: str, payload: str) -> None:
        self.notified(payload)


async def _first(stop: asyncio.Event, lost: asyncio.Event, seconds: float) -> None:
    """Wait until either event is set, or `seconds` pass."""
    waiters = {asyncio.ensure_future(stop.wait()), asyncio.ensure_future(lost.wait())}
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
