"""Dependencies shared by the routes: the process runtime and the caller's API key."""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import Depends, Header, Request

from service.core.domain import KeyView
from service.core.errors import RateLimited
from service.core.runtime import Runtime
from service.refresh.engine import Refresher
from service.serving import apikeys


# Async on purpose: FastAPI runs a plain `def` dependency in a worker thread, a thread hop
# per request on the hot path.
async def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


async def get_refresher(request: Request) -> Refresher:
    refresher: Refresher = request.app.state.refresher
    return refresher


RefresherDep = Annotated[Refresher, Depends(get_refresher)]


async def authenticate(rt: Runtime, authorization: str | None) -> KeyView:
    """The caller's key, from memory when the cache is live, and its rate limit."""
    prefix, presented = apikeys.parse(authorization)
    key = rt.cache.key(prefix)
    if key is None:
        begun = rt.cache.begin()
        async with rt.db.autocommit.connect() as connection:
            key = await apikeys.find(connection, prefix)
        if key is not None:
            rt.cache.store_key(key, begun)
    key = apikeys.verify(key, presented)
    wait = rt.key_buckets.take(key.id)
    if wait:
        raise RateLimited(headers={"Retry-After": str(math.ceil(wait))})
    return key


async def api_key(
    rt: RuntimeDep,
    authorization: Annotated[
        str | None, Header(description="`Bearer <api key>` from `broker api-keys create`")
    ] = None,
) -> KeyView:
    return await authenticate(rt, authorization)


ApiKeyDep = Annotated[KeyView, Depends(api_key)]
