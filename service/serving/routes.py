"""The token routes internal services call, authenticated by API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from service.core.errors import (
    Forbidden,
    RelinkRequired,
    SellerNotFound,
    Unauthorized,
    UpstreamUnavailable,
    responses,
)
from service.core.schemas import SellerId, SellerStatus, TokenResponse
from service.lifecycle import sellers
from service.serving import apikeys, tokens
from service.serving.deps import ApiKeyDep, ServingDep

router = APIRouter()

TOKEN_ROUTE = "/sellers/{seller_id:path}/token"


@router.get(
    TOKEN_ROUTE,
    tags=["tokens"],
    response_model=TokenResponse,
    responses={
        200: {
            "description": "A valid access token. `Broker-Token-Warning: refresh-failing` or "
            "`relink-required` says it is still valid but the seller needs attention.",
            "headers": {
                tokens.WARNING_HEADER: {
                    "description": "`refresh-failing` or `relink-required`",
                    "schema": {"type": "string"},
                }
            },
        },
        **responses(Unauthorized, Forbidden, SellerNotFound, RelinkRequired, UpstreamUnavailable),
    },
)
async def get_token(
    seller_id: SellerId,
    serving: ServingDep,
    key: ApiKeyDep,
    min_ttl: Annotated[
        int,
        Query(
            ge=0,
            description="Refresh first when fewer seconds than this remain. At most "
            "`BROKER_MIN_TTL_MAX_SECONDS` (30 days by default); more is a 422.",
        ),
    ] = 0,
) -> Response:
    """Get a valid access token to call Mercado Pago for this seller."""
    # Well-formed reads are answered before routing (fast.py), by the same `tokens.serve`.
    return await tokens.serve(serving, key, seller_id, min_ttl)


@router.post(
    "/sellers/{seller_id:path}/token/invalid",
    tags=["tokens"],
    response_model=SellerStatus,
    responses=responses(Unauthorized, Forbidden, SellerNotFound, UpstreamUnavailable),
)
async def report_invalid_token(
    seller_id: SellerId, serving: ServingDep, key: ApiKeyDep
) -> SellerStatus:
    """Report that Mercado Pago refused the token; the broker checks it and marks revocations."""
    apikeys.authorize(key, "tokens:read", seller_id)
    await tokens.report_invalid(serving, key, seller_id)
    return await sellers.status(serving.db.sessions, serving.settings.apps, seller_id)
