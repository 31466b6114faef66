"""The ceiling: a bare FastAPI app answering a constant JSON body, served like the broker.

`python -m bench.bare --port P --body-bytes B` serves `GET /sellers/{seller_id}/token` with a
precomputed body of exactly B bytes (the size of a real token reply, measured by bench.run).
The server is built by `service.cli.uvicorn_config` and run the way `service.cli` runs the
broker (`asyncio.run(server.serve())`, one process), so flags, event loop and worker count
are the broker's own. The path is the broker's, so one wrk script drives both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal

from fastapi import FastAPI, Response

from service.cli import QuietServer, uvicorn_config


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


async def serve(app: FastAPI, host: str, port: int) -> None:
    server = QuietServer(uvicorn_config(app, host, port))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: setattr(server, "should_exit", True))
    await server.serve()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--body-bytes", type=int, required=True)
    args = parser.parse_args()
    # As service.cli.cmd_serve: asyncio.run around Server.serve (not uvicorn.run).
    asyncio.run(serve(create_bare_app(args.body_bytes), args.host, args.port))


if __name__ == "__main__":
    main()
