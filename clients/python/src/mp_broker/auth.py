"""`MercadoPagoAuth`: httpx authentication for Mercado Pago's API with a seller's token."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator

import httpx

from mp_broker.client import AsyncBrokerClient, BrokerClient
from mp_broker.token import Token


class MercadoPagoAuth(httpx.Auth):
    """Sends each request with `Authorization: Bearer <the seller's access token>`.

    On a 401 the token is reported to the broker (which checks it, and marks a revoked seller
    relink_required) and dropped from the cache; the request is sent once more only if the
    broker then hands out another token. The same token again means Mercado Pago refuses this
    seller, not a stale copy: the 401 is the answer, and nothing loops.

    With a `BrokerClient` it serves `httpx.Client`, with an `AsyncBrokerClient`
    `httpx.AsyncClient`.
    """

    def __init__(
        self, broker: BrokerClient | AsyncBrokerClient, seller_id: str, *, min_ttl: int = 0
    ) -> None:
        self.broker = broker
        self.seller_id = seller_id
        self.min_ttl = min_ttl

    def sync_auth_flow(
        self, request: httpx.Request
    ) -> Generator[httpx.Request, httpx.Response, None]:
        broker = self.broker
        if not isinstance(broker, BrokerClient):
            raise TypeError("httpx.Client needs MercadoPagoAuth over a BrokerClient")
        used = broker.token(self.seller_id, min_ttl=self.min_ttl)
        response = yield bearing(request, used)
        if response.status_code == 401:
            broker.report_invalid(self.seller_id)
            fresh = broker.token(self.seller_id, min_ttl=self.min_ttl)
            if fresh.access_token != used.access_token:
                yield bearing(request, fresh)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        broker = self.broker
        if not isinstance(broker, AsyncBrokerClient):
            raise TypeError("httpx.AsyncClient needs MercadoPagoAuth over an AsyncBrokerClient")
        used = await broker.token(self.seller_id, min_ttl=self.min_ttl)
        response = yield bearing(request, used)
        if response.status_code == 401:
            await broker.report_invalid(self.seller_id)
            fresh = await broker.token(self.seller_id, min_ttl=self.min_ttl)
            if fresh.access_token != used.access_token:
                yield bearing(request, fresh)


def bearing(request: httpx.Request, token: Token) -> httpx.Request:
    request.headers["Authorization"] = f"Bearer {token.access_token}"
    return request
