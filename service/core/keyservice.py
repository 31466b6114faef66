"""The key service that wraps data keys: OpenBao / HashiCorp Vault Transit, behind one protocol.

Envelope encryption: each data key (32 random bytes, the AES-256-GCM key of `crypto.Keyring`)
is stored only *wrapped*, encrypted by a key-encryption key that never leaves the key service.
A process unwraps the data keys at start-up and holds them in memory only (service/core/keys.py).

`KeyService` is all the broker asks of a key service: wrap, unwrap, rewrap to its newest key
version, and a name to record beside each wrapped key. Another service is one small class:

- AWS KMS: `wrap` = Encrypt(KeyId, Plaintext), `unwrap` = Decrypt(CiphertextBlob), `rewrap` =
  ReEncrypt(DestinationKeyId); credentials from the instance role.
- GCP Cloud KMS: `cryptoKeys.encrypt` / `decrypt`; `rewrap` = decrypt, then encrypt (the new
  primary version is used).

and a `BROKER_KEY_SERVICE` value in `from_settings`.

OpenBao and Vault share Transit's HTTP API (`/v1/<mount>/encrypt|decrypt|rewrap/<key>`) and
their auth API, so one class serves both. The broker authenticates with a token, or logs in
with AppRole (`role_id` + `secret_id`) and logs in again when the token it got is refused.
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from service.core import logs

if TYPE_CHECKING:
    from service.core.config import Settings

log = logging.getLogger("broker.keys")


class KeyServiceError(Exception):
    """The key service did not do what was asked; `reason` is stable (a metric label)."""

    # unreachable: no answer (network, timeout); denied: the token or AppRole was refused
    # (revoked, expired, or a policy without the path); key_unavailable: the key is missing,
    # or refuses this ciphertext (too old for min_decryption_version, or not its own);
    # unavailable: it answered 5xx (sealed, in standby, overloaded).
    REASONS = ("unreachable", "denied", "key_unavailable", "unavailable")

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class KeyService(Protocol):
    name: str  # recorded with every key it wraps, e.g. "transit:transit/broker"

    async def wrap(self, plaintext: bytes) -> str: ...

    async def unwrap(self, wrapped: str) -> bytes: ...

    async def rewrap(self, wrapped: str) -> str:
        """The same data key, wrapped under the key service's newest key version."""
        ...

    async def aclose(self) -> None: ...


@dataclass
class VaultAuth:
    """A token, or an AppRole to log in with (each from a file through BROKER_SECRETS_DIR)."""

    token: str | None = None
    role_id: str | None = None
    secret_id: str | None = None
    approle_mount: str = "approle"


class Transit:
    """OpenBao / HashiCorp Vault Transit (the same API)."""

    def __init__(
        self,
        url: str,
        mount: str,
        key: str,
        auth: VaultAuth,
        *,
        namespace: str | None = None,
        timeout: float = 5.0,
        verify: str | bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.mount, self.key, self.auth = mount.strip("/"), key, auth
        self.name = f"transit:{self.mount}/{key}"
        headers = {"X-Vault-Namespace": namespace} if namespace else {}
        self.http = httpx.AsyncClient(
            base_url=url.rstrip("/") + "/v1/",
            headers=headers,
            timeout=timeout,
            verify=verify,
            transport=transport,
            follow_redirects=False,
        )
        self.token = auth.token

    async def wrap(self, plaintext: bytes) -> str:
        data = await self._transit("encrypt", {"plaintext": base64.b64encode(plaintext).decode()})
        return str(data["ciphertext"])

    async def unwrap(self, wrapped: str) -> bytes:
        data = await self._transit("decrypt", {"ciphertext": wrapped})
        return base64.b64decode(data["plaintext"])

    async def rewrap(self, wrapped: str) -> str:
        data = await self._transit("rewrap", {"ciphertext": wrapped})
        return str(data["ciphertext"])

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _transit(self, action: str, body: dict[str, str]) -> dict[str, Any]:
        path = f"{self.mount}/{action}/{self.key}"
        if self.token is None:
            await self._login()
        reply = await self._post(path, body)
        if reply.status_code == 403 and self.auth.role_id:
            # An AppRole token expires (its TTL); one new login, then the answer stands.
            await self._login()
            reply = await self._post(path, body)
        return self._data(reply, action)

    async def _login(self) -> None:
        if not (self.auth.role_id and self.auth.secret_id):
            raise KeyServiceError("denied", "no Vault token and no AppRole to log in with")
        reply = await self._post(
            f"auth/{self.auth.approle_mount}/login",
            {"role_id": self.auth.role_id, "secret_id": self.auth.secret_id},
            token=False,
        )
        auth = self._answer(reply, "approle login").get("auth") or {}
        if not auth.get("client_token"):
            raise KeyServiceError("denied", "the AppRole login returned no token")
        self.token = str(auth["client_token"])
        logs.event(log, "keys.approle_login", {"ttl_seconds": auth.get("lease_duration")})

    async def _post(self, path: str, body: dict[str, str], *, token: bool = True) -> httpx.Response:
        headers = {"X-Vault-Token": self.token} if token and self.token else {}
        try:
            return await self.http.post(path, json=body, headers=headers)
        except httpx.HTTPError as exc:
            raise KeyServiceError("unreachable", type(exc).__name__) from None

    def _data(self, reply: httpx.Response, action: str) -> dict[str, Any]:
        data = self._answer(reply, action).get("data")
        if not isinstance(data, dict):
            raise KeyServiceError("unavailable", f"{action}: an answer without data")
        return data

    def _answer(self, reply: httpx.Response, action: str) -> dict[str, Any]:
        try:
            body = reply.json()
        except ValueError:
            body = {}
        if reply.is_success and isinstance(body, dict):
            return body
        # Vault's error strings name paths and policies, never a key or a plaintext.
        errors = body.get("errors") if isinstance(body, dict) else None
        detail = f"{action}: HTTP {reply.status_code} {'; '.join(map(str, errors or []))}"
        if reply.status_code in (401, 403):
            raise KeyServiceError("denied", detail)
        if reply.status_code >= 500:
            raise KeyServiceError("unavailable", detail)
        raise KeyServiceError("key_unavailable", detail)


def from_settings(
    settings: Settings, transport: httpx.AsyncBaseTransport | None = None
) -> KeyService | None:
    """The configured key service; None when the data keys are BROKER_ENCRYPTION_KEYS."""
    if settings.broker_key_service != "transit":
        return None
    secret = settings.broker_vault_secret_id
    token = settings.broker_vault_token
    return Transit(
        settings.broker_transit_url or "",  # Settings refuses transit without it
        settings.broker_transit_mount,
        settings.broker_transit_key,
        VaultAuth(
            token=token.get_secret_value() if token else None,
            role_id=settings.broker_vault_role_id,
            secret_id=secret.get_secret_value() if secret else None,
            approle_mount=settings.broker_vault_approle_mount,
        ),
        namespace=settings.broker_transit_namespace,
        timeout=settings.broker_key_service_timeout_seconds,
        verify=str(settings.broker_transit_ca_file) if settings.broker_transit_ca_file else True,
        transport=transport,
    )
