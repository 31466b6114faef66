"""When a failed call is sent again: only where it is safe, within a bounded budget.

Safe means the broker did nothing (503, 429: it says when to come back in Retry-After) or the
request never left (the connection was refused or timed out). Each call makes at most
`attempts` tries within `total_seconds`, waiting with full jitter; and every retry spends a
token of a process-wide bucket that only successes refill, so when the broker is down the
callers of a process send each call about once instead of `attempts` times.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field

RETRIED_STATUSES = frozenset({429, 503})


class RetryBudget:
    """A token bucket of retries, shared by every client of the process (gRPC's retry
    throttling): a retry takes a token, an answered call gives back `refund`."""

    def __init__(self, capacity: float = 10.0, refund: float = 0.1) -> None:
        self.capacity = capacity
        self.refund = refund
        self._tokens = capacity
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self._tokens < 1.0:
                return False
            self._tokens -= 1.0
            return True

    def answered(self) -> None:
        with self._lock:
            self._tokens = min(self.capacity, self._tokens + self.refund)


PROCESS_BUDGET = RetryBudget()


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 3
    total_seconds: float = 10.0  # no retry would end later than this after the first send
    backoff_seconds: float = 0.1
    backoff_max_seconds: float = 2.0
    budget: RetryBudget = field(default=PROCESS_BUDGET)

    def wait(self, attempt: int, retry_after: float | None) -> float:
        """Seconds before try `attempt + 1`: at least Retry-After, plus full jitter so that the
        callers turned away together do not come back together."""
        ceiling = min(self.backoff_max_seconds, self.backoff_seconds * 2 ** (attempt - 1))
        return (retry_after or 0.0) + random.uniform(0.0, ceiling)  # noqa: S311 jitter, no secret
