"""One error family for the internal API, rendered as RFC 9457 `application/problem+json`.

Every error carries a stable `code` that callers can switch on; `title` is fixed per code and
`detail` explains this occurrence. No secret ever goes into either.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.core.db import is_database_outage

PROBLEM_JSON = "application/problem+json"

log = logging.getLogger("broker.errors")
E = TypeVar("E", bound=Exception)


class BrokerError(Exception):
    code = "internal_error"
    status = 500
    title = "Internal error"

    def __init__(
        self,
        detail: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, str] | None = None,
    ):
        super().__init__(detail or self.title)
        self.detail = detail or self.title
        self.headers = headers or {}
        self.extra = extra or {}  # RFC 9457 extension members (`reason`), beside `code`


class InvalidRequest(BrokerError):
    code, status, title = "invalid_request", 422, "The request is not valid"


class Unauthorized(BrokerError):
    code, status, title = "unauthorized", 401, "A valid API key is required"


class InvalidSignature(BrokerError):
    code, status, title = "invalid_signature", 401, "The notification's signature does not verify"


class Forbidden(BrokerError):
    code, status, title = "forbidden", 403, "This API key may not do that"


class SellerNotFound(BrokerError):
    code, status, title = "seller_not_found", 404, "No such seller"


class UnknownApplication(BrokerError):
    code, status, title = "unknown_application", 422, "No such Mercado Pago application"


class ApplicationMismatch(BrokerError):
    code, status, title = (
        "application_mismatch",
        409,
        "The seller is linked through another Mercado Pago application",
    )


class LiveModeMismatch(BrokerError):
    code, status, title = "live_mode_mismatch", 409, "Sandbox and live credentials never mix"


class RelinkRequired(BrokerError):
    code, status, title = "relink_required", 409, "The seller must link their account again"

    def __init__(self, reason: str, *, headers: dict[str, str] | None = None) -> None:
        # `reason` is the seller's `status_reason` (rotation_lost, revoked, ...; `unlinked`
        # from the proxy): callers switch on it without parsing `detail`.
        super().__init__(
            f"Send the seller a new link (reason: {reason}).",
            headers=headers,
            extra={"reason": reason},
        )


class UpstreamUnavailable(BrokerError):
    code, status, title = "upstream_unavailable", 503, "Mercado Pago cannot refresh the token now"


class UpstreamFailed(BrokerError):
    code, status, title = "upstream_failed", 502, "Mercado Pago could not be reached"


class UpstreamTimeout(BrokerError):
    code, status, title = "upstream_timeout", 504, "Mercado Pago did not answer in time"


class DatabaseUnavailable(BrokerError):
    code, status, title = "database_unavailable", 503, "The broker's database is unavailable"


class RateLimited(BrokerError):
    code, status, title = "rate_limited", 429, "Too many requests; try again later"


class MalformedBody(BrokerError):
    code, status, title = "malformed_body", 400, "The request body cannot be read"


class BodyTooLarge(BrokerError):
    code, status, title = "body_too_large", 413, "The request body is too large"


class UriTooLong(BrokerError):
    code, status, title = "uri_too_long", 414, "The query string is too long"


class HeadersTooLarge(BrokerError):
    code, status, title = "headers_too_large", 431, "The request headers are too large"


# What any route may answer before it runs (service/serving/limits.py), while reading a body, or
# while the database is out of reach (CatchAll).
EARLY_REFUSALS: tuple[type[BrokerError], ...] = (
    MalformedBody,
    BodyTooLarge,
    UriTooLong,
    HeadersTooLarge,
    RateLimited,
    DatabaseUnavailable,
)
DATABASE_RETRY_AFTER_SECONDS = 2


class Problem(BaseModel):
    """RFC 9457 problem details, plus the broker's stable `code`."""

    type: str = "about:blank"
    title: str
    status: int
    detail: str
    code: str
    reason: str | None = Field(
        default=None, description="`relink_required` only: the seller's `status_reason`"
    )


def problem_response(
    status: int,
    code: str,
    title: str,
    detail: str,
    headers: dict[str, str] | None = None,
    extra: dict[str, str] | None = None,
) -> JSONResponse:
    body = {"type": "about:blank", "title": title, "status": status, "detail": detail, "code": code}
    if extra:
        body |= {name: value for name, value in extra.items() if name not in body}
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON, headers=headers)


def responses(*errors: type[BrokerError]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` for a route: every error it can answer, with its `code`."""
    by_status: dict[int, list[type[BrokerError]]] = {}
    documented: tuple[type[BrokerError], ...] = (InvalidRequest, *EARLY_REFUSALS, *errors)
    for error in documented:
        by_status.setdefault(error.status, []).append(error)
    schema = Problem.model_json_schema()
    return {
        status: {
            "description": "; ".join(f"`{e.code}`: {e.title}" for e in errs),
            "content": {
                PROBLEM_JSON: {
                    "schema": schema,
                    "examples": {
                        e.code: {
                            "summary": e.title,
                            "value": {
                                "type": "about:blank",
                                "title": e.title,
                                "status": status,
                                "detail": e.title,
                                "code": e.code,
                            },
                        }
                        for e in errs
                    },
                }
            },
        }
        for status, errs in by_status.items()
    }


def broker_problem(exc: BrokerError) -> JSONResponse:
    return problem_response(exc.status, exc.code, exc.title, exc.detail, exc.headers, exc.extra)


def install(app: FastAPI) -> None:
    def validation_error(exc: RequestValidationError) -> JSONResponse:
        # Say where and what, never echo the input: it may hold a secret.
        where = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        return problem_response(422, "invalid_request", InvalidRequest.title, where)

    def http_error(exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not read the body (not UTF-8, say)
            return problem_response(400, MalformedBody.code, MalformedBody.title, str(exc.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        title = str(exc.detail)
        headers = dict(exc.headers) if exc.headers else None
        return problem_response(exc.status_code, code, title, title, headers)

    _handle(app, BrokerError, broker_problem)
    _handle(app, RequestValidationError, validation_error)
    _handle(app, StarletteHTTPException, http_error)


def _handle(app: FastAPI, kind: type[E], render: Callable[[E], JSONResponse]) -> None:
    """Register `render` for `kind`. Starlette types every handler as taking any exception but
    calls each only with the class it was registered for; the check tells the type checker."""

    async def handler(_: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, kind):
            raise exc
        return render(exc)

    app.add_exception_handler(kind, handler)


class CatchAll:
    """Pure ASGI: an unexpected exception becomes a bare problem+json 500.

    Starlette's own last-resort handler re-raises, and the server then logs a traceback whose
    frames and messages (a database error quoting its parameters, say) could hold a secret. Here
    only the exception's type is logged.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Any) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:  # noqa: BLE001 the last resort: anything becomes a bare 500
            failed = last_resort(exc)
            if not started:
                await failed(scope, receive, send)


def last_resort(exc: Exception) -> JSONResponse:
    """What an unexpected exception answers (logged by its type only, never its message)."""
    log.error("request.failed", extra={"fields": {"error": type(exc).__name__}})
    if is_database_outage(exc):
        return problem_response(
            503,
            DatabaseUnavailable.code,
            DatabaseUnavailable.title,
            "Try again shortly.",
            {"Retry-After": str(DATABASE_RETRY_AFTER_SECONDS)},
        )
    return problem_response(500, BrokerError.code, BrokerError.title, BrokerError.title)
