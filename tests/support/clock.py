"""An injectable clock: tests move time forward instead of sleeping until something expires."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta


@dataclass
class FakeClock:
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


def busiest(times: Iterable[float], window: float) -> int:
    """Most of `times` (seconds) within any `window` seconds, both ends included."""
    starts = sorted(times)
    most = low = 0
    for high, t in enumerate(starts):
        while starts[low] < t - window:
            low += 1
        most = max(most, high - low + 1)
    return most
