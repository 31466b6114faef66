"""Sealed values: AES-256-GCM with a versioned, key-identified envelope.

    seal(plaintext, context) -> "v1.<key_id>.<nonce>.<ciphertext>"   (base64url, no padding)

The associated data is the envelope header plus a context naming the row, column and
application (`sellers|<seller_id>|refresh_token|<client_id>`), so a ciphertext copied to
another row, column or application fails to open. The first key of the keyring seals; every
key opens, which lets a new key roll out as a secondary before it is promoted.

The broker seals and opens table columns only through `seal_column` / `open_column`, which
derive the context from the mapped column itself (its table and name; the column must be
declared `info={"sealed": True}` in `models.py`): no call site spells a context, so none can
misspell one and leave a row that never opens again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

if TYPE_CHECKING:
    from sqlalchemy.orm import QueryableAttribute

FORMAT = "v1"
MAC_KEY_LABEL = b"broker mac key v1"  # derives a MAC key from an encryption key (HMAC-SHA256)


class SealError(Exception):
    """A sealed value could not be opened (unknown key, wrong context, or tampered)."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def context(table: str, row_id: str, column: str, client_id: str) -> str:
    return f"{table}|{row_id}|{column}|{client_id}"


def column_context(column: QueryableAttribute[Any], row_id: str, client_id: str) -> str:
    """The context of a value in `column` of row `row_id`, sealed for application `client_id`."""
    if not column.info.get("sealed"):
        raise ValueError(f"{column} is not a sealed column")
    return context(column.class_.__tablename__, row_id, column.key, client_id)


def fingerprint(secret: str) -> str:
    """A short digest that tells two secrets apart without revealing either (refresh attempts)."""
    return hashlib.sha256(secret.encode()).hexdigest()[:16]


def generate_key_spec(key_id: str) -> str:
    """A fresh `key_id:base64url(32 bytes)` entry for BROKER_ENCRYPTION_KEYS."""
    return f"{key_id}:{_b64(secrets.token_bytes(32))}"


def parse_spec(spec: str) -> tuple[dict[str, bytes], str]:
    """BROKER_ENCRYPTION_KEYS: the keys by id, and the primary (the first)."""
    keys: dict[str, bytes] = {}
    for entry in spec.split(","):
        key_id, _, material = entry.strip().partition(":")
        keys[key_id] = _unb64(material)
    return keys, next(iter(keys))


@dataclass(repr=False)
class Keyring:
    """The data keys of a process. One object for its life: `adopt` swaps in the keys a key
    service's table holds now (service/core/keys.py), so every flow sees them at once."""

    keys: dict[str, AESGCM]
    primary: str
    # Per key, a MAC key derived from it (never the key itself): values the broker hands out
    # and must later recognise as its own, such as the browser binder (linking/flow.py).
    mac_keys: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def parse(cls, spec: str) -> Keyring:
        return cls.of(*parse_spec(spec))

    @classmethod
    def of(cls, raw: dict[str, bytes], primary: str) -> Keyring:
        if not raw or primary not in raw:
            raise ValueError("at least one encryption key is needed")
        for key_id, key in raw.items():
            if len(key) != 32 or not key_id or "." in key_id:
                raise ValueError("each key must be key_id:<base64url of 32 bytes>")
        return cls(
            keys={key_id: AESGCM(key) for key_id, key in raw.items()},
            primary=primary,
            mac_keys={
                key_id: hmac.new(key, MAC_KEY_LABEL, hashlib.sha256).digest()
                for key_id, key in raw.items()
            },
        )

    def adopt(self, other: Keyring) -> None:
        # One assignment each, between two awaits: a seal never sees a half-swapped keyring.
        self.keys, self.mac_keys, self.primary = other.keys, other.mac_keys, other.primary

    def tag(self, message: str) -> str:
        """A MAC of `message` under the primary key (43 base64url characters)."""
        return self._tag(self.mac_keys[self.primary], message)

    def tagged(self, message: str, tag: str) -> bool:
        """Whether `tag` is ours for `message`, under any key (so rotation keeps it valid)."""
        return any(
            hmac.compare_digest(self._tag(key, message), tag) for key in self.mac_keys.values()
        )

    @staticmethod
    def _tag(key: bytes, message: str) -> str:
        return _b64(hmac.new(key, message.encode(), hashlib.sha256).digest())

    def __repr__(self) -> str:
        return f"Keyring(primary={self.primary!r}, key_ids={sorted(self.keys)!r})"

    def seal(self, plaintext: str, ctx: str) -> str:
        header = f"{FORMAT}.{self.primary}"
        nonce = secrets.token_bytes(12)
        aad = f"{header}|{ctx}".encode()
        sealed = self.keys[self.primary].encrypt(nonce, plaintext.encode(), aad)
        return f"{header}.{_b64(nonce)}.{_b64(sealed)}"

    def seal_column(
        self, column: QueryableAttribute[Any], row_id: str, client_id: str, plaintext: str
    ) -> str:
        return self.seal(plaintext, column_context(column, row_id, client_id))

    def open_column(
        self, column: QueryableAttribute[Any], row_id: str, client_id: str, envelope: str
    ) -> str:
        return self.open(envelope, column_context(column, row_id, client_id))

    def reseal_column(
        self, column: QueryableAttribute[Any], row_id: str, client_id: str, envelope: str
    ) -> str:
        """The same value sealed under the primary key (key rotation)."""
        ctx = column_context(column, row_id, client_id)
        return self.seal(self.open(envelope, ctx), ctx)

    def open(self, envelope: str, ctx: str) -> str:
        try:
            version, key_id, nonce, sealed = envelope.split(".")
        except ValueError:
            raise SealError("not a sealed value") from None
        key = self.keys.get(key_id)
        if version != FORMAT or key is None:
            raise SealError(f"cannot open a {version} value sealed with key {key_id!r}")
        try:
            plain = key.decrypt(_unb64(nonce), _unb64(sealed), f"{version}.{key_id}|{ctx}".encode())
        except (InvalidTag, ValueError):
            raise SealError("sealed value does not open in this context") from None
        return plain.decode()
