"""What a token read answers: the seller's access token and what the broker knows of it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

import httpx

WARNING_HEADER = "Broker-Token-Warning"


class TokenWarning(StrEnum):
    """The token is valid, but the seller needs attention (the broker's README, "Failure
    states")."""

    REFRESH_FAILING = "refresh-failing"
    RELINK_REQUIRED = "relink-required"


KNOWN_WARNINGS = {warning.value: warning for warning in TokenWarning}


@dataclass(frozen=True, slots=True, repr=False)
class Token:
    access_token: str
    expires_at: datetime  # aware
    mp_user_id: int
    live_mode: bool
    scope: str
    warning: TokenWarning | None

    def __repr__(self) -> str:
        # Never the secret: a token in a log line or a traceback is a leaked token.
        return (
            f"Token(access_token='***', expires_at={self.expires_at!r}, "
            f"mp_user_id={self.mp_user_id!r}, live_mode={self.live_mode!r}, "
            f"scope={self.scope!r}, warning={self.warning!r})"
        )


def parse(reply: httpx.Response) -> Token:
    body = reply.json()
    expires_at = datetime.fromisoformat(body["expires_at"])
    if expires_at.tzinfo is None:  # the broker always sends an offset; be safe if not
        expires_at = expires_at.replace(tzinfo=UTC)
    warning = reply.headers.get(WARNING_HEADER)
    return Token(
        access_token=str(body["access_token"]),
        expires_at=expires_at,
        mp_user_id=int(body["mp_user_id"]),
        live_mode=bool(body["live_mode"]),
        scope=str(body.get("scope") or ""),
        # A warning this client does not know yet is dropped rather than refused.
        warning=KNOWN_WARNINGS.get(warning or ""),
    )
