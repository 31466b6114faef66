"""The FastAPI app: `create_app()` and its lifespan, which owns the process-wide objects."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from ipaddress import ip_network
from typing import Any

import httpx
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.routing import BaseRoute

from service import __version__
from service.core import db, errors
from service.core.config import Settings, get_settings
from service.core.runtime import Clock, Runtime, utcnow
from service.lifecycle import routes as lifecycle_routes
from service.lifecycle.sellers import Admin
from service.lifecycle.webhooks import Notifications
from service.linking import pages
from service.linking import routes as linking_routes
from service.linking.flow import Linking
from service.ops import docs, observe
from service.ops.background import Background, refresher_of
from service.proxy import routes as proxy_routes
from service.proxy.forward import Proxy
from service.refresh.engine import Refresher
from service.serving import routes as serving_routes
from service.serving.deps import Callers
from service.serving.fast import TokenReads
from service.serving.limits import Buckets, RequestLimits
from service.serving.tokens import Serving

FULL_COLLECTION_EVERY = 1000  # middle (generation 1) collections per full one; default 10

DESCRIPTION = """
Links Mercado Pago seller accounts to the platform and keeps their OAuth tokens valid.

Internal services authenticate with `Authorization: Bearer <api key>` (`broker api-keys create`).
Errors are `application/problem+json` with a stable `code`.
"""


class BrokerApp(FastAPI):
    """FastAPI, with the token reads answered in front of its middleware stack."""

    fast: TokenReads | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.fast is None or not await self.fast.answered(scope, receive, send):
            await super().__call__(scope, receive, send)


def create_app(
    settings: Settings | None = None,
    *,
    database_url: str | None = None,
    clock: Clock = utcnow,
    transport: httpx.AsyncBaseTransport | None = None,
) -> FastAPI:
    settings = settings or get_settings()
    health = observe.Health(settings.broker_readiness_grace_seconds)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = database_url
        if url is None:
            url = await asyncio.to_thread(db.database_url, settings)
        runtime = await Runtime.build(settings, url, clock=clock, transport=transport)
        refresher = refresher_of(runtime)
        app.state.runtime, app.state.refresher, app.state.health = runtime, refresher, health
        compose(app.state, runtime, refresher)
        background = Background(runtime, refresher, health, api=True)
        # Start-up's objects live as long as the process: keep the collector from walking
        # them again on every full collection (shorter GC pauses on the hot path).
        gc.collect()
        gc.freeze()
        # Frozen, they no longer count toward "a full collection once a quarter as many objects
        # as there are long-lived ones survive", so full collections came every half second
        # under load, each walking the whole token cache: 5-20 ms with 100,000 entries, the p99
        # of cached reads (gc.callbacks under `make bench`). One every 1,000 middle collections
        # instead: at a million sellers under Zipf reads, a full collection took 54 ms (its walk
        # of the 100,000-entry cache waits on memory, not on objects to free), and at 100 it
        # came every 8 s, in the p99 of every 10-second run; at 1,000 it comes every 80 s or
        # so at that load. Garbage cycles are still found by the younger generations; one that
        # outlives them waits for the next full collection (more of them at a higher load).
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
        try:
            yield
        finally:
            await background.stop()

    app = BrokerApp(
        title="Mercado Pago token broker",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's own would load Swagger UI and ReDoc from a CDN, and always open.
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    errors.install(app)
    token_route = next(
        route
        for route in serving_routes.router.routes
        if isinstance(route, APIRoute) and route.path == serving_routes.TOKEN_ROUTE
    )
    # The hot path, in front of everything below (service/serving/fast.py).
    app.fast = TokenReads(app, token_route, settings.broker_max_header_bytes)
    app.add_middleware(RequestLimits, settings=settings)
    app.add_middleware(errors.CatchAll)
    app.add_middleware(pages.SellerPageHeaders)  # on every answer to a seller's browser
    app.add_middleware(observe.Observe)  # outermost: counts refusals and failures too
    # Internal services' routes first (the proxy's, then the token routes, before
    # `/sellers/{seller_id:path}`, each of which the next would match too), then the seller's
    # browser, then Mercado Pago.
    for router in (
        linking_routes.router,
        proxy_routes.router,
        serving_routes.router,
        lifecycle_routes.router,
        linking_routes.pages_router,
        lifecycle_routes.notifications_router,
    ):
        summaries_from_docstrings(router.routes)
        app.include_router(router)

    @app.get(
        "/healthz",
        tags=["operations"],
        responses={
            200: {"content": {"application/json": {"example": {"status": "ok"}}}},
            **errors.responses(),
        },
    )
    async def healthz() -> dict[str, str]:
        """Liveness: answers while the process is alive."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        responses=readiness_responses(),
    )
    async def readyz() -> JSONResponse:
        """Readiness: able to serve (schema at head, database reachable within the grace)."""
        ready, status = health.ready()
        answer = {"status": status}
        if health.key_service:  # loud, not unready: see service/core/keys.py
            answer["key_service"] = health.key_service
        return JSONResponse(answer, status_code=200 if ready else 503)

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=PlainTextResponse,
        responses={
            200: {"content": {"text/plain": {"example": "broker_database_up 1.0\n"}}},
            **errors.responses(),
        },
    )
    async def metrics_endpoint() -> Response:
        """Prometheus metrics of this process (see ops/ for the dashboard and alerts)."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    docs.install(app, settings.broker_docs)
    summaries_from_docstrings(app.routes)
    return app


def compose(state: Any, rt: Runtime, refresher: Refresher) -> None:
    """Hand each flow the parts of the process it uses (the routes find them on app.state)."""
    per_minute = rt.settings.broker_failed_auth_per_address_per_minute
    state.callers = Callers(
        rt.cache,
        rt.db,
        rt.key_buckets,
        failures=Buckets(per_minute / 60, burst=per_minute),
        trusted=[ip_network(n, strict=False) for n in rt.settings.broker_trusted_proxies],
    )
    state.serving = Serving(
        rt.settings, rt.clock, rt.db, rt.keyring, rt.cache, rt.reads, refresher, rt.upstream
    )
    state.proxy = Proxy(rt.settings, state.serving, rt.api, rt.proxied)
    state.linking = Linking(rt.settings, rt.clock, rt.db, rt.keyring, rt.upstream, rt.tasks)
    state.notifications = Notifications(rt.settings, rt.clock, rt.db, rt.keyring, rt.upstream)
    state.admin = Admin(rt.settings, rt.clock, rt.db)


def readiness_responses() -> dict[int | str, dict[str, Any]]:
    documented = errors.responses()
    ok = {"status": "ok"}
    documented[200] = {
        "description": "Ready. With a key service (BROKER_KEY_SERVICE) whose last check failed, "
        "`key_service` says why (`unreachable`, `denied`, `key_unavailable`, `unavailable`): "
        "the data keys are in memory and serving goes on.",
        "content": {"application/json": {"example": ok}},
    }
    # Not ready is a plain JSON status (what a balancer's probe logs), beside the problems.
    documented[503]["description"] = (
        "Not ready: `shutting_down`, `schema_behind`, or `database_unreachable` for longer "
        "than BROKER_READINESS_GRACE_SECONDS; or " + documented[503]["description"]
    )
    documented[503]["content"]["application/json"] = {"example": {"status": "schema_behind"}}
    return documented


def summaries_from_docstrings(routes: Sequence[BaseRoute]) -> None:
    """A route's one-line docstring is its OpenAPI summary (not its function's name)."""
    for route in routes:
        if isinstance(route, APIRoute) and route.description and not route.summary:
            route.summary, route.description = route.description.strip(), ""
