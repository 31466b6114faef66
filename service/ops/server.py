"""How every broker server runs: uvicorn with httptools, bounded against slow and idle clients.

uvicorn closes a keep-alive connection that stays idle after a response
(`timeout_keep_alive`), but nothing bounds a connection before its request's headers are in: a
socket that never sends, or one that drips a header every few seconds (slowloris), held a
connection for as long as the client liked (125 s measured, and 200 of them never cut). So
`BoundedHttpTools` gives every request a header deadline, from the connection's first moment or
the request's first byte; and `limit_concurrency` caps connections and tasks together (beyond
it uvicorn answers 503 at once instead of queueing).

These bound one process. The deployment's proxy should still add its own: a header and body
read timeout, a per-address connection limit, and TLS (README: "Deploying").
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.ops.background import REQUEST_GRACE_SECONDS

HEADER_SECONDS = 10.0  # from a connection's start, or a request's first byte, to its headers
KEEP_ALIVE_SECONDS = 5.0  # idle after a response (uvicorn's default, stated here)
MAX_CONNECTIONS = 2048  # connections + requests in flight, per process


class BoundedHttpTools(HttpToolsProtocol):
    """httptools' protocol with a header deadline."""

    header_seconds = HEADER_SECONDS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()  # a socket that never sends is cut too

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self.header_deadline is None:  # a later request on a kept-alive connection
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self.header_deadline = self.loop.call_later(self.header_seconds, self._too_slow)

    def _disarm(self) -> None:
        if self.header_deadline is not None:
            self.header_deadline.cancel()
            self.header_deadline = None

    def _too_slow(self) -> None:
        self.header_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def bounded(header_seconds: float) -> type[BoundedHttpTools]:
    """The protocol class with its own deadline (uvicorn builds one instance per connection)."""
    return type("BoundedHttpTools", (BoundedHttpTools,), {"header_seconds": header_seconds})


def uvicorn_config(
    app: Any,
    host: str,
    port: int,
    *,
    header_seconds: float = HEADER_SECONDS,
    max_connections: int = MAX_CONNECTIONS,
) -> uvicorn.Config:
    """How every broker server runs (bench/ serves its bare baseline app the same way)."""
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        # No access log: the callback's query string holds an authorization code and a state.
        access_log=False,
        # No `server: uvicorn`: it tells an attacker what to try, and costs every reply a header.
        server_header=False,
        # uvicorn would believe X-Forwarded-For from any loopback peer; the broker reads it
        # itself, only from BROKER_TRUSTED_PROXIES (service/serving/limits.py).
        proxy_headers=False,
        # libuv's event loop and the C HTTP parser: the hot path's per-request cost halves.
        loop="uvloop",
        http=bounded(header_seconds),
        timeout_keep_alive=int(KEEP_ALIVE_SECONDS),
        limit_concurrency=max_connections,
        # After SIGTERM, requests in flight get this long; then the lifespan's shutdown runs
        # (background.py: one budget for both, inside compose's 30 s grace).
        timeout_graceful_shutdown=int(REQUEST_GRACE_SECONDS),
    )
