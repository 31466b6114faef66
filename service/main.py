"""The FastAPI app: `create_app()` and its lifespan, which owns the process-wide objects."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from service import db, errors
from service.api import internal, seller, webhooks
from service.config import Settings, get_settings
from service.limits import RequestLimits
from service.refresh import Refresher
from service.runtime import Clock, Runtime, utcnow

DESCRIPTION = """
Links Mercado Pago seller accounts to the platform and keeps their OAuth tokens valid.

Internal services authenticate with `Authorization: Bearer <api key>` (`broker api-keys create`).
Errors are `application/problem+json` with a stable `code`.
"""


def create_app(
    settings: Settings | None = None,
    *,
    database_url: str | None = None,
    clock: Clock = utcnow,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = database_url
        if url is None:
            url = await asyncio.to_thread(db.database_url, settings)
        runtime = Runtime.build(settings, url, clock=clock, transport=transport)
        refresher = Refresher(runtime)
        app.state.runtime, app.state.refresher = runtime, refresher
        stop = asyncio.Event()
        background = [
            asyncio.create_task(
                runtime.reads.run(runtime.sessions, stop, settings.broker_audit_flush_seconds)
            )
        ]
        if settings.broker_serve_refresher:
            background.append(asyncio.create_task(refresher.run(stop)))
        try:
            yield
        finally:
            stop.set()  # no new claims; close() then waits for refreshes in flight to store
            await asyncio.gather(*background)
            await runtime.close()

    app = FastAPI(
        title="Mercado Pago token broker",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    errors.install(app)
    app.add_middleware(RequestLimits, settings=settings)
    app.add_middleware(errors.CatchAll)
    for router in (internal.router, seller.router, webhooks.router):
        summaries_from_docstrings(router.routes)
        app.include_router(router)

    @app.get("/healthz", tags=["operations"])
    async def healthz() -> dict[str, str]:
        """Answers while the process is alive."""
        return {"status": "ok"}

    summaries_from_docstrings(app.routes)
    return app


def summaries_from_docstrings(routes: Sequence[BaseRoute]) -> None:
    """A route's one-line docstring is its OpenAPI summary (not its function's name)."""
    for route in routes:
        if isinstance(route, APIRoute) and route.description:
            route.summary, route.description = route.description.strip(), ""
