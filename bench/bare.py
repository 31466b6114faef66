"""The ceilings: a bare FastAPI app, and a framework-free ASGI callable (`--raw`), each
answering a constant JSON body, served like the broker.

`python -m bench.bare --port P --body-bytes B [--raw]` serves `GET /sellers/{seller_id}/token`
with a precomputed body of exactly B bytes (the size of a real token reply, measured by
bench.run). The raw callable is what uvicorn itself can do on these settings: the real ceiling
of a hot path that no longer goes through FastAPI.
The server is built by `service.ops.server.uvicorn_config` and run the way `service.ops.cli`
runs the broker (`asyncio.run(server.serve())` in one process, on uvloop when the config says
so), so flags, event loop and worker count are the broker's own; bench.run checks which loop
each server really runs. The path is the broker's, so one wrk script drives both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from typing import Any

from fastapi import FastAPI, Response

from service.ops.cli import QuietServer
from service.ops.server import uvicorn_config


def constant_body(size: int) -> bytes:
    """A token-reply-shaped JSON object of exactly `size` bytes (padding in access_token)."""
    shape: dict[str, object] = {
        "access_token": "",
        "token_type": "bearer",
        "expires_at": "2027-05-27T12:00:00Z",
        "mp_user_id": 123456789,
        "live_mode": True,
        "scope": "offline_access read write",
    }
    empty = len(json.dumps(shape, separators=(",", ":")).encode())
    if size < empty:
        shape = {"p": ""}
        empty = len(json.dumps(shape, separators=(",", ":")).encode())
        if size < empty:
            raise ValueError(f"a JSON body of {size} bytes is too small")
        shape["p"] = "x" * (size - empty)
    else:
        shape["access_token"] = ("APP_USR-" + "0" * size)[: size - empty]
    body = json.dumps(shape, separators=(",", ":")).encode()
    assert len(body) == size, (len(body), size)
    return body


def create_bare_app(body_bytes: int) -> FastAPI:
    body = constant_body(body_bytes)
    app = FastAPI(title="bare ceiling", openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/sellers/{seller_id}/token")
    async def token(seller_id: str) -> Response:
        return Response(body, media_type="application/json")

    @app.get("/readyz")
    async def readyz() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    return app


def create_raw_app(body_bytes: int) -> Any:
    """A plain ASGI callable: the same answer and headers as the FastAPI app, no framework."""
    body, ok = constant_body(body_bytes), b'{"status":"ok"}'

    def start(length: int) -> dict[str, Any]:
        headers = [
            (b"content-length", str(length).encode()),
            (b"content-type", b"application/json"),
        ]
        return {"type": "http.response.start", "status": 200, "headers": headers}

    token = (start(len(body)), {"type": "http.response.body", "body": body})
    ready = (start(len(ok)), {"type": "http.response.body", "body": ok})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        head, reply = ready if scope["path"] == "/readyz" else token
        await send(head)
        await send(reply)

    return app


def run(app: Any, host: str, port: int) -> None:
    """Serve `app` until SIGINT/SIGTERM with the broker's flags, loop and process model."""
    server = QuietServer(uvicorn_config(app, host, port))
    if server.config.loop == "uvloop":
        # uvicorn applies `loop` only in its own run(); under asyncio.run it is ours to set,
        # as service.ops.cli does for the broker. (Imported here: bench.run tells which loop a
        # server runs by whether uvloop is mapped into it.)
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
        await server.serve()

    asyncio.run(serve())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-bytes", type=int, required=True)
    parser.add_argument("--raw", action="store_true", help="no framework: a plain ASGI callable")
    args = parser.parse_args()
    create = create_raw_app if args.raw else create_bare_app
    run(create(args.body_bytes), args.host, args.port)


if __name__ == "__main__":
    main()
