"""/docs and /openapi.json: Swagger UI served by the broker itself under a strict CSP, and open,
behind an API key, or off (BROKER_DOCS). Chromium renders the page in tests/test_browser.py."""

from __future__ import annotations

import hashlib
from base64 import b64encode
from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urlsplit

import httpx
import pytest
from pydantic import ValidationError

from service.core.config import Settings
from tests.support import Broker, assert_problem

UNKNOWN_KEY = "Bearer mpb_00000000_" + "A" * 43  # well formed, never issued


@dataclass
class DocsPage:
    urls: list[str] = field(default_factory=list)  # every src and href, as written
    inline_scripts: list[str] = field(default_factory=list)


class _Reader(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.page = DocsPage()
        self.in_inline_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        self.page.urls += [url for name, url in named.items() if name in ("src", "href") and url]
        if tag == "script" and "src" not in named:
            self.in_inline_script = True
            self.page.inline_scripts.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.in_inline_script = False

    def handle_data(self, data: str) -> None:
        if self.in_inline_script:  # a script's text comes raw, exactly as the page holds it
            self.page.inline_scripts[-1] += data


def read(html: str) -> DocsPage:
    reader = _Reader()
    reader.feed(html)
    reader.close()
    return reader.page


def directives(policy: str) -> dict[str, list[str]]:
    parsed = (part.split() for part in policy.split(";") if part.strip())
    return {name: sources for name, *sources in parsed}


async def test_the_docs_page_names_only_the_brokers_own_files(broker: Broker) -> None:
    reply = await broker.http.get("/docs")
    assert reply.status_code == 200
    page = read(reply.text)
    assert len(page.urls) >= 3  # the script, the stylesheet, the icon
    for url in page.urls:
        parts = urlsplit(url)
        assert (parts.scheme, parts.netloc) == ("", ""), f"{url} is on another origin"
        assert url.startswith("/docs/assets/")


async def test_each_file_the_docs_page_names_is_served_by_the_broker(broker: Broker) -> None:
    page = read((await broker.http.get("/docs")).text)
    assert all(not urlsplit(url).netloc for url in page.urls), page.urls  # never fetch outside
    for url in page.urls:
        reply = await broker.http.get(url)
        assert reply.status_code == 200, url
        assert reply.headers["x-content-type-options"] == "nosniff"
    script = next(url for url in page.urls if url.endswith(".js"))
    reply = await broker.http.get(script)
    assert reply.headers["content-type"].startswith("text/javascript")
    assert "SwaggerUIBundle" in reply.text
    # Only what the page loads: not the package's other files.
    assert_problem(await broker.http.get("/docs/assets/redoc.standalone.js"), 404, "not_found")


async def test_the_docs_policy_allows_only_the_brokers_scripts_and_the_pages_own_by_hash(
    broker: Broker,
) -> None:
    reply = await broker.http.get("/docs")
    assert reply.headers["x-content-type-options"] == "nosniff"
    policy = directives(reply.headers["content-security-policy"])
    [inline] = read(reply.text).inline_scripts
    digest = b64encode(hashlib.sha256(inline.encode()).digest()).decode()
    assert policy["script-src"] == ["'self'", f"'sha256-{digest}'"]
    assert policy["default-src"] == ["'self'"]
    assert policy["img-src"] == ["'self'", "data:"]
    assert policy["frame-ancestors"] == ["'none'"]
    assert not {"'unsafe-inline'", "'unsafe-eval'"} & {s for v in policy.values() for s in v}


async def test_by_default_the_docs_need_no_key_and_redoc_is_not_served(broker: Broker) -> None:
    async with httpx.AsyncClient(base_url=broker.url) as anonymous:
        assert (await anonymous.get("/docs")).status_code == 200
        reply = await anonymous.get("/openapi.json")
        assert reply.status_code == 200
        assert reply.json() == broker.app.openapi()
        # FastAPI's ReDoc page loads its script from a CDN: there is none.
        assert_problem(await anonymous.get("/redoc"), 404, "not_found")


@pytest.mark.parametrize("settings_overrides", [{"broker_docs": "key"}])
async def test_key_mode_refuses_the_docs_without_a_valid_key_and_serves_them_with_one(
    broker: Broker,
) -> None:
    async with (
        httpx.AsyncClient(base_url=broker.url) as anonymous,
        httpx.AsyncClient(base_url=broker.url, headers={"Authorization": UNKNOWN_KEY}) as forged,
    ):
        for path in ("/docs", "/openapi.json"):
            assert_problem(await anonymous.get(path), 401, "unauthorized")
            assert_problem(await forged.get(path), 401, "unauthorized")
            assert (await broker.http.get(path)).status_code == 200, path


@pytest.mark.parametrize("settings_overrides", [{"broker_docs": "off"}])
async def test_off_mode_answers_the_docs_as_an_unknown_path(broker: Broker) -> None:
    unknown = (await broker.http.get("/no-such-page")).json()
    for path in ("/docs", "/openapi.json", "/docs/assets/swagger-ui-bundle.js"):
        reply = await broker.http.get(path)  # even with a valid key
        assert_problem(reply, 404, "not_found")
        assert reply.json() == unknown


def test_an_unknown_docs_mode_is_refused_at_start_up() -> None:
    with pytest.raises(ValidationError, match="broker_docs"):
        Settings(_env_file=None, broker_docs="private")
