"""The hot path's pure-ASGI handler answers exactly like the documented FastAPI route.

Every documented answer of `GET /sellers/{seller_id}/token` is asked twice: once well-formed
(the fast path answers) and once with an extra query parameter, which the fast path leaves to
the documented route. Status, body and headers must agree.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from service.main import create_app
from service.serving import deps, fast, routes
from service.serving.fast import _token_read
from tests.support import Broker, FakeClock, Simulator, create_api_key, new_key, seed_sellers


def scope(
    path: str,
    query: bytes = b"",
    method: str = "GET",
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> dict[str, object]:
    return {
        "type": "http",
        "method": method,
        "path": path,
        "query_string": query,
        "headers": headers,
    }


def token_read(request: dict[str, object]) -> tuple[str, int, str | None, bytes | None] | None:
    return _token_read(request, max_header_bytes=1024)


def test_only_well_formed_token_reads_take_the_fast_path() -> None:
    assert token_read(scope("/sellers/billing/s-1/token")) == ("billing/s-1", 0, None, None)
    assert token_read(scope("/sellers/s-1/token", b"min_ttl=600")) == ("s-1", 600, None, None)
    given = ((b"authorization", b"Bearer mpb_x"), (b"x-request-id", b"r-1"))
    assert token_read(scope("/sellers/s-1/token", headers=given)) == (
        "s-1",
        0,
        "Bearer mpb_x",
        b"r-1",
    )
    assert token_read(scope("/sellers/s-1/token", b"min_ttl=600&x=1")) is None  # routed
    for odd in (
        scope("/sellers/s-1/token", method="POST"),
        scope("/sellers/s-1/token/invalid"),
        scope("/sellers/-bad/token"),
        scope("/sellers/" + "a" * 129 + "/token"),
        scope("/sellers/s-1/token", b"min_ttl=-1"),
        scope("/sellers/s-1/token", b"min_ttl=\xc2\xb2"),  # a Unicode digit
        scope("/sellers/s-1/token", b"min_ttl=1&min_ttl=2"),
        scope("/sellers/s-1/token", b"other=1"),
        # What the request limits judge: a body announced, headers past the limit.
        scope("/sellers/s-1/token", headers=((b"content-length", b"5"),)),
        scope("/sellers/s-1/token", headers=((b"transfer-encoding", b"chunked"),)),
        scope("/sellers/s-1/token", headers=((b"x-big", b"x" * 1024),)),
    ):
        assert token_read(odd) is None, odd


def test_checked_paths_are_remembered_within_a_bound() -> None:
    fast._seller_of.clear()
    assert token_read(scope("/sellers/s-1/token")) == ("s-1", 0, None, None)
    assert fast._seller_of == {"/sellers/s-1/token": "s-1"}
    assert token_read(scope("/sellers/s-1/token")) == ("s-1", 0, None, None)  # remembered
    assert token_read(scope("/sellers/-bad/token")) is None
    assert "/sellers/-bad/token" not in fast._seller_of  # only what passed the checks
    for n in range(fast.PATHS_REMEMBERED + 5):
        token_read(scope(f"/sellers/s-{n}/token"))
        assert len(fast._seller_of) <= fast.PATHS_REMEMBERED


@dataclass
class Setup:
    broker: Broker
    simulator: Simulator
    sql: asyncpg.Connection
    database_url: str
    clock: FakeClock


@dataclass
class Ask:
    seller_id: str
    min_ttl: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    calls: int = 1  # how many times each path is asked (the last answer is compared)
    routed_headers: dict[str, str] | None = None  # when the second path needs its own caller


async def a_linked_seller(s: Setup) -> Ask:
    await seed(s, "seller-00000")
    return Ask("seller-00000")


async def a_seller_whose_refreshes_fail(s: Setup) -> Ask:
    await seed(s, "seller-00000", "UPDATE sellers SET refresh_failures = 2")
    return Ask("seller-00000")


async def a_seller_to_relink_with_a_valid_token(s: Setup) -> Ask:
    relink = "UPDATE sellers SET status = 'relink_required', status_reason = 'revoked'"
    await seed(s, "seller-00000", relink)
    return Ask("seller-00000")


async def no_api_key(s: Setup) -> Ask:
    await seed(s, "seller-00000")
    return Ask("seller-00000", headers={"Authorization": ""})


async def a_key_without_tokens_read(s: Setup) -> Ask:
    await seed(s, "seller-00000")
    key = await new_key(s.database_url, scopes=("links:write",))
    return Ask("seller-00000", headers={"Authorization": f"Bearer {key}"})


async def an_unknown_seller(s: Setup) -> Ask:
    return Ask("nobody")


async def a_seller_to_relink_whose_token_expired(s: Setup) -> Ask:
    await seed(
        s,
        "seller-00000",
        "UPDATE sellers SET status = 'relink_required', status_reason = 'revoked', "
        "expires_at = now() - interval '1 minute', next_refresh_at = NULL",
    )
    return Ask("seller-00000")


async def a_min_ttl_beyond_the_maximum(s: Setup) -> Ask:
    await seed(s, "seller-00000")
    return Ask("seller-00000", min_ttl=s.broker.settings.broker_min_ttl_max_seconds + 1)


async def a_key_past_its_rate_limit(s: Setup) -> Ask:
    await seed(s, "seller-00000")
    # A bucket of one a second (the case's setting) per path: each key's second read is refused.
    fast, routed = await create_api_key(s.database_url), await create_api_key(s.database_url)
    return Ask(
        "seller-00000",
        headers={"Authorization": f"Bearer {fast}"},
        calls=2,
        routed_headers={"Authorization": f"Bearer {routed}"},
    )


async def mercado_pago_down_with_the_token_expiring(s: Setup) -> Ask:
    await seed(s, "seller-00000")
    await s.simulator.faults(status=503)
    s.clock.advance(hours=1)  # an hour of validity left on the seeded token: none now
    return Ask("seller-00000")


async def seed(s: Setup, seller_id: str, then: str | None = None) -> None:
    [seeded] = await seed_sellers(
        s.sql, s.simulator, s.broker.settings, 1, expires_in=3600, due=False
    )
    assert seeded == seller_id
    if then:
        await s.sql.execute(then)


@dataclass(frozen=True)
class Case:
    prepare: Callable[[Setup], Awaitable[Ask]]
    status: int
    code: str | None = None  # the problem's `code`
    warning: str | None = None  # Broker-Token-Warning
    retry_after: bool = False
    settings: dict[str, Any] = field(default_factory=dict)


CASES = [
    Case(a_linked_seller, 200),
    Case(a_seller_whose_refreshes_fail, 200, warning="refresh-failing"),
    Case(a_seller_to_relink_with_a_valid_token, 200, warning="relink-required"),
    Case(no_api_key, 401, "unauthorized"),
    Case(a_key_without_tokens_read, 403, "forbidden"),
    Case(an_unknown_seller, 404, "seller_not_found"),
    Case(a_seller_to_relink_whose_token_expired, 409, "relink_required"),
    Case(a_min_ttl_beyond_the_maximum, 422, "invalid_request"),
    Case(
        a_key_past_its_rate_limit,
        429,
        "rate_limited",
        retry_after=True,
        settings={"broker_rate_limit_per_key_per_second": 1},
    ),
    Case(mercado_pago_down_with_the_token_expiring, 503, "upstream_unavailable", retry_after=True),
]
# Refused by the request limits in front of both paths, before either runs.
ANSWERED_IN_FRONT = {400, 413, 414, 431}
COMPARED_HEADERS = ("content-type", "cache-control", "pragma", "broker-token-warning")


@pytest.mark.parametrize(
    ("case", "settings_overrides"),
    [pytest.param(c, c.settings, id=f"{c.status}-{c.prepare.__name__}") for c in CASES],
)
async def test_the_fast_path_and_the_route_give_the_same_answer(
    case: Case,
    broker: Broker,
    simulator: Simulator,
    sql: asyncpg.Connection,
    database_url: str,
    clock: FakeClock,
) -> None:
    ask = await case.prepare(Setup(broker, simulator, sql, database_url, clock))
    replies: list[httpx.Response] = []
    for extra, headers in (({}, ask.headers), ({"x": "1"}, ask.routed_headers or ask.headers)):
        params = {"min_ttl": str(ask.min_ttl), **extra} if ask.min_ttl or extra else {}
        for _ in range(ask.calls):
            reply = await broker.http.get(
                f"/sellers/{ask.seller_id}/token", params=params, headers=headers
            )
        replies.append(reply)
    fast, routed = replies
    assert fast.status_code == case.status, fast.text
    assert (routed.status_code, routed.content) == (fast.status_code, fast.content)
    for header in COMPARED_HEADERS:
        assert routed.headers.get(header) == fast.headers.get(header), header
    assert fast.headers.get("broker-token-warning") == case.warning
    if case.code:
        assert fast.json()["code"] == case.code
    if case.code == "relink_required":  # callers switch on the reason, not on `detail`
        assert fast.json()["reason"] == "revoked"
    if case.retry_after:
        assert int(fast.headers["retry-after"]) >= 1
        assert int(routed.headers["retry-after"]) >= 1
    else:
        assert "retry-after" not in fast.headers


def test_the_table_covers_every_documented_answer_of_the_token_route() -> None:
    documented = create_app().openapi()["paths"]["/sellers/{seller_id}/token"]["get"]
    statuses = {int(status) for status in documented["responses"]}
    assert statuses - ANSWERED_IN_FRONT == {case.status for case in CASES}
    assert {case.warning for case in CASES} >= {None, "refresh-failing", "relink-required"}


def calls(dependant: Dependant) -> set[Any]:
    """Every dependency callable the route resolves, nested ones included."""
    found = set()
    for sub in dependant.dependencies:
        found.add(sub.call)
        found |= calls(sub)
    return found


def test_the_route_runs_no_dependency_the_fast_path_skips() -> None:
    """The fast path runs `Callers.authenticate` (through which `api_key` goes), and reads the
    callers and the serving flow from app.state as `get_callers`/`get_serving` do. A dependency
    added to the documented route (a check, a limit) would be skipped by the fast path: this
    fails."""
    route = next(
        r
        for r in routes.router.routes
        if isinstance(r, APIRoute) and r.path == routes.TOKEN_ROUTE and "GET" in (r.methods or ())
    )
    assert route.endpoint is routes.get_token
    assert calls(route.dependant) == {deps.get_serving, deps.get_callers, deps.api_key}
