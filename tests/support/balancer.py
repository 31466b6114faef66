"""Reads of random sellers' tokens through the API replicas "in the balancer": the load that
the failover and rolling-upgrade tests keep up while they break or replace things."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Reply:
    backend: str
    at: float  # time.monotonic()
    status: int  # 0: no answer at all


class Balancer:
    """Bounded read loops (`start`), each sending to a random backend of those listed now."""

    def __init__(self, http: httpx.AsyncClient, sellers: list[str], backends: list[str]) -> None:
        self.http, self.sellers, self.backends = http, sellers, backends
        self.replies: list[Reply] = []
        self.stop = asyncio.Event()
        self.loops: list[asyncio.Task[None]] = []

    def start(self, workers: int = 2) -> None:
        self.loops = [asyncio.create_task(self._run(n)) for n in range(workers)]

    async def _run(self, worker: int) -> None:
        pick = random.Random(worker)
        for _ in range(20_000):  # bounded in count as well as by `stop`
            if self.stop.is_set():
                return
            backend = pick.choice(self.backends)
            try:
                reply = await self.http.get(f"{backend}/sellers/{pick.choice(self.sellers)}/token")
                status = reply.status_code
            except httpx.TransportError:
                status = 0
            self.replies.append(Reply(backend, time.monotonic(), status))
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.loops, return_exceptions=True)  # their outcomes: the replies

    def statuses(self) -> Counter[int]:
        return Counter(reply.status for reply in self.replies)

    def by_backend(self) -> Counter[str]:
        return Counter(reply.backend for reply in self.replies)

    def serving_again(self, backend: str, after: float) -> float:
        """Seconds from `after` to the backend's first 200 answered after it."""
        return min(
            (
                r.at - after
                for r in self.replies
                if r.backend == backend and r.at > after and r.status == 200
            ),
            default=float("inf"),
        )
