"""The hot path's pure-ASGI handler answers exactly like the documented FastAPI route."""

from __future__ import annotations

from service.serving.fast import _token_read
from tests.support import Broker, SellerBrowser


def scope(path: str, query: bytes = b"", method: str = "GET") -> dict[str, object]:
    return {"type": "http", "method": method, "path": path, "query_string": query}


def test_only_well_formed_token_reads_take_the_fast_path() -> None:
    assert _token_read(scope("/sellers/billing/s-1/token")) == ("billing/s-1", 0)
    assert _token_read(scope("/sellers/s-1/token", b"min_ttl=600")) == ("s-1", 600)
    for odd in (
        scope("/sellers/s-1/token", method="POST"),
        scope("/sellers/s-1/token/invalid"),
        scope("/sellers/-bad/token"),
        scope("/sellers/" + "a" * 129 + "/token"),
        scope("/sellers/s-1/token", b"min_ttl=-1"),
        scope("/sellers/s-1/token", b"min_ttl=\xc2\xb2"),  # a Unicode digit
        scope("/sellers/s-1/token", b"min_ttl=1&min_ttl=2"),
        scope("/sellers/s-1/token", b"other=1"),
    ):
        assert _token_read(odd) is None, odd


async def test_the_fast_path_and_the_route_give_the_same_answers(broker: Broker) -> None:
    async with SellerBrowser() as browser:
        await browser.link(await broker.start_link("seller-1"), user_id=11)
    fast = await broker.token("seller-1")
    routed = await broker.http.get("/sellers/seller-1/token", params={"min_ttl": 0, "x": 1})
    assert (fast.status_code, fast.content) == (routed.status_code, routed.content)
    for header in ("content-type", "cache-control", "pragma"):
        assert fast.headers[header] == routed.headers[header], header

    missing_fast = await broker.token("nobody")
    missing_routed = await broker.http.get("/sellers/nobody/token", params={"x": 1})
    assert missing_fast.status_code == missing_routed.status_code == 404
    assert missing_fast.json() == missing_routed.json()

    unauthenticated = await broker.http.get(
        "/sellers/seller-1/token", headers={"Authorization": ""}
    )
    assert (unauthenticated.status_code, unauthenticated.json()["code"]) == (401, "unauthorized")
    malformed = await broker.http.get("/sellers/seller-1/token", params={"min_ttl": "soon"})
    assert (malformed.status_code, malformed.json()["code"]) == (422, "invalid_request")
    too_much = await broker.token("seller-1", min_ttl=10**9)
    assert (too_much.status_code, too_much.json()["code"]) == (422, "invalid_request")
