"""`BrokerClient` (threads) and `AsyncBrokerClient` (asyncio): thin shells that drive the calls
of core.py with their own I/O, and make concurrent misses for one seller share one request."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import httpx

from mp_broker.cache import CachePolicy, TokenCache
from mp_broker.core import DEFAULT_TIMEOUT, Call, Core, Outcome, Sleep, Step
from mp_broker.retry import RetryPolicy
from mp_broker.token import Token

T = TypeVar("T")
Flight = tuple[str, int]  # (seller_id, min_ttl): callers wanting the same answer share it


class BrokerClient:
    """The broker's token API for threaded code. Thread-safe; share one per process."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        cache: CachePolicy = CachePolicy(),  # noqa: B008 frozen, so one shared default is safe
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 frozen, shares the process's budget
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._core = Core(base_url, api_key, TokenCache(cache, clock), retry)
        self._http = httpx.Client(timeout=timeout, transport=transport)
        self._flights: dict[Flight, Future[Token]] = {}
        self._lock = threading.Lock()

    def token(self, seller_id: str, *, min_ttl: int = 0) -> Token:
        """A token with at least `min_ttl` seconds left (the broker refreshes first if need
        be; a freshly refreshed token is served even when it cannot meet that)."""
        cached = self._core.cache.get(seller_id, min_ttl)
        if cached is not None:
            return cached
        key = (seller_id, min_ttl)
        with self._lock:
            flight = self._flights.get(key)
            leads = flight is None
            if flight is None:
                flight = self._flights[key] = Future()
        if not leads:
            return flight.result()
        try:
            # Again: a flight that landed between the first look and taking the lock cached it.
            fetched = self._core.cache.get(seller_id, min_ttl) or self._run(
                self._core.fetch_token(seller_id, min_ttl)
            )
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        finally:
            with self._lock:
                del self._flights[key]
        flight.set_result(fetched)
        return fetched

    def report_invalid(self, seller_id: str) -> dict[str, Any]:
        """Tell the broker Mercado Pago refused the token (it checks, and marks a revoked
        seller relink_required); the cached token is dropped. Answers the seller's status."""
        return self._run(self._core.report_invalid(seller_id))

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> BrokerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, call: Call[T]) -> T:
        outcome: Outcome = None
        while True:
            try:
                step = call.send(outcome)
            except StopIteration as done:
                result: T = done.value
                return result
            outcome = self._do(step)

    def _do(self, step: Step) -> Outcome:
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        try:
            return self._http.send(step)
        except httpx.TransportError as exc:
            return exc


class AsyncBrokerClient:
    """The broker's token API for asyncio code; one per event loop."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        cache: CachePolicy = CachePolicy(),  # noqa: B008 frozen, so one shared default is safe
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 frozen, shares the process's budget
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._core = Core(base_url, api_key, TokenCache(cache, clock), retry)
        self._http = httpx.AsyncClient(timeout=timeout, transport=transport)
        self._flights: dict[Flight, asyncio.Task[Token]] = {}

    async def token(self, seller_id: str, *, min_ttl: int = 0) -> Token:
        """As `BrokerClient.token`."""
        cached = self._core.cache.get(seller_id, min_ttl)
        if cached is not None:
            return cached
        key = (seller_id, min_ttl)
        flight = self._flights.get(key)
        if flight is None:
            # A task of its own: a caller that is cancelled cancels only its own wait.
            flight = asyncio.ensure_future(self._run(self._core.fetch_token(seller_id, min_ttl)))
            self._flights[key] = flight
            flight.add_done_callback(lambda _: self._flights.pop(key, None))
        return await asyncio.shield(flight)

    async def report_invalid(self, seller_id: str) -> dict[str, Any]:
        """As `BrokerClient.report_invalid`."""
        return await self._run(self._core.report_invalid(seller_id))

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncBrokerClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _run(self, call: Call[T]) -> T:
        outcome: Outcome = None
        while True:
            try:
                step = call.send(outcome)
            except StopIteration as done:
                result: T = done.value
                return result
            outcome = await self._do(step)

    async def _do(self, step: Step) -> Outcome:
        if isinstance(step, Sleep):
            await asyncio.sleep(step.seconds)
            return None
        try:
            return await self._http.send(step)
        except httpx.TransportError as exc:
            return exc
