"""Early refusals: absurd requests, and callers that ask too often.

`RequestLimits` is pure ASGI middleware (no per-request task or body buffering): it refuses
oversized query strings (414), headers (431) and bodies (413), and a control character in the
path or a NUL in the query (422), before any route runs, and rate
limits the seller-facing pages (`GET /link/{id}`, `GET /oauth/callback`) per client address
(429 + Retry-After). Internal callers (`POST /link/start` included) are rate limited per API
key in the auth dependency, once the key is known, never per address: many of them may share
one address (a NAT, a sidecar).

Limits are per replica: each process keeps its own buckets (no shared state on the hot path).
With N replicas behind a balancer, a caller gets up to N times the configured rate.
"""

from __future__ import annotations

import ipaddress
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from service.core.config import Settings
from service.core.errors import (
    BodyTooLarge,
    HeadersTooLarge,
    InvalidRequest,
    RateLimited,
    UriTooLong,
    problem_response,
)
from service.core.schemas import PROXY_SEPARATOR

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CONTROL = re.compile(r"[\x00-\x1f\x7f]")
CONTROL_REFUSED = "The path holds a control character, or the query a NUL"
SELLER_FACING = ("/link/", "/oauth/callback")  # the pages a seller's browser opens: GET only


def seller_facing(scope: Scope) -> bool:
    """`GET /link/{id}` and `GET /oauth/callback`; not the internal `POST /link/start`."""
    return scope["method"] in ("GET", "HEAD") and scope["path"].startswith(SELLER_FACING)


class Buckets:
    """Token buckets per key: `rate` per second, bursts of `burst`; the least recent forgotten.

    A bucket is a mutable [tokens, updated] pair, changed in place: `take` runs on every
    internal request, and popping and re-inserting an immutable pair cost it 1.2 µs, twice a
    cached token read's lookup of the token itself (in process)."""

    def __init__(self, rate: float, burst: float, capacity: int = 100_000) -> None:
        self.rate, self.burst, self.capacity = rate, burst, capacity
        self.buckets: OrderedDict[str, list[float]] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> float:
        """Take one; 0 when allowed, else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        # `_bucket`, `_refilled` and `_wait` written out: a call each was a third of it.
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self._new(key, now)
        else:
            self.buckets.move_to_end(key)
        tokens = bucket[0] + (now - bucket[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        bucket[1] = now
        if tokens >= 1:
            bucket[0] = tokens - 1
            return 0.0
        bucket[0] = tokens
        return (1 - tokens) / self.rate

    def due(self, key: str, now: float) -> float:
        """Seconds until `key` has one again (0: it has one now); takes nothing."""
        bucket = self.buckets.get(key)
        return self._wait(self.burst if bucket is None else self._refilled(bucket, now))

    def reserve(self, key: str, now: float) -> float:
        """Take one even before it is there (the bucket goes below zero); the seconds until it
        is. For callers that wait their turn rather than being refused: with a `burst` below
        one, every one of them waits."""
        bucket = self._bucket(key, now)
        tokens = self._refilled(bucket, now)
        bucket[0], bucket[1] = tokens - 1, now
        return self._wait(tokens)

    def _bucket(self, key: str, now: float) -> list[float]:
        """`key`'s bucket, now the most recent (a key not seen yet: a full one)."""
        bucket = self.buckets.get(key)
        if bucket is None:
            return self._new(key, now)
        self.buckets.move_to_end(key)  # the least recent goes first
        return bucket

    def _new(self, key: str, now: float) -> list[float]:
        """A full bucket for a key not seen yet, the most recent; the least recent forgotten."""
        bucket = self.buckets[key] = [self.burst, now]
        if len(self.buckets) > self.capacity:
            self.buckets.popitem(last=False)
        return bucket

    def _refilled(self, bucket: list[float], now: float) -> float:
        """What a bucket holds at `now`."""
        tokens, updated = bucket
        return min(self.burst, tokens + (now - updated) * self.rate)

    def _wait(self, tokens: float) -> float:
        return 0.0 if tokens >= 1 else (1 - tokens) / self.rate


