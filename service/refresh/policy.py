"""When a seller's token should be refreshed, and how long to back off. Pure: no I/O, no clock."""

from __future__ import annotations

import random
from datetime import datetime, timedelta

from service.core.config import Settings


def next_refresh_at(issued_at: datetime, expires_in: int, settings: Settings) -> datetime:
    """Refresh once `fraction` of the lifetime has passed, moved earlier by up to `jitter`.

    The jitter spreads a wave of sellers linked together (only ever earlier, never past the
    target); the floor keeps a short-lived token (Mercado Pago has issued 6-hour ones) from
    coming due again at once.
    """
    target = expires_in * settings.broker_refresh_fraction
    jitter = random.uniform(0, expires_in * settings.broker_refresh_jitter_fraction)  # noqa: S311
    floor = min(settings.broker_refresh_floor_seconds, target)
    return issued_at + timedelta(seconds=max(target - jitter, floor))


def backoff(step: int, base_seconds: float, max_seconds: float) -> timedelta:
    """Exponential backoff: `base_seconds * 2**step` capped at `max_seconds`, with jitter in its
    upper half (the retries of a wave spread out). Refreshes and event deliveries both use it."""
    ceiling = min(max_seconds, base_seconds * 2.0 ** min(max(step, 0), 1000))
    return timedelta(seconds=random.uniform(ceiling / 2, ceiling))  # noqa: S311 (jitter only)
