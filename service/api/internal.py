"""The API internal services call, authenticated by API key."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query, Response

from service import apikeys, audit, linking, sellers, tokens
from service.api.deps import ApiKeyDep, RefresherDep, RuntimeDep
from service.api.fast import token_response
from service.errors import (
    Forbidden,
    LiveModeMismatch,
    RelinkRequired,
    SellerNotFound,
    Unauthorized,
    UpstreamUnavailable,
    responses,
)
from service.models import Seller
from service.runtime import Runtime
from service.schemas import (
    SELLER_ID_MAX,
    SELLER_ID_PATTERN,
    AuditEntry,
    LinkStartRequest,
    LinkStartResponse,
    SellerPage,
    SellerStatus,
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
    rt: RuntimeDep,
    refresher: RefresherDep,
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
    # Well-formed reads are answered before routing (service/api/fast.py); the same code.
    return await token_response(rt, refresher, key, seller_id, min_ttl)


@router.post(
    "/sellers/{seller_id:path}/token/invalid",
    tags=["tokens"],
    response_model=SellerStatus,
    responses=responses(Unauthorized, Forbidden, SellerNotFound, UpstreamUnavailable),
)
async def report_invalid_token(seller_id: SellerId, rt: RuntimeDep, key: ApiKeyDep) -> SellerStatus:
    """Report that Mercado Pago refused the token; the broker checks it and marks revocations."""
    apikeys.authorize(key, "tokens:read", seller_id)
    await tokens.report_invalid(rt, seller_id)
    return await _status(rt, seller_id)


@router.get(
    "/sellers",
    tags=["sellers"],
    response_model=SellerPage,
    responses=responses(Unauthorized, Forbidden),
)
async def list_sellers(
    rt: RuntimeDep,
    key: ApiKeyDep,
    status: Annotated[Literal["linked", "relink_required", "unlinked"] | None, Query()] = None,
    expiring_before: Annotated[datetime | None, Query()] = None,
    cursor: Annotated[str | None, Query(max_length=SELLER_ID_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> SellerPage:
    """List sellers by status or token expiry, in seller_id order, a page at a time."""
    apikeys.authorize(key, "sellers:admin")
    stmt = sellers.page_query(key.namespace, status, expiring_before, cursor, limit)
    async with rt.sessions() as session:
        found = list(await session.scalars(stmt))
    page = found[:limit]
    more = len(found) > limit
    return SellerPage(
        items=[SellerStatus.of(s) for s in page], next_cursor=page[-1].seller_id if more else None
    )


@router.get(
    "/sellers/{seller_id:path}",
    tags=["sellers"],
    response_model=SellerStatus,
    responses=responses(Unauthorized, Forbidden, SellerNotFound),
)
async def get_seller(seller_id: SellerId, rt: RuntimeDep, key: ApiKeyDep) -> SellerStatus:
    """Show a seller's link status, token expiry and last refresh; never a secret."""
    apikeys.authorize(key, "sellers:admin", seller_id)
    return await _status(rt, seller_id)


async def _status(rt: Runtime, seller_id: str) -> SellerStatus:
    async with rt.sessions() as session:
        seller = await session.get(Seller, seller_id)
    if seller is None:
        raise SellerNotFound(f"No seller {seller_id!r}.")
    return SellerStatus.of(seller)


@router.get(
    "/audit",
    tags=["sellers"],
    response_model=list[AuditEntry],
    responses=responses(Unauthorized, Forbidden),
)
async def read_audit(
    rt: RuntimeDep,
    key: ApiKeyDep,
    seller_id: Annotated[str | None, Query(max_length=SELLER_ID_MAX)] = None,
    actor: Annotated[str | None, Query(max_length=100)] = None,
    before: Annotated[
        int | None, Query(ge=1, le=2**63 - 1, description="Page: events older than this id")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[AuditEntry]:
    """List audit events, newest first: links, refreshes, unlinks, key changes, token reads."""
    apikeys.authorize(key, "sellers:admin", seller_id)
    if key.namespace and seller_id is None:
        raise Forbidden("A key limited to a namespace must name one of its sellers.")
    async with rt.sessions() as session:
        events = await audit.query(session, seller_id, actor, before, limit)
    return [AuditEntry.model_validate(event) for event in events]


@router.delete(
    "/sellers/{seller_id:path}",
    tags=["sellers"],
    response_model=SellerStatus,
    responses=responses(Unauthorized, Forbidden, SellerNotFound),
)
async def unlink_seller(seller_id: SellerId, rt: RuntimeDep, key: ApiKeyDep) -> SellerStatus:
    """Unlink a seller: destroy its stored tokens, keep the row (as `unlinked`) for its history."""
    apikeys.authorize(key, "sellers:admin", seller_id)
    await sellers.unlink(rt, seller_id, "unlinked_by_platform", actor=key.name)
    return await _status(rt, seller_id)
