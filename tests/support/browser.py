"""The seller's browser, stood in for over real HTTP (cookies kept, the flow's redirects)."""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlsplit

import httpx


class SellerBrowser:
    """A browser stand-in over real HTTP: keeps cookies, follows the redirects of the flow."""

    def __init__(self) -> None:
        self.http = httpx.AsyncClient(follow_redirects=False)

    async def __aenter__(self) -> SellerBrowser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.http.aclose()

    async def open_link(self, link_url: str) -> str:
        """Open the broker link; returns Mercado Pago's authorization URL it redirected to."""
        reply = await self.http.get(link_url)
        assert reply.status_code == 302, reply.text
        return reply.headers["location"]

    async def consent(self, authorization_url: str, decision: str, user_id: int) -> str:
        """Load the consent page and submit its form; returns the callback URL."""
        page = await self.http.get(authorization_url)
        assert page.status_code == 200, page.text
        form = dict(re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', page.text))
        form |= {"decision": decision, "user_id": str(user_id)}
        action = str(page.url.join("/authorization/decision"))
        reply = await self.http.post(action, data=form)
        assert reply.status_code == 302, reply.text
        return reply.headers["location"]

    async def callback(self, callback_url: str) -> httpx.Response:
        return await self.http.get(callback_url)

    async def authorize(
        self, link_url: str, user_id: int = 241983636, decision: str = "allow"
    ) -> str:
        """Open the link and answer the consent page; returns the callback URL, not yet opened."""
        return await self.consent(await self.open_link(link_url), decision, user_id)

    async def link(
        self, link_url: str, user_id: int = 241983636, decision: str = "allow"
    ) -> httpx.Response:
        return await self.callback(await self.authorize(link_url, user_id, decision))


def query_of(url: str) -> dict[str, str]:
    return dict(parse_qsl(urlsplit(url).query))
