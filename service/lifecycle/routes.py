"""A seller's life after linking: the admin routes (status, list, audit, unlink, the
applications' summary) and Mercado Pago's own notifications."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Header, Query, Request, Response

from service.core.domain import Reason, StatusName
from service.core.errors import (
    Forbidden,
    InvalidSignature,
    SellerNotFound,
    Unauthorized,
    UpstreamUnavailable,
    responses,
)
from service.core.mercadopago import TransientUpstreamError
from service.core.schemas import (
    SELLER_ID_MAX,
    ApplicationSummary,
    AuditEntry,
    SellerId,
    SellerPage,
    SellerStatus,
)
from service.lifecycle import applications, audit, sellers, webhooks
from service.serving import apikeys
from service.serving.deps import ApiKeyDep


async def get_admin(request: Request) -> sellers.Admin:
    admin: sellers.Admin = request.app.state.admin
    return admin


async def get_notifications(request: Request) -> webhooks.Notifications:
    notifications: webhooks.Notifications = request.app.state.notifications
    return notifications


AdminDep = Annotated[sellers.Admin, Depends(get_admin)]
NotificationsDep = Annotated[webhooks.Notifications, Depends(get_notifications)]

router = APIRouter()  # internal services (API key)
notifications_router = APIRouter(tags=["webhooks"])  # Mercado Pago itself


@router.get(
    "/sellers",
    tags=["sellers"],
    response_model=SellerPage,
    responses=responses(Unauthorized, Forbidden),
)
async def list_sellers(
    admin: AdminDep,
    key: ApiKeyDep,
    status: Annotated[StatusName | None, Query()] = None,
    expiring_before: Annotated[datetime | None, Query()] = None,
    cursor: Annotated[str | None, Query(max_length=SELLER_ID_MAX)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> SellerPage:
    """List sellers by status or token expiry, in seller_id order, a page at a time."""
    apikeys.authorize(key, "sellers:admin")
    stmt = sellers.page_query(key.namespace, key.client_ids, status, expiring_before, cursor, limit)
    async with admin.db.sessions() as session:
        found = list(await session.scalars(stmt))
    page = found[:limit]
    more = len(found) > limit
    return SellerPage(
        items=[SellerStatus.of(s, admin.settings.apps) for s in page],
        next_cursor=page[-1].seller_id if more else None,
    )


@router.get(
    "/sellers/{seller_id:path}",
    tags=["sellers"],
    response_model=SellerStatus,
    responses=responses(Unauthorized, Forbidden, SellerNotFound),
)
async def get_seller(seller_id: SellerId, admin: AdminDep, key: ApiKeyDep) -> SellerStatus:
    """Show a seller's link status, token expiry and last refresh; never a secret."""
    apikeys.authorize(key, "sellers:admin", seller_id)
    await sellers.authorize_seller(admin.db.sessions, key, seller_id)
    return await sellers.status(admin.db.sessions, admin.settings.apps, seller_id)


@router.get(
    "/audit",
    tags=["sellers"],
    response_model=list[AuditEntry],
    responses=responses(Unauthorized, Forbidden),
)
async def read_audit(
    admin: AdminDep,
    key: ApiKeyDep,
    seller_id: Annotated[str | None, Query(max_length=SELLER_ID_MAX)] = None,
    actor: Annotated[str | None, Query(max_length=100)] = None,
    application: Annotated[str | None, Query(max_length=32)] = None,
    before: Annotated[
        int | None, Query(ge=1, le=2**63 - 1, description="Page: events older than this id")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[AuditEntry]:
    """List audit events, newest first: links, refreshes, unlinks, key changes, token reads."""
    apikeys.authorize(key, "sellers:admin", seller_id)
    if key.namespace and seller_id is None:
        raise Forbidden("A key limited to a namespace must name one of its sellers.")
    if seller_id is not None:
        await sellers.authorize_seller(admin.db.sessions, key, seller_id)
    elif key.client_ids is not None:  # then name one of its applications
        app = admin.settings.apps.get(application or "")
        apikeys.authorize_application(key, app.client_id if app else None)
    async with admin.db.sessions() as session:
        events = await audit.query(session, seller_id, actor, before, limit, application)
    return [AuditEntry.model_validate(event) for event in events]


@router.delete(
    "/sellers/{seller_id:path}",
    tags=["sellers"],
    response_model=SellerStatus,
    responses=responses(Unauthorized, Forbidden, SellerNotFound),
)
async def unlink_seller(seller_id: SellerId, admin: AdminDep, key: ApiKeyDep) -> SellerStatus:
    """Unlink a seller: destroy its stored tokens, keep the row (as `unlinked`) for its history."""
    apikeys.authorize(key, "sellers:admin", seller_id)
    await sellers.authorize_seller(admin.db.sessions, key, seller_id)
    await sellers.unlink(
        admin.db.sessions,
        admin.settings,
        admin.clock(),
        seller_id,
        Reason.UNLINKED_BY_PLATFORM,
        actor=key.name,
    )
    return await sellers.status(admin.db.sessions, admin.settings.apps, seller_id)


@router.get(
    "/applications",
    tags=["sellers"],
    response_model=list[ApplicationSummary],
    responses=responses(Unauthorized, Forbidden),
)
async def list_applications(admin: AdminDep, key: ApiKeyDep) -> list[ApplicationSummary]:
    """List the Mercado Pago applications: sellers by status, breaker, refresh backlog."""
    apikeys.authorize(key, "sellers:admin")
    if key.namespace:
        # The counts span every seller of an application, most of them outside the namespace.
        raise Forbidden("A key limited to a namespace cannot see application-wide counts.")
    visible = [app for app in admin.settings.apps.values() if apikeys.may_use(key, app.client_id)]
    async with admin.db.sessions() as session:
        return await applications.summaries(session, visible, admin.clock())


@notifications_router.post(
    "/webhooks/mercadopago",
    responses={
        200: {
            "description": "Handled, ignored or a duplicate: Mercado Pago need not retry",
            "content": {"application/json": {"example": {"action": "unlinked"}}},
        },
        **responses(InvalidSignature, UpstreamUnavailable),
    },
)
async def mercadopago_notification(
    flow: NotificationsDep,
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
    # Mercado Pago always sends x-request-id: without one, nothing could tell a replay within
    # the tolerance from a new notification (each would cost a /users/me call).
    x_request_id: Annotated[str, Header(pattern=webhooks.REQUEST_ID)],
    data_id: Annotated[str | None, Query(alias="data.id", pattern=webhooks.DATA_ID)] = None,
    x_signature: Annotated[str | None, Header(max_length=256)] = None,
) -> Response:
    """Receive `mp-connect` notifications; a verified `application.deauthorized` may unlink."""
    # The body's application_id picks the application, and so the secret to verify with: one
    # application's secret cannot vouch for another's notification.
    app = webhooks.application_of(flow.upstream.apps, body)
    if app is None or not webhooks.verify(
        x_signature,
        app.webhook_secrets,
        data_id,
        x_request_id,
        flow.clock(),
        flow.settings.broker_webhook_tolerance_seconds,
    ):
        raise InvalidSignature("The x-signature header is missing, stale or wrong.")
    try:
        handled = await webhooks.handle(flow, app, x_request_id, data_id, body)
    except TransientUpstreamError:
        raise UpstreamUnavailable("Mercado Pago could not confirm; send it again.") from None
    return Response(f'{{"action": "{handled.action}"}}', media_type="application/json")
