"""API keys of internal callers: 256-bit random secrets, stored only as SHA-256 digests.

A key reads `mpb_<prefix>_<secret>`. The prefix is public (it finds the row and names the key
in logs); the digest of the whole key is compared in constant time. No slow hash: a 256-bit
random key cannot be brute-forced, and the check sits on every request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from service.core.domain import KeyView
from service.core.errors import Forbidden, Unauthorized
from service.core.models import ApiKey
from service.core.schemas import SELLER_ID_MAX, SELLER_ID_PATTERN
from service.lifecycle import audit

SCOPES = ("links:write", "tokens:read", "sellers:admin", "api:proxy")


def check_namespace(namespace: str) -> None:
    """A namespace is whole seller-id segments ending in `/`: `billing/` must not reach
    `billing2/…`, which a bare `billing` prefix would."""
    segments = namespace[:-1]
    if (
        not namespace.endswith("/")
        or len(namespace) > SELLER_ID_MAX
        or not re.fullmatch(SELLER_ID_PATTERN, segments)
    ):
        raise ValueError(
            f"namespace {namespace!r} must be seller id segments ending in '/', "
            "such as 'billing/' (a bare 'billing' would also match 'billing2/…')"
        )


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _prefix_of(key: str) -> str | None:
    parts = key.split("_", 2)  # the secret part may hold "_" itself
    if len(parts) != 3 or parts[0] != "mpb" or len(parts[1]) != 8 or len(parts[2]) != 43:
        return None
    return parts[1]


async def create(
    session: AsyncSession,
    name: str,
    now: datetime,
    scopes: tuple[str, ...] = SCOPES,
    namespace: str | None = None,
    client_ids: list[str] | None = None,
) -> tuple[ApiKey, str]:
    """Store a new key and return it with its secret, which is shown once and never stored."""
    unknown = set(scopes) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes: {', '.join(sorted(unknown))}")
    if namespace is not None:
        check_namespace(namespace)
    prefix = secrets.token_hex(4)
    secret = f"mpb_{prefix}_{secrets.token_urlsafe(32)}"
    key = ApiKey(
        id=str(uuid.uuid4()),
        name=name,
        prefix=prefix,
        digest=_digest(secret),
        scopes=list(scopes),
        namespace=namespace,
        client_ids=sorted(client_ids) if client_ids is not None else None,
        created_at=now,
    )
    session.add(key)
    audit.record(session, now, "cli", "key.created", detail=f"{name} {','.join(scopes)}")
    await session.flush()
    return key, secret


def parse(authorization: str | None) -> tuple[str, str]:
    """`Bearer mpb_<prefix>_<secret>` -> (prefix, the whole key)."""
    scheme, _, presented = (authorization or "").partition(" ")
    presented = presented.strip()
    prefix = _prefix_of(presented) if scheme.lower() == "bearer" else None
    if prefix is None:
        raise Unauthorized("Send `Authorization: Bearer <api key>`.")
    return prefix, presented


def view_of(key: Any) -> KeyView:
    return KeyView(
        id=key.id,
        name=key.name,
        prefix=key.prefix,
        digest=key.digest,
        scopes=tuple(key.scopes),
        namespace=key.namespace,  # ends in `/` (check_namespace; revision 0006 for old keys)
        client_ids=frozenset(key.client_ids) if key.client_ids is not None else None,
        revoked=key.revoked_at is not None,
    )


async def find(connection: AsyncConnection | AsyncSession, prefix: str) -> KeyView | None:
    key = (await connection.execute(FIND, {"prefix": prefix})).first()
    return view_of(key) if key is not None else None


FIND = select(
    ApiKey.id,
    ApiKey.name,
    ApiKey.prefix,
    ApiKey.digest,
    ApiKey.scopes,
    ApiKey.namespace,
    ApiKey.client_ids,
    ApiKey.revoked_at,
).where(ApiKey.prefix == bindparam("prefix"))


UNKNOWN_KEY = "The API key is unknown or revoked."


def verify(key: KeyView | None, presented: str) -> KeyView:
    if key is None or key.revoked or not hmac.compare_digest(key.digest, _digest(presented)):
        raise Unauthorized(UNKNOWN_KEY)
    return key


async def authenticate(session: AsyncSession, authorization: str | None) -> KeyView:
    prefix, presented = parse(authorization)
    return verify(await find(session, prefix), presented)


def authorize(key: KeyView, scope: str, seller_id: str | None = None) -> None:
    if scope not in key.scopes:
        raise Forbidden(f"This key lacks the `{scope}` scope.")
    if seller_id is not None and key.namespace and not seller_id.startswith(key.namespace):
        raise Forbidden("This seller is outside the key's namespace.")


# One answer for a seller of another application and for one never linked: the key learns
# nothing about sellers outside its applications (not even that they exist).
OUTSIDE_APPLICATIONS = "This seller or application is outside the key's applications."


def may_use(key: KeyView, client_id: str | None) -> bool:
    """A key limited to applications acts only in them (`client_id` None: no such seller)."""
    return key.client_ids is None or client_id in key.client_ids


def authorize_application(key: KeyView, client_id: str | None) -> None:
    if not may_use(key, client_id):
        raise Forbidden(OUTSIDE_APPLICATIONS)


async def list_keys(session: AsyncSession) -> list[ApiKey]:
    return list(await session.scalars(select(ApiKey).order_by(ApiKey.created_at)))


async def revoke(session: AsyncSession, name: str, now: datetime) -> bool:
    """Revoke by name (or public prefix). Every replica hears of it at commit (cache.py)."""
    key = await session.scalar(
        select(ApiKey).where((ApiKey.name == name) | (ApiKey.prefix == name)).with_for_update()
    )
    if key is None or key.revoked_at is not None:
        return False
    key.revoked_at = now
    audit.record(session, now, "cli", "key.revoked", detail=key.name)
    return True
