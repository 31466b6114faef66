"""The in-process token cache: per seller, least recently used first out, thread-safe."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from mp_broker.token import Token


@dataclass(frozen=True, slots=True)
class CachePolicy:
    size: int = 10_000
    # A cached token is served only with at least this long left (or `min_ttl`, if more): a
    # token handed out seconds before it expires would fail mid-call.
    margin_seconds: float = 60.0
    # How long the broker's answer is trusted: an unlink, a relink or a new warning reaches
    # callers within this. A token with a warning is re-read sooner, its warning kept.
    max_age_seconds: float = 300.0
    warned_max_age_seconds: float = 30.0


@dataclass(frozen=True, slots=True)
class Entry:
    token: Token
    expires: float  # token.expires_at as a timestamp: compared on every hit
    stale_at: float


class TokenCache:
    def __init__(self, policy: CachePolicy, clock: Callable[[], float] = time.time) -> None:
        self.policy = policy
        self.clock = clock
        self.margin = policy.margin_seconds
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, seller_id: str, min_ttl: float) -> Token | None:
        """The cached token if it is fresh and has `min_ttl` left, else None."""
        with self._lock:
            entry = self._entries.get(seller_id)
            if entry is None:
                return None
            now = self.clock()
            if now >= entry.stale_at or entry.expires - now < max(min_ttl, self.margin):
                return None
            self._entries.move_to_end(seller_id)
            return entry.token

    def put(self, seller_id: str, token: Token) -> None:
        now = self.clock()
        age = self.policy.warned_max_age_seconds if token.warning else self.policy.max_age_seconds
        entry = Entry(token, token.expires_at.timestamp(), now + age)
        with self._lock:
            self._entries[seller_id] = entry
            self._entries.move_to_end(seller_id)
            while len(self._entries) > self.policy.size:
                self._entries.popitem(last=False)

    def drop(self, seller_id: str) -> None:
        with self._lock:
            self._entries.pop(seller_id, None)

    def __len__(self) -> int:
        return len(self._entries)
