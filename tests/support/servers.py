"""The simulator and the broker as the tests see them, and a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI

from service.core.config import Settings
from service.main import create_app
from service.ops.cli import QuietServer
from service.refresh.engine import Refresher


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit this; without it every reply waits ~40 ms on delayed ACKs.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()
    return f"http://{host}:{port}"


class PromptServer(QuietServer):
    """Stops as soon as it is asked. uvicorn polls `should_exit` every 0.1 s and sleeps 0.1 s
    more while shutting down (and 0.1 s per poll of open connections): with two servers per
    test that was most of an ordinary API test's cost."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.stop = asyncio.Event()

    async def main_loop(self) -> None:
        while not await self.on_tick(0):  # tick 0: refresh the Date header, check should_exit
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), 1.0)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle keep-alive ones close now, busy ones after replying
        loop = asyncio.get_running_loop()
        give_up = loop.time() + 30
        while self.server_state.connections or self.server_state.tasks:
            if loop.time() > give_up:
                for task in self.server_state.tasks:
                    task.cancel()
                break
            await asyncio.sleep(0.002)
        for server in self.servers:
            await server.wait_closed()
        await self.lifespan.shutdown()


class Loopback:
    """A real uvicorn server in the test's event loop, on a port it already holds."""

    def __init__(self, app: FastAPI, sock: socket.socket) -> None:
        self.sock = sock
        self.url = url_of(sock)
        self.server = PromptServer(
            uvicorn.Config(
                app, log_config=None, access_log=False, lifespan="on", proxy_headers=False
            )
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Loopback:
        self.task = asyncio.create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.005)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.server.stop.set()
        assert self.task is not None
        await self.task
        self.sock.close()


@dataclass
class Simulator:
    url: str
    http: httpx.AsyncClient

    async def faults(self, **plan: Any) -> None:
        (await self.http.post("/_control/faults", json=plan)).raise_for_status()

    async def log(self) -> list[dict[str, Any]]:
        reply = await self.http.get("/_control/log")
        reply.raise_for_status()
        entries: list[dict[str, Any]] = reply.json()
        return entries

    async def release(self) -> None:
        (await self.http.post("/_control/release")).raise_for_status()

    async def wait_until_held(self, count: int = 1) -> None:
        """Bounded wait until `count` token replies are held by the simulator."""
        for _ in range(400):
            if sum(1 for e in await self.log() if e["outcome"] == "held") >= count:
                return
            await asyncio.sleep(0.025)
        raise AssertionError(f"the simulator never held {count} replies")

    async def token_requests(self, grant_type: str = "authorization_code") -> int:
        return sum(1 for entry in await self.log() if entry["grant_type"] == grant_type)


@dataclass
class Broker:
    url: str
    http: httpx.AsyncClient  # authenticated internal caller
    api_key: str
    settings: Settings
    app: FastAPI

    @property
    def refresher(self) -> Refresher:
        refresher: Refresher = self.app.state.refresher
        return refresher

    async def token(self, seller_id: str, **params: Any) -> httpx.Response:
        return await self.http.get(f"/sellers/{seller_id}/token", params=params)

    async def start_link(self, seller_id: str, **body: Any) -> str:
        reply = await self.http.post("/link/start", json={"seller_id": seller_id, **body})
        assert reply.status_code == 201, reply.text
        link_url: str = reply.json()["link_url"]
        return link_url


@contextlib.asynccontextmanager
async def serve_broker(
    settings: Settings, sock: socket.socket, database_url: str, clock: Any, api_key: str
) -> AsyncIterator[Broker]:
    """The broker app on `sock` (closed when it stops), called as `api_key`."""
    app = create_app(settings, database_url=database_url, clock=clock)
    async with (
        Loopback(app, sock) as server,
        httpx.AsyncClient(
            base_url=server.url, headers={"Authorization": f"Bearer {api_key}"}
        ) as http,
    ):
        yield Broker(server.url, http, api_key, settings, app)
