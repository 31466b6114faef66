"""The API key dependency every internal route uses, and the token flow's parts for its routes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request

from service.core.domain import KeyView
from service.core.errors import RateLimited
from service.core.runtime import Database
from service.serving import apikeys
from service.serving.cache import Cache
from service.serving.limits import Buckets
from service.serving.tokens import Serving


@dataclass(frozen=True)
class Callers:
    """Internal callers' API keys: checked from memory when the cache is live, rate limited."""

    cache: Cache
    db: Database
    buckets: Buckets

    async def authenticate(self, authorization: str | None) -> KeyView:
        prefix, presented = apikeys.parse(authorization)
        key = self.cache.key(prefix)
        if key is None:
            begun = self.cache.begin()
            async with self.db.autocommit.connect() as connection:
                key = await apikeys.find(connection, prefix)
            if key is not None:
                self.cache.store_key(key, begun)
        key = apikeys.verify(key, presented)
        wait = self.buckets.take(key.id)
        if wait:
            raise RateLimited(headers={"Retry-After": str(math.ceil(wait))})
        return key


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
    callers: CallersDep,
    authorization: Annotated[
        str | None, Header(description="`Bearer <api key>` from `broker api-keys create`")
    ] = None,
) -> KeyView:
    return await callers.authenticate(authorization)


ApiKeyDep = Annotated[KeyView, Depends(api_key)]
