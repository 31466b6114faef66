"""The hot path, `GET /sellers/{id}/token`, served as pure ASGI.

Internal services call it before every Mercado Pago call. Measured on this route, FastAPI's
per-request dependency and parameter resolution cost about twice as much CPU as everything the
broker itself does (key check, cache lookup, audit count, metrics), so a well-formed request
is answered here, before routing, by the same service function (`tokens.serve`, after
`Callers.authenticate`) and with the same responses as the FastAPI route in `routes.py`
(`tests/test_fast_path.py` compares them answer by answer). Anything unusual (an invalid
seller id, an unexpected or malformed query parameter) falls through to that route, which
validates and documents it (OpenAPI, 422 problems) as before.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl

from fastapi.routing import APIRoute
from starlette.responses import Response

from service.core.errors import BrokerError, problem_response
from service.core.schemas import SELLER_ID_MAX, SELLER_ID_PATTERN
from service.serving import tokens

TOKEN_PATH = re.compile(r"^/sellers/(.+)/token$")
SELLER_ID = re.compile(SELLER_ID_PATTERN)
DIGITS = re.compile(r"^[0-9]{1,12}$")


class TokenReads:
    def __init__(self, app: Any, route: APIRoute) -> None:
        self.app = app
        self.route = route  # the documented route: what Observe labels metrics with

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        request = _token_read(scope)
        if request is None:
            await self.app(scope, receive, send)
            return
        seller_id, min_ttl = request
        scope["route"] = self.route
        response = await self._answer(scope["app"], scope, seller_id, min_ttl)
        await response(scope, receive, send)

    async def _answer(self, app: Any, scope: Any, seller_id: str, min_ttl: int) -> Response:
        try:
            authorization = next(
                (v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), None
            )
            key = await app.state.callers.authenticate(authorization, scope)
            return await tokens.serve(app.state.serving, key, seller_id, min_ttl)
        except BrokerError as exc:
            return problem_response(exc.status, exc.code, exc.title, exc.detail, exc.headers)


def _token_read(scope: Any) -> tuple[str, int] | None:
    """(seller id, min_ttl) of a well-formed token read; None for anything else."""
    if scope["type"] != "http" or scope["method"] != "GET":
        return None
    # fullmatch: `$` alone would also match before a trailing newline (`…/token\n`).
    match = TOKEN_PATH.fullmatch(scope["path"])
    if match is None:
        return None
    seller_id = match.group(1)
    if len(seller_id) > SELLER_ID_MAX or not SELLER_ID.fullmatch(seller_id):
        return None
    query = scope["query_string"]
    if not query:
        return seller_id, 0
    params = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    if len(params) != 1 or params[0][0] != "min_ttl" or not DIGITS.fullmatch(params[0][1]):
        return None  # the route's own validation says what is wrong with it
    return seller_id, int(params[0][1])
