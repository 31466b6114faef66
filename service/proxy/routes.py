"""The proxy's route: `/sellers/{seller_id}/-/mercadopago/{path}`, any of five methods."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response, StreamingResponse

from service.core.errors import (
    Forbidden,
    RelinkRequired,
    SellerNotFound,
    Unauthorized,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
    responses,
)
from service.proxy.forward import METHODS, Proxy, forward
from service.serving.deps import ApiKeyDep

router = APIRouter()
PATH = "/sellers/{seller_id:path}/-/mercadopago/{path:path}"

DESCRIPTION = """
Calls `{path}` (and the query string) on the Mercado Pago API host of the seller's application
with the seller's access token: the caller never holds the token. Needs the `api:proxy` scope.

`/-/` ends the seller id (no seller id segment can be `-`), so ids with slashes are never
ambiguous: `/sellers/billing/42/-/mercadopago/v1/payments/search?status=approved`.
Only plain path segments are forwarded: `.`/`..`, empty segments, backslashes, schemes and
encoded `/`, `.` or `\\` are a 422, and nothing but the application's API host is reachable.

Request and reply bodies are streamed (at most `BROKER_PROXY_MAX_BODY_BYTES` and
`BROKER_PROXY_MAX_RESPONSE_BYTES`). `Authorization`, cookies and hop-by-hop headers are not
forwarded; `X-Idempotency-Key` is. Nothing is retried. Mercado Pago's reply comes back as it
was sent, status included; the broker's own refusals are `application/problem+json` with a
`code`: 409 `relink_required` (with `reason`) for a seller to link again or unlinked (Mercado
Pago is not called; also after a 401 whose check found the grant revoked), 429 per seller and
per application, 502 `upstream_failed`, 504 `upstream_timeout`.
"""


async def proxy_call(seller_id: str, path: str, request: Request, key: ApiKeyDep) -> Response:
    # The parameters are for the documentation: `forward` reads the raw path itself, where an
    # encoded `/` is still encoded and the first `/-/` ends the seller id.
    proxy: Proxy = request.app.state.proxy
    return await forward(proxy, key, request)


# Any status may be Mercado Pago's own reply (JSON, as it sent it) as well as, for the ones
# below, the broker's problem.
PAYMENT = {"id": 1234567890, "status": "approved", "transaction_amount": 100.0}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Mercado Pago's reply, streamed back as it came."},
    "default": {"description": "Mercado Pago's reply, whatever its status."},
    **responses(
        Unauthorized,
        Forbidden,
        SellerNotFound,
        RelinkRequired,
        UpstreamFailed,
        UpstreamUnavailable,
        UpstreamTimeout,
    ),
}
for status, documented in RESPONSES.items():
    example: dict[str, Any] = PAYMENT
    if isinstance(status, int) and status >= 400:  # Mercado Pago's error shape
        code = HTTPStatus(status).phrase.lower().replace(" ", "_")
        example = {"message": "...", "error": code, "status": status, "cause": []}
    upstream = {"application/json": {"schema": {}, "example": example}}
    documented["content"] = {**upstream, **documented.get("content", {})}

# One route per method, each with its own operation id (one route of five methods would give
# them all the same one).
for method in METHODS:
    router.add_api_route(
        PATH,
        proxy_call,
        methods=[method],
        operation_id=f"proxy_{method.lower()}",
        tags=["proxy"],
        summary="Call Mercado Pago's API for a seller, with the seller's token attached",
        description=DESCRIPTION,
        response_class=StreamingResponse,
        responses=RESPONSES,
    )
