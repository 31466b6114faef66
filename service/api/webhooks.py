"""Notifications from Mercado Pago itself."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Query, Response

from service import webhooks
from service.api.deps import RuntimeDep
from service.errors import InvalidSignature, UpstreamUnavailable, responses
from service.mercadopago import TransientUpstreamError

router = APIRouter(tags=["webhooks"])


@router.post(
    "/webhooks/mercadopago",
    responses={
        200: {
            "description": "Handled, ignored or a duplicate: Mercado Pago need not retry",
            "content": {"application/json": {"example": {"action": "unlinked", "sellers": 1}}},
        },
        **responses(InvalidSignature, UpstreamUnavailable),
    },
)
async def mercadopago_notification(
    rt: RuntimeDep,
    body: Annotated[
        dict[str, Any],
        Body(
            examples=[
                {
                    "id": 12345,
                    "type": "mp-connect",
                    "action": "application.deauthorized",
                    "application_id": "1234567890123456",
                    "user_id": 123456789,
                    "data": {"id": "123456789"},
                }
            ]
        ),
    ],
    data_id: Annotated[str | None, Query(alias="data.id", max_length=64)] = None,
    x_signature: Annotated[str | None, Header(max_length=256)] = None,
    x_request_id: Annotated[str | None, Header(max_length=128)] = None,
) -> Response:
    """Receive `mp-connect` notifications; a verified `application.deauthorized` may unlink."""
    if not webhooks.verify(
        x_signature,
        rt.settings.mp_webhook_secrets,
        data_id,
        x_request_id,
        rt.clock(),
        rt.settings.broker_webhook_tolerance_seconds,
    ):
        raise InvalidSignature("The x-signature header is missing, stale or wrong.")
    try:
        handled = await webhooks.handle(rt, x_request_id, data_id, body)
    except TransientUpstreamError:
        raise UpstreamUnavailable("Mercado Pago could not confirm; send it again.") from None
    return Response(f'{{"action": "{handled.action}"}}', media_type="application/json")
