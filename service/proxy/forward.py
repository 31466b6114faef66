"""Calls to Mercado Pago's API made for a seller: the broker attaches the seller's token, so
internal services never hold it.

`/sellers/{seller_id}/-/mercadopago/{path}` goes to `{the seller's application's api_url}/{path}`
and nowhere else. The request is checked before anything is sent:

1. the key has `api:proxy`, the seller is in its namespace and applications;
2. the path is plain segments (`target`): letters, digits, `-_~!$&'()*+,;=@` and escapes;
   no `.` at all (so no `.` or `..`; Mercado Pago's API paths have none) nor `:` (no scheme,
   no `host:port`), no empty segment (`//host`), no backslash, no encoded `/`, `\\`, `.` or
   NUL, so the URL built from it keeps the application's host, port and path prefix (checked
   again on the built URL);
3. the seller is linked (a seller to link again or unlinked is a 409, Mercado Pago not called),
   and its token is refreshed first when it has less than a minute left;
4. the seller's and its application's proxy rate limits (429), so that no caller spends the
   application's Mercado Pago quota.

Then one request, never retried (a POST may have been honoured even when its reply is lost;
`X-Idempotency-Key` is passed through for the caller's own retries), the body streamed both
ways within size limits and one deadline (502 / 504 problems). The caller's `Authorization`,
cookies and hop-by-hop headers are dropped, and so is `Accept-Encoding`: the reply comes
unencoded, so that the seller's token is masked wherever it appears in it (an endpoint that
echoes what it was given must not hand the token out). A 401 from Mercado Pago starts the
same `/users/me` check as `POST /sellers/{id}/token/invalid`; a revoked grant marks the seller
and the caller gets the 409 at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import httpx
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from service.core import logs, metrics
from service.core.config import Settings
from service.core.domain import KeyView, SellerView, Status
from service.core.errors import (
    InvalidRequest,
    RateLimited,
    RelinkRequired,
    UpstreamFailed,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from service.core.schemas import PROXY_SEPARATOR, SELLER_ID_MAX, SELLER_ID_PATTERN
from service.lifecycle.audit import ReadCounter
from service.serving import apikeys, tokens
from service.serving.limits import Buckets

log = logging.getLogger("broker.proxy")

SCOPE = "api:proxy"
PREFIX = "/sellers/"
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
MIN_TTL_SECONDS = 60  # a token about to lapse is refreshed before the call, not after a 401
SEGMENT = re.compile(r"(?:[A-Za-z0-9\-_~!$&'()*+,;=@]|%[0-9A-Fa-f]{2})+")
REFUSED_ESCAPES = re.compile(r"%(?:2[fFeE]|5[cC]|00)")  # "/", ".", "\", NUL in disguise
SELLER_ID = re.compile(SELLER_ID_PATTERN)
WORD = re.compile(r"[a-z][a-z_-]{0,39}|v[0-9]{1,2}")  # a route's own segment, not an id
# Never forwarded: hop-by-hop (RFC 9110 §7.6.1), the caller's own credentials and cookies, and
# the encoding the token mask could not see through.
DROPPED = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
        "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "host",
        "authorization", "cookie", "accept-encoding", "user-agent",
    }
)  # fmt: skip
# And from the reply: its cookies, and the head the broker's own server writes.
DROPPED_BACK = DROPPED - {"accept-encoding", "user-agent"} | {"set-cookie", "date", "server"}
USER_AGENT = ("user-agent", "mp-token-broker")  # as every other call the broker makes


@dataclass
class Templates:
    """Upstream route templates for the metrics' labels: a segment that is a word or a version
    (`v1`) stays, any other (an id) is `{id}`; at most `MAX` of them, then `other` (a caller
    choosing paths must not grow the metrics without bound)."""

    MAX = 500
    seen: set[str] = field(default_factory=set)

    def of(self, path: str) -> str:
        segments = path.split("/")
        named = [s if WORD.fullmatch(s) else "{id}" for s in segments[:6]]
        template = "/" + "/".join(named) + ("/…" if len(segments) > 6 else "")
        if template not in self.seen:
            if len(self.seen) >= self.MAX:
                return "other"
            self.seen.add(template)
        return template


@dataclass(frozen=True)
class Proxy:
    """The parts of the process proxied calls use."""

    settings: Settings
    serving: tokens.Serving
    transports: list[httpx.AsyncBaseTransport]  # pools of their own (Runtime.api), used in turn
    calls: ReadCounter  # the audit's counts, per key, seller and minute
    per_seller: Buckets = field(init=False)
    per_application: Buckets = field(init=False)
    templates: Templates = field(default_factory=Templates)
    turn: Iterator[httpx.AsyncBaseTransport] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "turn", itertools.cycle(self.transports))
        per_seller = self.settings.broker_proxy_rate_per_seller_per_second
        per_app = self.settings.broker_proxy_rate_per_application_per_second
        object.__setattr__(self, "per_seller", Buckets(per_seller, burst=max(1.0, per_seller)))
        object.__setattr__(self, "per_application", Buckets(per_app, burst=max(1.0, per_app)))


def target(raw_path: bytes) -> tuple[str, str]:
    """(seller id, upstream path) of a proxy request's raw (still percent-encoded) path, or
    `InvalidRequest`. The raw path, not the decoded one: `%2F` must not become a `/`."""
    path = raw_path.decode("latin-1")
    split = path.find(PROXY_SEPARATOR)
    if not path.startswith(PREFIX) or split < 0:
        raise InvalidRequest(f"The path is {PREFIX}{{seller_id}}{PROXY_SEPARATOR}{{path}}.")
    seller_id, upstream = path[len(PREFIX) : split], path[split + len(PROXY_SEPARATOR) :]
    if len(seller_id) > SELLER_ID_MAX or not SELLER_ID.fullmatch(seller_id):
        raise InvalidRequest("seller_id: not a seller id.")
    # SEGMENT needs one character at least and takes no ".": no empty, "." or ".." segment.
    if REFUSED_ESCAPES.search(upstream) or not all(
        SEGMENT.fullmatch(s) for s in upstream.split("/")
    ):
        raise InvalidRequest(
            "path: plain segments of Mercado Pago's API only (no '.', '..', empty segment, "
            "backslash, scheme or encoded '/', '.', '\\\\')."
        )
    return seller_id, upstream


def upstream_url(api_url: str, path: str, query: bytes) -> httpx.URL:
    """`path` under the application's API URL; refused unless it stays on its host, port and
    path (the segments are already plain: this is the last line, not the only one)."""
    base = httpx.URL(api_url.rstrip("/") + "/")
    url = httpx.URL(str(base) + path + ("?" + query.decode("latin-1") if query else ""))
    if (url.scheme, url.host, url.port) != (base.scheme, base.host, base.port) or not (
        url.raw_path.startswith(base.raw_path)
    ):
        raise InvalidRequest("path: only the application's Mercado Pago API is reachable.")
    return url


async def forward(proxy: Proxy, key: KeyView, request: Request) -> Response:
    """One call to Mercado Pago's API for a seller; its reply streamed back as it came."""
    seller_id, path = target(request.scope.get("raw_path") or request.scope["path"].encode())
    apikeys.authorize(key, SCOPE, seller_id)
    serving = proxy.serving
    seller = await tokens.for_call(serving, key, seller_id, MIN_TTL_SECONDS)
    app = serving.upstream.apps.by_client_id.get(seller.client_id)
    if app is None or seller.access_token is None:  # an application no longer configured
        raise UpstreamUnavailable("The seller's Mercado Pago application is not configured.")
    url = upstream_url(app.api_url, path, request.scope.get("query_string", b""))
    _take_turn(proxy, seller)
    template = proxy.templates.of(path)
    proxy.calls.add(key.name, seller_id, seller.client_id, serving.clock())
    started = time.perf_counter()
    status = 502
    try:
        reply, deadline = await _send(proxy, request, url, seller.access_token)
        status = reply.status_code
        if status == 401:
            try:
                await _check_grant(proxy, key, seller)
            except BaseException:  # a 409, or the check itself failed: the reply goes unread
                await reply.aclose()
                raise
        return await _passed_back(proxy, reply, url, deadline, seller.access_token)
    except UpstreamTimeout:
        status = 504
        raise
    finally:
        elapsed = time.perf_counter() - started
        metrics.PROXY_REQUESTS.labels(app.name, template, str(status)).inc()
        metrics.PROXY_SECONDS.labels(app.name, template).observe(elapsed)


