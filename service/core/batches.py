"""Lookups asked for in one turn of the event loop, answered together by one call.

Under load, token reads that miss the cache arrive dozens per turn of the event loop. Read one
by one, each costs a pool checkout, a statement and its round trip, and every one of those
waits for the loop, which is busy with everyone else: at a million sellers that, not
PostgreSQL, bounded reads and made their tail. Asked through `Batches`, the misses of one turn
are read with one statement on one connection, and a key asked twice in it is read once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Batches(Generic[K, V]):
    def __init__(self, fetch: Callable[[list[K]], Awaitable[dict[K, V]]], most: int) -> None:
        self.fetch = fetch  # the values of the keys it finds; a key it leaves out is None
        self.most = most  # keys per call
        self.waiting: dict[K, asyncio.Future[V | None]] = {}
        self.running: set[asyncio.Task[None]] = set()

    async def get(self, key: K) -> V | None:
        future = self.waiting.get(key)
        if future is None:
            loop = asyncio.get_running_loop()
            if not self.waiting:
                loop.call_soon(self._send)  # after everything this turn has ready
            future = self.waiting[key] = loop.create_future()
        # Shielded: one caller giving up (a timeout) must not cancel the read for the others.
        return await asyncio.shield(future)

    def _send(self) -> None:
        waiting, self.waiting = self.waiting, {}
        keys = list(waiting)
        loop = asyncio.get_running_loop()
        for start in range(0, len(keys), self.most):
            batch = {key: waiting[key] for key in keys[start : start + self.most]}
            task = loop.create_task(self._answer(batch))
            self.running.add(task)
            task.add_done_callback(self.running.discard)

    async def _answer(self, batch: dict[K, asyncio.Future[V | None]]) -> None:
        try:
            found = await self.fetch(list(batch))
        except BaseException as exc:
            for future in batch.values():
                if not future.done():
                    if isinstance(exc, asyncio.CancelledError):
                        future.cancel()
                    else:
                        future.set_exception(exc)
                        future.exception()  # retrieved: a caller who gave up logs nothing
            if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise
            return
        for key, future in batch.items():
            if not future.done():
                future.set_result(found.get(key))
