"""A loopback TCP proxy in front of PostgreSQL (or any TCP server: `TcpProxy.to`), so a test can
cut the database (or the key service) off for real.

`cut()` drops every open connection and stops listening (new connections are refused, as when
a database host goes away); `restore()` listens again on the same port.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from sqlalchemy.engine import make_url


class TcpProxy:
    def __init__(self, database_url: str) -> None:
        target = make_url(database_url)
        socket_dir = target.query.get("host")
        # The embedded server listens on a Unix socket in its data dir; a real one on TCP.
        self.unix_path = (
            f"{socket_dir}/.s.PGSQL.{target.port or 5432}" if isinstance(socket_dir, str) else None
        )
        self.target = (target.host or "127.0.0.1", target.port or 5432)
        self.url_template = target
        self.port = 0
        self.server: asyncio.Server | None = None
        self.pipes: set[asyncio.Task[None]] = set()
        self.writers: set[asyncio.StreamWriter] = set()

    @classmethod
    def to(cls, host: str, port: int) -> TcpProxy:
        return cls(f"postgresql://{host}:{port}/")

    @property
    def url(self) -> str:
        url = self.url_template.set(host="127.0.0.1", port=self.port)
        url = url.difference_update_query(["host"])
        return url.render_as_string(hide_password=False)

    async def start(self) -> TcpProxy:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def cut(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for writer in list(self.writers):
            writer.transport.abort()
        for task in list(self.pipes):
            task.cancel()
        await asyncio.gather(*self.pipes, return_exceptions=True)

    async def restore(self) -> None:
        await self.start()

    async def close(self) -> None:
        await self.cut()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.unix_path:
                up_reader, up_writer = await asyncio.open_unix_connection(self.unix_path)
            else:
                up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers |= {writer, up_writer}
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self.pipes.add(task)
            task.add_done_callback(self.pipes.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            sink.transport.abort()
            self.writers.discard(sink)


@contextlib.asynccontextmanager
async def proxied(database_url: str) -> Any:
    proxy = await TcpProxy(database_url).start()
    try:
        yield proxy
    finally:
        await proxy.close()
