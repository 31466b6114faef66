"""PKCE (RFC 7636) and the other random values of the link flow. Pure functions, no I/O."""

from __future__ import annotations

import base64
import hashlib
import secrets
from typing import Literal

Method = Literal["S256", "plain"]

VERIFIER_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def new_verifier() -> str:
    """43 characters from 32 random bytes: the RFC's recommended size, all unreserved."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def is_valid_verifier(verifier: str) -> bool:
    return 43 <= len(verifier) <= 128 and set(verifier) <= VERIFIER_CHARS


def challenge(verifier: str, method: Method) -> str:
    if not is_valid_verifier(verifier):
        raise ValueError("a code_verifier is 43-128 unreserved characters")
    if method == "plain":
        return verifier
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def new_state() -> str:
    """256 random bits; carries no seller data (the attempt row holds that)."""
    return secrets.token_urlsafe(32)


def digest(value: str) -> str:
    """What the database keeps instead of a state, link id or cookie: a reader cannot replay it."""
    return hashlib.sha256(value.encode()).hexdigest()
