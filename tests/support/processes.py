"""Helpers to run the broker as real processes in tests (bounded waits, clean stops)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import TypeVar

import httpx

from service.core.config import Settings
from tests.support.config import CLIENT_SECRET, ROOT

T = TypeVar("T")


@asynccontextmanager
async def broker_process(
    args: list[str],
    env: dict[str, str],
    health_url: str | None,
    output: Path,
    code: Path = ROOT,
) -> AsyncIterator[asyncio.subprocess.Process]:
    """Start `python -m service ARGS`, wait (bounded) until it is ready, stop it with SIGINT.

    Ready means `health_url` answers 200, or (a process without HTTP, `health_url=None`) its
    log says the refresher started. `code`: the checkout it runs (another release's, say).
    """
    with output.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", *args, cwd=code, env=env, stdout=sink, stderr=sink
        )
        try:
            async with httpx.AsyncClient() as http:
                for _ in range(300):  # 30 s at most
                    if process.returncode is not None:
                        raise AssertionError(f"the broker exited: see {output}")
                    if health_url is None:
                        if b"refresher.started" in await asyncio.to_thread(output.read_bytes):
                            break
                    else:
                        try:
                            if (await http.get(health_url)).status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError(f"the broker did not start: see {output}")
            yield process
        finally:
            await stop(process, signal.SIGINT, 30)


async def stop(process: asyncio.subprocess.Process, sig: int, seconds: float) -> None:
    """Stop `process` with `sig`; killed if it is still running `seconds` later."""
    if process.returncode is None:
        process.send_signal(sig)
        try:
            await asyncio.wait_for(process.wait(), seconds)
        except TimeoutError:
            process.kill()
            await process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MP_", "BROKER_"))}
    env.pop("DATABASE_URL", None)
    # Several refreshers run side by side in tests: none serves a fixed metrics port.
    return env | {"BROKER_REFRESHER_METRICS_PORT": "0"} | extra


async def run_cli(*args: str, env: dict[str, str], code: Path = ROOT) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "service",
        *args,
        cwd=code,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def env_for(settings: Settings, database_url: str, **extra: str) -> dict[str, str]:
    """The environment that makes a broker process behave like `settings` on `database_url`."""
    keys = settings.broker_encryption_keys
    assert keys is not None
    return base_env(
        DATABASE_URL=database_url,
        BROKER_PUBLIC_URL=settings.broker_public_url,
        MP_CLIENT_ID=settings.mp_client_id or "",
        MP_CLIENT_SECRET=CLIENT_SECRET,
        MP_REDIRECT_URI=settings.mp_redirect_uri or "",
        MP_AUTH_URL=settings.mp_auth_url,
        MP_TOKEN_URL=settings.mp_token_url,
        MP_API_URL=settings.mp_api_url,
        BROKER_ENCRYPTION_KEYS=keys.get_secret_value(),
        BROKER_LOG_FORMAT="json",
        **extra,
    )


def api_process(
    settings: Settings, database_url: str, port: int, output: Path, **env: str
) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """`broker serve` on `port`, configured like `settings`."""
    return api_process_of(ROOT, settings, database_url, port, output, **env)


def api_process_of(
    code: Path, settings: Settings, database_url: str, port: int, output: Path, **env: str
) -> AbstractAsyncContextManager[asyncio.subprocess.Process]:
    """The same, running the checkout at `code` (another release's)."""
    return broker_process(
        ["serve"],
        env_for(settings, database_url, BROKER_PORT=str(port), **env),
        f"http://127.0.0.1:{port}/healthz",
        output,
        code,
    )


async def enter_all(stack: AsyncExitStack, *cms: AbstractAsyncContextManager[T]) -> list[T]:
    """Enter context managers concurrently (processes start in parallel); all or an error."""
    results = await asyncio.gather(
        *(stack.enter_async_context(cm) for cm in cms), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return [r for r in results if not isinstance(r, BaseException)]
