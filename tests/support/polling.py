"""Bounded waits for what the broker promises to do soon (cache coherence: within a second)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, seconds: float) -> float:
    """Poll until `check` holds; returns how long it took (bounded by `seconds`)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not await check():
        if loop.time() - started > seconds:
            raise AssertionError(f"not within {seconds} s: {what}")
        await asyncio.sleep(0.01)
    return loop.time() - started
