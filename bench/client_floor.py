"""The upstream client's floor beside the refresh wave, as the raw ceiling is beside the reads.

`python -m bench.client_floor --mode httpx|raw --url URL --tokens-file FILE --client-id ID
--secret SECRET --concurrency 64` POSTs `grant_type=refresh_token` to the simulator at URL
from `concurrency` tasks on uvloop, one fresh refresh token (a line of FILE) per request:

- `httpx`: the broker's own client, built by `Upstream.open` as the refresher builds it and
  called through `MercadoPagoClient.refresh`, so the floor follows the code (however it holds
  httpx, its deadline, metrics and reply parsing): what a refresh's upstream call costs;
- `proxy`: the proxy's own pools (`runtime.proxy_pools`), `GET /v1/payments/search` with the
  line as the seller's access token, sent and read as `service/proxy/forward.py` does: what
  the proxy's upstream call costs (a line may repeat: nothing is spent);
- `raw`: asyncio streams, one keep-alive connection per task, the request written by hand and
  the reply read by its Content-Length: what the event loop and the kernel cost.

The first `concurrency` tokens open the connections, untimed; the rest are timed. One JSON
line on stdout: requests, errors, seconds, rate, and the process's CPU (`time.process_time`:
user and system, every thread) per request.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import uvloop

from service.core.config import Settings
from service.core.mercadopago import MercadoPagoError
from service.core.runtime import Upstream, proxy_pools, utcnow
from service.proxy.forward import USER_AGENT

# The redirect URI plays no part in a refresh, but an application needs one.
REDIRECT_URI = "https://broker.bench.invalid/oauth/callback"

Send = Callable[[str], Awaitable[bool]]  # POST one refresh token: True when answered 200


@contextlib.asynccontextmanager
async def broker_client(args: argparse.Namespace) -> AsyncIterator[list[Send]]:
    """The broker's MercadoPagoClient for one application on the simulator, as many senders
    as tasks (they share the client, as the refresher's tasks do)."""
    settings = Settings(
        _env_file=None,
        mp_client_id=args.client_id,
        mp_client_secret=args.secret,
        mp_redirect_uri=REDIRECT_URI,
        mp_token_url=f"{args.url}/oauth/token",
        mp_api_url=args.url,
        broker_refresh_concurrency=args.concurrency,
    )
    upstream = Upstream.open(settings, utcnow, None)
    app = next(iter(upstream.apps.values())).oauth

    async def send(token: str) -> bool:
        try:
            await upstream.mercadopago.refresh(app, token)
        except MercadoPagoError:
            return False
        return True

    try:
        yield [send] * args.concurrency
    finally:
        await upstream.close()


@contextlib.asynccontextmanager
async def proxy_client(args: argparse.Namespace) -> AsyncIterator[list[Send]]:
    settings = Settings(_env_file=None, broker_proxy_connections=args.concurrency)
    pools = itertools.cycle(proxy_pools(settings))
    url = httpx.URL(f"{args.url}/v1/payments/search")

    async def send(token: str) -> bool:
        headers = [("authorization", f"Bearer {token}"), USER_AGENT]
        reply = await next(pools).handle_async_request(httpx.Request("GET", url, headers=headers))
        try:
            async for _ in reply.aiter_raw():
                pass
        finally:
            await reply.aclose()
        return reply.status_code == 200

    yield [send] * args.concurrency


class RawConnection:
    """One keep-alive HTTP/1.1 connection, opened on first use, requests written by hand."""

    def __init__(self, url: str, client_id: str, secret: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.head = (
            f"POST /oauth/token HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\nAccept: application/json\r\n"
        ).encode()
        self.form = (
            f"grant_type=refresh_token&client_id={quote(client_id)}"
            f"&client_secret={quote(secret)}&refresh_token="
        ).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def send(self, token: str) -> bool:
        if self.reader is None or self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        body = self.form + quote(token).encode()
        self.writer.write(b"%sContent-Length: %d\r\n\r\n%s" % (self.head, len(body), body))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.lower().split(b"\r\n"):
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        await self.reader.readexactly(length)
        return status == 200

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()


@contextlib.asynccontextmanager
async def raw_streams(args: argparse.Namespace) -> AsyncIterator[list[Send]]:
    connections = [
        RawConnection(args.url, args.client_id, args.secret) for _ in range(args.concurrency)
    ]
    try:
        yield [connection.send for connection in connections]
    finally:
        for connection in connections:
            await connection.close()


MODES = {"httpx": broker_client, "proxy": proxy_client, "raw": raw_streams}


async def drive(senders: Sequence[Send], tokens: Iterator[str]) -> int:
    """Each sender takes the next token until none is left; the requests not answered 200."""
    errors = 0

    async def task(send: Send) -> None:
        nonlocal errors
        for token in tokens:  # one iterator for all: each token is sent once
            if not await send(token):
                errors += 1

    await asyncio.gather(*(task(send) for send in senders))
    return errors


async def measure(args: argparse.Namespace, tokens: list[str]) -> dict[str, Any]:
    warm, timed = tokens[: args.concurrency], tokens[args.concurrency :]
    if not timed:
        raise SystemExit(f"{args.tokens_file}: more than {args.concurrency} tokens needed")
    async with MODES[args.mode](args) as senders:
        warm_errors = await drive(senders, iter(warm))
        started, cpu = time.perf_counter(), time.process_time()
        errors = await drive(senders, iter(timed))
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {
        "mode": args.mode,
        "requests": len(timed),
        "errors": errors + warm_errors,
        "seconds": round(seconds, 3),
        "rate": round(len(timed) / seconds, 1),
        "cpu_ms_per_request": round(cpu / len(timed) * 1000, 4),
        "cpu_share": round(cpu / seconds, 3),
        "concurrency": args.concurrency,
        "event_loop": type(asyncio.get_running_loop()).__module__.split(".")[0],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.client_floor", description=__doc__)
    parser.add_argument("--mode", choices=sorted(MODES), required=True)
    parser.add_argument("--url", required=True, help="the simulator, e.g. http://127.0.0.1:P")
    parser.add_argument("--tokens-file", required=True, help="fresh refresh tokens, one a line")
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--secret", required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    # The event loop every broker command runs on (service/ops/cli.py).
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    tokens = [line for line in Path(args.tokens_file).read_text().splitlines() if line]
    print(json.dumps(asyncio.run(measure(args, tokens))), flush=True)


if __name__ == "__main__":
    main()
