"""The link flow's routes: an internal service asks for a link; the seller's browser opens it,
then comes back from Mercado Pago."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Cookie, Depends, Header, Path, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from service.core.errors import (
    ApplicationMismatch,
    Forbidden,
    LiveModeMismatch,
    Unauthorized,
    UnknownApplication,
    responses,
)
from service.core.schemas import LinkStartRequest, LinkStartResponse
from service.linking import flow as linking
from service.linking import pages
from service.serving import apikeys
from service.serving.deps import ApiKeyDep


async def get_linking(request: Request) -> linking.Linking:
    flow: linking.Linking = request.app.state.linking
    return flow


LinkingDep = Annotated[linking.Linking, Depends(get_linking)]

router = APIRouter()  # internal services (API key)
pages_router = APIRouter(tags=["seller pages"])  # the seller's browser


@router.post(
    "/link/start",
    status_code=201,
    tags=["linking"],
    response_model=LinkStartResponse,
    responses=responses(
        Unauthorized, Forbidden, UnknownApplication, ApplicationMismatch, LiveModeMismatch
    ),
)
async def start_link(
    body: LinkStartRequest, flow: LinkingDep, key: ApiKeyDep, response: Response
) -> LinkStartResponse:
    """Create a link to send to a seller so they can connect their Mercado Pago account."""
    # link_url is a bearer credential for BROKER_LINK_TTL_SECONDS: no cache may keep it.
    response.headers["Cache-Control"] = "no-store"
    apikeys.authorize(key, "links:write", body.seller_id)
    link_url, expires_at = await linking.start_link(
        flow, key, body.seller_id, body.application, body.return_url, test=body.test
    )
    return LinkStartResponse(link_url=link_url, expires_at=expires_at)


COOKIE = "mpb_link"
SECURE_COOKIE = "__Host-mpb_link"  # __Host-: Secure, no Domain, Path=/ — cannot be planted

HTML: dict[str, Any] = {
    "content": {
        "text/html": {
            "example": '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            "<title>Your account is linked</title></head><body><main><h1>Your account is "
            "linked</h1><p>You can close this page.</p></main></body></html>"
        }
    }
}


def _binder(plain: str | None, secure: str | None, *, https: bool) -> str | None:
    return secure if https else plain


@pages_router.get(
    "/link/{token}",
    response_class=RedirectResponse,
    response_model=None,
    status_code=302,
    responses={
        **responses(),
        302: {"description": "To Mercado Pago's consent page; sets the browser-binding cookie"},
        404: {**HTML, "description": "An HTML page: unknown link"},
        410: {**HTML, "description": "An HTML page: expired or used link"},
    },
)
async def open_link(
    token: Annotated[str, Path(max_length=64)],
    flow: LinkingDep,
    accept_language: Annotated[str | None, Header(include_in_schema=False)] = None,
    mpb_link: Annotated[str | None, Cookie(include_in_schema=False)] = None,
    host_mpb_link: Annotated[
        str | None, Cookie(alias=SECURE_COOKIE, include_in_schema=False)
    ] = None,
) -> RedirectResponse | HTMLResponse:
    """The link a seller opens: binds this browser and sends it to Mercado Pago's consent page."""
    https = flow.settings.secure_cookies
    opened = await linking.open_link(flow, token, _binder(mpb_link, host_mpb_link, https=https))
    if isinstance(opened, linking.CallbackResult):
        return pages.page(opened.result, pages.language(accept_language))
    url, binder = opened
    response = RedirectResponse(url, status_code=302, headers=pages.SECURITY_HEADERS)
    response.set_cookie(
        SECURE_COOKIE if https else COOKIE,
        binder,
        max_age=flow.settings.broker_attempt_ttl_seconds,
        path="/",
        secure=https,
        httponly=True,
        samesite="lax",  # sent on Mercado Pago's top-level redirect back, not on cross-site posts
    )
    return response


CALLBACK_RESPONSES: dict[int | str, dict[str, Any]] = {
    **responses(),
    200: {**HTML, "description": "An HTML page telling the seller how linking ended"},
    303: {"description": "To the link's return_url with `status` and `seller_id` added"},
    400: {**HTML, "description": "An HTML page: unknown, expired or malformed callback"},
    403: {**HTML, "description": "An HTML page: finished in another browser"},
    409: {**HTML, "description": "An HTML page: linked to another account or application"},
}


@dataclass(frozen=True)
class Callback:
    """What Mercado Pago's redirect back brings, on any of the callback URLs."""

    state: str | None
    code: str | None
    error: str | None
    binder: str | None
    lang: str


async def callback_params(
    flow: LinkingDep,
    accept_language: Annotated[str | None, Header(include_in_schema=False)] = None,
    state: Annotated[str | None, Query(max_length=512)] = None,
    code: Annotated[str | None, Query(max_length=512)] = None,
    error: Annotated[str | None, Query(max_length=256)] = None,
    mpb_link: Annotated[str | None, Cookie(include_in_schema=False)] = None,
    host_mpb_link: Annotated[
        str | None, Cookie(alias=SECURE_COOKIE, include_in_schema=False)
    ] = None,
) -> Callback:
    binder = _binder(mpb_link, host_mpb_link, https=flow.settings.secure_cookies)
    return Callback(state, code, error, binder, pages.language(accept_language))


CallbackDep = Annotated[Callback, Depends(callback_params)]


@pages_router.get(
    "/oauth/callback",
    response_class=HTMLResponse,
    response_model=None,
    responses=CALLBACK_RESPONSES,
)
async def oauth_callback(flow: LinkingDep, back: CallbackDep) -> HTMLResponse | RedirectResponse:
    """Mercado Pago's redirect back: checks state and browser, exchanges the code, stores tokens."""
    result = await linking.handle_callback(flow, back.state, back.code, back.error, back.binder)
    return pages.respond(result, back.lang)


@pages_router.get(
    "/oauth/callback/{application}",
    response_class=HTMLResponse,
    response_model=None,
    responses=CALLBACK_RESPONSES,
)
async def oauth_application_callback(
    application: Annotated[str, Path(max_length=32)], flow: LinkingDep, back: CallbackDep
) -> HTMLResponse | RedirectResponse:
    """The same on an application's own Redirect URL: only that application's attempts."""
    app = flow.upstream.apps.get(application)
    if app is None:
        return pages.page(linking.Refusal.UNKNOWN_STATE, back.lang)
    result = await linking.handle_callback(
        flow, back.state, back.code, back.error, back.binder, app
    )
    return pages.respond(result, back.lang)
