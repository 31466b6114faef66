"""The API internal services call, authenticated by API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response

from service import apikeys, linking, tokens
from service.api.deps import ApiKeyDep, RuntimeDep
from service.errors import (
    Forbidden,
    LiveModeMismatch,
    RelinkRequired,
    SellerNotFound,
    TokenExpired,
    Unauthorized,
    responses,
)
from service.schemas import (
    SELLER_ID_MAX,
    SELLER_ID_PATTERN,
    LinkStartRequest,
    LinkStartResponse,
    TokenResponse,
)

router = APIRouter()

SellerId = Annotated[
    str,
    Path(
        pattern=SELLER_ID_PATTERN,
        max_length=SELLER_ID_MAX,
        description="The platform's own seller id.",
        examples=["billing/seller-42"],
    ),
]


@router.post(
    "/link/start",
    status_code=201,
    tags=["linking"],
    response_model=LinkStartResponse,
    responses=responses(Unauthorized, Forbidden, LiveModeMismatch),
)
async def start_link(body: LinkStartRequest, rt: RuntimeDep, key: ApiKeyDep) -> LinkStartResponse:
    """Create a link to send to a seller so they can connect their Mercado Pago account."""
    apikeys.authorize(key, "links:write", body.seller_id)
    link_url, expires_at = await linking.start_link(
        rt, key, body.seller_id, body.return_url, body.test
    )
    return LinkStartResponse(link_url=link_url, expires_at=expires_at)


@router.get(
    "/sellers/{seller_id:path}/token",
    tags=["tokens"],
    response_model=TokenResponse,
    responses=responses(Unauthorized, Forbidden, SellerNotFound, RelinkRequired, TokenExpired),
)
async def get_token(
    seller_id: SellerId, rt: RuntimeDep, key: ApiKeyDep, response: Response
) -> TokenResponse:
    """Get a valid access token to call Mercado Pago for this seller."""
    apikeys.authorize(key, "tokens:read", seller_id)
    token = await tokens.read_token(rt, seller_id)
    response.headers["Cache-Control"] = "no-store"
    response.headers["Pragma"] = "no-cache"
    return token
