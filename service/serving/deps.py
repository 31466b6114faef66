"""The API key dependency every internal route uses, and the token flow's parts for its routes."""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Annotated, Any

from fastapi import Depends, Header, Request

from service.core.domain import KeyView
from service.core.errors import RateLimited, Unauthorized
from service.core.runtime import Database
from service.serving import apikeys
from service.serving.cache import Cache
from service.serving.limits import Buckets, client_address
from service.serving.tokens import Serving

IPNetwork = IPv4Network | IPv6Network


# A failed authentication is answered no sooner than this after it began, whichever way it
# failed: an unknown prefix costs a database lookup and a known one with a wrong secret does
# not, and the difference would tell which prefixes exist (#13 finding 7).
FAILURE_FLOOR_SECONDS = 0.02
UNKNOWN_SECONDS = 10.0  # how long an unknown prefix is remembered (no lookup meanwhile)
UNKNOWN_MAX = 10_000


@dataclass(frozen=True)
class Callers:
    """Internal callers' API keys: checked from memory when the cache is live, rate limited;
    failed attempts are limited per client address, before any database lookup."""

    cache: Cache
    db: Database
    buckets: Buckets  # per key, once known
    failures: Buckets  # failed authentications, per client address
    trusted: list[IPNetwork] = field(default_factory=list)  # BROKER_TRUSTED_PROXIES
    unknown: OrderedDict[str, float] = field(default_factory=OrderedDict)  # prefix -> until
    # Authorization header -> (key prefix, the cached view the key was verified against): the
    # same view again skips parsing and the digest (a revocation or any change replaces the
    # cached view, so it no longer matches).
    verified: dict[str, tuple[str, KeyView]] = field(default_factory=dict)

    def known(self, authorization: str | None) -> KeyView | None:
        """The key, rate limited, when it was already verified against the view the cache still
        holds (no parsing, no digest, nothing awaited: the hot path); None: `authenticate` it."""
        known = self.verified.get(authorization or "")
        if known is None or self.cache.key(known[0]) is not known[1]:
            return None
        return self._admitted(known[1])

    async def authenticate(self, authorization: str | None, scope: Any) -> KeyView:
        key = self.known(authorization)
        if key is not None:
            return key
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            key = await self._key(authorization, scope, started)
        except Unauthorized:
            address = client_address(scope, self.trusted)
            self.failures.take(address, started)
            await asyncio.sleep(max(0.0, started + FAILURE_FLOOR_SECONDS - loop.time()))
            raise
        return self._admitted(key)

    def _admitted(self, key: KeyView) -> KeyView:
        wait = self.buckets.take(key.id)
        if wait:
            raise RateLimited(headers={"Retry-After": str(math.ceil(wait))})
        return key

    async def _key(self, authorization: str | None, scope: Any, now: float) -> KeyView:
        prefix, presented = apikeys.parse(authorization)
        key: KeyView | None = self.cache.key(prefix)
        if key is None:
            if self.unknown.get(prefix, 0.0) > now:
                raise Unauthorized(apikeys.UNKNOWN_KEY)
            if wait := self.failures.due(client_address(scope, self.trusted), now):
                # Too many failures from here: no lookup until the bucket refills.
                raise RateLimited(headers={"Retry-After": str(math.ceil(wait))})
            begun = self.cache.begin()
            async with self.db.autocommit.connect() as connection:
                key = await apikeys.find(connection, prefix)
            if key is not None:
                self.cache.store_key(key, begun)
            else:
                self.unknown[prefix] = now + UNKNOWN_SECONDS
                while len(self.unknown) > UNKNOWN_MAX:
                    self.unknown.popitem(last=False)
        verified = apikeys.verify(key, presented)
        if self.cache.key(prefix) is verified:  # only a view the cache holds (and drops)
            if len(self.verified) >= UNKNOWN_MAX:
                self.verified.clear()
            self.verified[authorization or ""] = (prefix, verified)
        return verified


# What the lifespan (service/main.py) put on app.state, for the routes. Async on purpose:
# FastAPI runs a plain `def` dependency in a worker thread, a thread hop per request.
async def get_callers(request: Request) -> Callers:
    callers: Callers = request.app.state.callers
    return callers


async def get_serving(request: Request) -> Serving:
    serving: Serving = request.app.state.serving
    return serving


CallersDep = Annotated[Callers, Depends(get_callers)]
ServingDep = Annotated[Serving, Depends(get_serving)]


async def api_key(
    request: Request,
    callers: CallersDep,
    authorization: Annotated[
        str | None, Header(description="`Bearer <api key>` from `broker api-keys create`")
    ] = None,
) -> KeyView:
    return await callers.authenticate(authorization, request.scope)


ApiKeyDep = Annotated[KeyView, Depends(api_key)]