def client_address(
    scope: Scope, trusted: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> str:
    """The caller's address; `X-Forwarded-For` counts only when the peer is a trusted proxy.

    Several header lines are one list, in the order received (RFC 9110 §5.3), so a proxy that
    appends a line of its own adds to the right. Walk that list from the right, skipping
    trusted proxies: the first untrusted hop is the client (anything further left could be
    forged by it).
    """
    peer: str = (scope.get("client") or ("unknown", 0))[0]
    chain: list[str] = []
    for name, value in scope.get("headers", []):
        if name == b"x-forwarded-for":
            chain += value.decode("latin-1").split(",")
    chain.append(peer)
    for hop in reversed([h.strip() for h in chain]):
        try:
            address = ipaddress.ip_address(hop)
        except ValueError:
            return str(hop) or "unknown"
        if not any(address in net for net in trusted):
            return str(hop)
    return chain[0].strip()


class RequestLimits:
    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.max_body = settings.broker_max_body_bytes
        self.max_proxied_body = settings.broker_proxy_max_body_bytes  # Mercado Pago's, passed on
        self.max_query = settings.broker_max_query_bytes
        self.max_headers = settings.broker_max_header_bytes
        self.trusted = [
            ipaddress.ip_network(n, strict=False) for n in settings.broker_trusted_proxies
        ]
        per_minute = settings.broker_rate_limit_per_address_per_minute
        self.addresses = Buckets(per_minute / 60, burst=per_minute)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            status, code, title, headers = refusal
            await problem_response(status, code, title, title, headers)(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)  # no body is read: nothing to count
            return
        await self._bounded(scope, receive, send)

    def _refusal(self, scope: Scope) -> tuple[int, str, str, dict[str, str]] | None:
        query = scope.get("query_string", b"")
        if len(query) > self.max_query:
            return UriTooLong.status, UriTooLong.code, UriTooLong.title, {}
        if b"%00" in query or CONTROL.search(scope["path"]):
            # PostgreSQL stores no NUL in text, and asyncpg raises on one (a 500): no client
            # string with one reaches a query. No path holds a control character either: the
            # routes' `$` would match before a trailing newline (`/sellers/x/token\n`).
            return InvalidRequest.status, InvalidRequest.code, CONTROL_REFUSED, {}
        headers = scope.get("headers", [])
        if sum(len(n) + len(v) for n, v in headers) > self.max_headers:
            return HeadersTooLarge.status, HeadersTooLarge.code, HeadersTooLarge.title, {}
        for name, value in headers:
            if name == b"content-length" and (
                not value.isdigit() or int(value) > self._max_body(scope)
            ):
                return BodyTooLarge.status, BodyTooLarge.code, BodyTooLarge.title, {}
        if seller_facing(scope):
            wait = self.addresses.take(client_address(scope, self.trusted))
            if wait:
                retry = {"Retry-After": str(math.ceil(wait))}
                return 429, RateLimited.code, RateLimited.title, retry
        return None

    def _max_body(self, scope: Scope) -> int:
        proxied = scope["path"].startswith("/sellers/") and PROXY_SEPARATOR in scope["path"]
        return self.max_proxied_body if proxied else self.max_body

    async def _bounded(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count a body sent without Content-Length (chunked) and answer 413 at the limit.

        The app then sees the client gone, and whatever it tries to answer is dropped.
        """
        seen, refused, limit = 0, False, self._max_body(scope)

        async def bounded_receive() -> Message:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request" and not refused:
                seen += len(message.get("body", b""))
                if seen > limit:
                    refused = True
                    too_large = problem_response(
                        BodyTooLarge.status,
                        BodyTooLarge.code,
                        BodyTooLarge.title,
                        BodyTooLarge.title,
                    )
                    await too_large(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            if not refused:
                await send(message)

        await self.app(scope, bounded_receive, guarded_send)