def _take_turn(proxy: Proxy, seller: SellerView) -> None:
    now = time.monotonic()
    wait = proxy.per_seller.due(seller.seller_id, now) or proxy.per_application.due(
        seller.client_id, now
    )
    if wait:
        raise RateLimited(
            "Too many calls for this seller or its application.",
            headers={"Retry-After": str(math.ceil(wait))},
        )
    proxy.per_seller.take(seller.seller_id, now)
    proxy.per_application.take(seller.client_id, now)


async def _send(
    proxy: Proxy, request: Request, url: httpx.URL, access_token: str
) -> tuple[httpx.Response, float]:
    """Send the request (its body streamed from the caller); the reply's head, and the deadline
    its body must arrive by. Never retried."""
    named = {n.strip().lower() for v in request.headers.getlist("connection") for n in v.split(",")}
    headers = [
        (name, value)
        for name, value in request.headers.items()
        if name not in DROPPED and name not in named and not name.startswith("x-forwarded-")
    ]
    headers += [("authorization", f"Bearer {access_token}"), USER_AGENT]
    has_body = request.method in ("POST", "PUT", "PATCH", "DELETE") and (
        "content-length" in request.headers or "transfer-encoding" in request.headers
    )
    outgoing = httpx.Request(
        request.method, url, headers=headers, content=request.stream() if has_body else None
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + proxy.settings.broker_proxy_timeout_seconds
    try:
        async with asyncio.timeout_at(deadline):
            reply = await next(proxy.turn).handle_async_request(outgoing)
    except TimeoutError:
        _failed("timeout", url)
        raise UpstreamTimeout() from None
    except httpx.HTTPError as exc:
        _failed(type(exc).__name__, url)
        raise UpstreamFailed() from None
    length = reply.headers.get("content-length", "0")
    if not length.isdigit() or int(length) > proxy.settings.broker_proxy_max_response_bytes:
        await reply.aclose()
        _failed("response_too_large", url)
        raise UpstreamFailed("Mercado Pago's reply is larger than the broker passes on.")
    return reply, deadline


def _failed(error: str, url: httpx.URL) -> None:
    logs.event(log, "proxy.upstream_failed", {"error": error, "host": url.host}, logging.WARNING)


async def _check_grant(proxy: Proxy, key: KeyView, seller: SellerView) -> None:
    """Mercado Pago refused the token: the `/users/me` check (coalesced per seller and token);
    a revoked grant marks the seller, and the caller hears it as a 409 now."""
    try:
        await tokens.report_invalid(proxy.serving, key, seller.seller_id)
    except UpstreamUnavailable:
        return  # not confirmed: the caller gets Mercado Pago's 401 as it came
    after = await tokens.seller_now(proxy.serving, seller.seller_id)
    if after is not None and after.status == Status.RELINK_REQUIRED:
        raise RelinkRequired(str(after.status_reason))


WHOLE_BYTES = 64 * 1024  # a reply this small (most are) is read whole and sent in one piece


async def _passed_back(
    proxy: Proxy, reply: httpx.Response, url: httpx.URL, deadline: float, access_token: str
) -> Response:
    """Mercado Pago's reply for the caller: its status and headers, the body masked; read whole
    when it is small (a streamed reply costs a task group and a send per chunk: `make bench`'s
    proxied p50 went from 56 to 46 ms with it), else streamed."""
    secret = access_token.encode()
    mask = Mask(secret)
    headers = [
        (name.lower(), value.replace(secret, mask.masked))
        for name, value in reply.headers.raw
        if name.decode("latin-1").lower() not in DROPPED_BACK
    ]
    body = _body(proxy, reply, url, deadline, mask)
    length = reply.headers.get("content-length")
    response: Response
    if length is not None and int(length) <= WHOLE_BYTES:
        response = Response(b"".join([chunk async for chunk in body]), reply.status_code)
    else:
        response = StreamingResponse(body, status_code=reply.status_code)
    response.raw_headers = headers
    return response


async def _body(
    proxy: Proxy, reply: httpx.Response, url: httpx.URL, deadline: float, mask: Mask
) -> AsyncIterator[bytes]:
    """The reply's body, masked, within the deadline and the size limit; past either the
    connection is cut (the status is already sent), never a truncated body passed as whole."""
    limit, seen = proxy.settings.broker_proxy_max_response_bytes, 0
    try:
        async with asyncio.timeout_at(deadline):
            async for chunk in reply.aiter_raw():
                seen += len(chunk)
                if seen > limit:
                    raise UpstreamFailed("Mercado Pago's reply outgrew the limit.")
                if masked := mask.feed(chunk):
                    yield masked
        yield mask.end()
    except (TimeoutError, httpx.HTTPError, UpstreamFailed) as exc:
        _failed(type(exc).__name__, url)
        raise UpstreamFailed() from None
    finally:
        await reply.aclose()


class Mask:
    """Replaces `secret` by as many `*` in a stream of chunks, also where a chunk boundary cuts
    it (the last len(secret) - 1 bytes wait for the next chunk); lengths stay the same, so the
    reply's Content-Length still holds."""

    def __init__(self, secret: bytes) -> None:
        self.secret, self.masked = secret, b"*" * len(secret)
        self.keep = len(secret) - 1
        self.held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = (self.held + chunk).replace(self.secret, self.masked)
        cut = max(len(data) - self.keep, 0)
        self.held = data[cut:]
        return data[:cut]

    def end(self) -> bytes:
        held, self.held = self.held, b""
        return held
