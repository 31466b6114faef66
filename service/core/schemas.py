"""Request and response bodies of the internal API. Examples hold fake values only."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.core.applications import Applications, Pkce

# A seller id is the platform's own: 1-128 characters, `/`-separated segments of letters,
# digits and `. _ : @ -`, each starting with a letter or digit (so `billing/42` can later be
# scoped by namespace, and no segment is `.`/`..` or empty).
SELLER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*(/[A-Za-z0-9][A-Za-z0-9._:@-]*)*$"
SELLER_ID_MAX = 128
# Ends the seller id in the proxy's paths (`/sellers/{seller_id}/-/mercadopago/{path}`): no
# segment of a seller id can be `-`, so the first one is the end, whatever the path holds.
PROXY_SEPARATOR = "/-/mercadopago/"
# The path parameter of every `/sellers/{seller_id}` route (ids may contain slashes).
SellerId = Annotated[
    str,
    Path(
        pattern=SELLER_ID_PATTERN,
        max_length=SELLER_ID_MAX,
        description="The platform's own seller id.",
        examples=["billing/seller-42"],
    ),
]


class LinkStartRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "seller_id": "billing/seller-42",
                    "application": "ar",
                    "return_url": "https://platform.example/sellers/42",
                    "test": False,
                }
            ]
        },
    )

    seller_id: str = Field(pattern=SELLER_ID_PATTERN, min_length=1, max_length=SELLER_ID_MAX)
    application: str | None = Field(
        default=None,
        max_length=32,
        description="The Mercado Pago application (by name) to link through; required when "
        "the broker serves more than one (`GET /applications`).",
    )
    return_url: str | None = Field(default=None, max_length=2048)
    test: bool = Field(default=False, strict=True)  # 0, "yes" or "true" are not booleans here

    @field_validator("seller_id")
    @classmethod
    def _not_a_route_suffix(cls, value: str) -> str:
        # `/sellers/{id}/token` is a route: a last segment `token` would make the seller's own
        # `/sellers/{id}` unreachable.
        if value.rsplit("/", 1)[-1] == "token":
            raise ValueError("the last segment of a seller_id cannot be 'token'")
        return value


class LinkStartResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "link_url": "https://broker.example/link/q0ExAmPlEoNlYq0ExAmPlEoNlYq0ExAmPlE",
                    "expires_at": "2026-12-05T12:00:00Z",
                }
            ]
        }
    )

    link_url: str
    expires_at: datetime


class TokenResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "access_token": "APP_USR-0000000000000000-010100-0000fake0000-123456789",
                    "token_type": "bearer",
                    "expires_at": "2027-05-27T12:00:00Z",
                    "mp_user_id": 123456789,
                    "live_mode": True,
                    "scope": "offline_access read write",
                }
            ]
        }
    )

    access_token: str
    token_type: str = "bearer"
    expires_at: datetime
    mp_user_id: int
    live_mode: bool
    scope: str | None


class SellerStatus(BaseModel):
    """What the broker knows about a seller's link; never a secret."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "seller_id": "billing/seller-42",
                    "application": "ar",
                    "client_id": "1234567890123456",
                    "status": "relink_required",
                    "status_reason": "revoked",
                    "mp_user_id": 123456789,
                    "live_mode": True,
                    "scope": "offline_access read write",
                    "expires_at": "2027-05-27T12:00:00Z",
                    "last_refreshed_at": None,
                    "last_refresh_error": "invalid_grant",
                    "refresh_failures": 1,
                    "version": 7,
                }
            ]
        }
    )

    seller_id: str
    application: str = Field(
        description="The Mercado Pago application it is linked through (by name)"
    )
    client_id: str = Field(description="That application's client_id")
    status: str
    status_reason: str | None
    mp_user_id: int
    live_mode: bool
    scope: str | None
    expires_at: datetime
    last_refreshed_at: datetime | None
    last_refresh_error: str | None
    refresh_failures: int
    version: int = Field(description="The rotation counter; events carry it as seller_version")

    @classmethod
    def of(cls, seller: Any, apps: Applications) -> SellerStatus:
        fields = {name: getattr(seller, name) for name in cls.model_fields if name != "application"}
        return cls.model_validate(fields | {"application": apps.name_of(seller.client_id)})


class AuditEntry(BaseModel):
    model_config = ConfigDict(
        from_attributes=True,
        json_schema_extra={
            "examples": [
                {
                    "id": 4211,
                    "at": "2026-11-28T12:00:00Z",
                    "actor": "billing-service",
                    "action": "token.read",
                    "seller_id": "billing/seller-42",
                    "application": "ar",
                    "detail": None,
                    "count": 17,
                }
            ]
        },
    )

    id: int
    at: datetime
    actor: str
    action: str
    seller_id: str | None
    application: str | None
    detail: str | None
    count: int


class SellerPage(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "items": SellerStatus.model_config["json_schema_extra"]["examples"],  # type: ignore[index]
                    "next_cursor": "billing/seller-42",
                }
            ]
        }
    )

    items: list[SellerStatus]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null on the last page."
    )


class SellerCounts(BaseModel):
    """An application's sellers by status (every status, zeros included)."""

    linked: int
    relink_required: int
    unlinked: int


class ClosedBreaker(BaseModel):
    state: Literal["closed"] = "closed"


class OpenBreaker(BaseModel):
    """Refreshing for the application is paused everywhere; one probe after `probe_after`."""

    state: Literal["open"] = "open"
    reason: str
    tripped_at: datetime
    probe_after: datetime


class ApplicationSummary(BaseModel):
    """A configured Mercado Pago application and its sellers; never a secret."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "ar",
                    "client_id": "1234567890123456",
                    "auth_url": "https://auth.mercadopago.com.ar/authorization",
                    "pkce": "S256",
                    "sellers": {"linked": 1200, "relink_required": 3, "unlinked": 41},
                    "breaker": {
                        "state": "open",
                        "reason": "invalid_client",
                        "tripped_at": "2026-11-28T12:00:00Z",
                        "probe_after": "2026-11-28T12:05:00Z",
                    },
                    "refresh_backlog": 17,
                    "next_refresh_at": "2026-11-28T11:40:00Z",
                }
            ]
        }
    )

    name: str
    client_id: str
    auth_url: str
    pkce: Pkce
    sellers: SellerCounts
    breaker: Annotated[ClosedBreaker | OpenBreaker, Field(discriminator="state")]
    refresh_backlog: int = Field(description="Linked sellers due for a refresh now")
    next_refresh_at: datetime | None = Field(
        description="The earliest next_refresh_at of its linked sellers (past: overdue); null "
        "when none is linked"
    )
