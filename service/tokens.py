"""Serving a seller's access token to internal callers."""

from __future__ import annotations

from service.crypto import context
from service.db import transaction
from service.errors import RelinkRequired, SellerNotFound, TokenExpired
from service.models import Seller
from service.runtime import Runtime
from service.schemas import TokenResponse


async def read_token(rt: Runtime, seller_id: str) -> TokenResponse:
    async with transaction(rt.sessions) as session:
        seller = await session.get(Seller, seller_id)
    if seller is None or seller.status == "unlinked" or seller.access_token is None:
        raise SellerNotFound(f"No linked seller {seller_id!r}.")
    if seller.status == "relink_required":
        raise RelinkRequired("Send the seller a new link (POST /link/start).")
    if seller.expires_at <= rt.clock():
        raise TokenExpired("The token lapsed; the seller must link again.")
    access_token = rt.keyring.open(
        seller.access_token, context("sellers", seller_id, "access_token", seller.client_id)
    )
    return TokenResponse(
        access_token=access_token,
        expires_at=seller.expires_at,
        mp_user_id=seller.mp_user_id,
        live_mode=seller.live_mode,
        scope=seller.scope,
    )
