"""The hot path, `GET /sellers/{id}/token`, answered in front of the whole application.

Internal services call it before every Mercado Pago call. FastAPI's per-request dependency and
parameter resolution cost about twice as much CPU as everything the broker itself does (key
check, cache lookup, audit count, metrics), and each layer around the router (Starlette's and
FastAPI's own, then ours) costs a little more on every request. So `BrokerApp` (service/main.py)
hands a well-formed token read to `TokenReads.answered` before any of them: it does what those
layers would (the request id, the metrics, the last-resort 500) with the same owners
(`observe.request_id_of`, `observe.record`, `errors.last_resort`), answers with the same service
function as the FastAPI route in `routes.py` (`tokens.answer`, after `Callers.authenticate`),
and sends the reply's prebuilt headers and body as they are (`tests/test_fast_path.py` compares
the two answer by answer). Anything unusual (an invalid seller id, an unexpected or malformed
query parameter, a body, headers past the limit) goes on to the application, whose route and
request limits validate and document it (OpenAPI, problems) as before.
"""

from __future__ import annotations

import re
import time
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI
from fastapi.routing import APIRoute

from service.core.errors import BrokerError, broker_problem, last_resort
from service.core.logs import request_id
from service.core.schemas import SELLER_ID_MAX, SELLER_ID_PATTERN
from service.ops.observe import REQUEST_ID_HEADER, record, request_id_from
from service.serving import tokens

TOKEN_PATH = re.compile(r"^/sellers/(.+)/token$")
SELLER_ID = re.compile(SELLER_ID_PATTERN)
DIGITS = re.compile(r"^[0-9]{1,12}$")
BODY_HEADERS = (b"content-length", b"transfer-encoding")  # a GET with a body: the limits decide
# Token-read paths already checked -> their seller id: the same sellers are read again and again,
# and the two regular expressions cost 0.4 µs of a hit's 7.4 (in process). Strings only: the
# collector never tracks it; forgotten all at once when full.
PATHS_REMEMBERED = 10_000
_seller_of: dict[str, str] = {}


class TokenReads:
    def __init__(self, app: FastAPI, route: APIRoute, max_header_bytes: int) -> None:
        self.app = app
        self.template = route.path  # the documented route: what the metrics are labelled with
        self.max_header_bytes = max_header_bytes

    async def answered(self, scope: Any, receive: Any, send: Any) -> bool:
        """Answer `scope` when it is a well-formed token read; False: not one, left untouched."""
        request = _token_read(scope, self.max_header_bytes)
        if request is None:
            return False
        seller_id, min_ttl, authorization, given_id = request
        rid = request_id_from(given_id)
        token = request_id.set(rid.decode())
        started = time.perf_counter()
        status = 500
        try:
            status, headers, body = await self._answer(scope, seller_id, min_ttl, authorization)
            headers.append((REQUEST_ID_HEADER, rid))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            record(self.template, status, time.perf_counter() - started)
            request_id.reset(token)
        return True

    async def _answer(
        self, scope: Any, seller_id: str, min_ttl: int, authorization: str | None
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        state = self.app.state
        callers, serving = state.callers, state.serving
        try:
            # Nothing awaited in the common case (a key and a token in memory): each coroutine
            # a read goes through costs it more than the lookups themselves.
            key = callers.known(authorization) or await callers.authenticate(authorization, scope)
            body, headers = tokens.answer_at_once(
                serving, key, seller_id, min_ttl
            ) or await tokens.answer(serving, key, seller_id, min_ttl)
            return 200, headers, body
        except BrokerError as exc:
            refused = broker_problem(exc)
        except Exception as exc:  # noqa: BLE001 what the application's CatchAll would answer
            refused = last_resort(exc)
        return refused.status_code, list(refused.raw_headers), bytes(refused.body)


def _token_read(
    scope: Any, max_header_bytes: int
) -> tuple[str, int, str | None, bytes | None] | None:
    """(seller id, min_ttl, Authorization, X-Request-ID) of a well-formed token read, from one
    pass over the headers; None for anything else."""
    if scope["type"] != "http" or scope["method"] != "GET":
        return None
    path = scope["path"]
    seller_id = _seller_of.get(path)
    if seller_id is None:
        # fullmatch: `$` alone would also match before a trailing newline (`…/token\n`).
        match = TOKEN_PATH.fullmatch(path)
        if match is None:
            return None
        seller_id = match.group(1)
        if len(seller_id) > SELLER_ID_MAX or not SELLER_ID.fullmatch(seller_id):
            return None
        if len(_seller_of) >= PATHS_REMEMBERED:
            _seller_of.clear()
        _seller_of[path] = seller_id
    min_ttl = 0
    if query := scope["query_string"]:
        params = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        if len(params) != 1 or params[0][0] != "min_ttl" or not DIGITS.fullmatch(params[0][1]):
            return None  # the route's own validation says what is wrong with it
        min_ttl = int(params[0][1])
    authorization = given_id = None
    size = 0
    for name, value in scope["headers"]:
        size += len(name) + len(value)
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == REQUEST_ID_HEADER:
            given_id = value
        elif name in BODY_HEADERS:
            return None
    if size > max_header_bytes:
        return None  # the request limits answer it (431)
    return seller_id, min_ttl, authorization, given_id
