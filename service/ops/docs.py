"""The API's reference: `/docs` (Swagger UI) and `/openapi.json`, open, behind an API key, or
not served at all (BROKER_DOCS).

Swagger UI's JS and CSS come from the fastapi-offline package (Swagger UI 5: the document is
OpenAPI 3.1, which Swagger UI 4 cannot render) and the broker serves them itself under
`/docs/assets`: the page loads nothing from another origin (no CDN to trust, and no request to
one that tells it who reads the docs), and its Content-Security-Policy says so.
"""

from __future__ import annotations

import hashlib
import re
from base64 import b64encode
from importlib.resources import files
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles

from service.core.config import DocsMode
from service.serving.deps import api_key

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
# Only fastapi-offline's files, not its FastAPIOffline app (always open, and ReDoc beside). The
# folder is not a documented API: StaticFiles checks it at start-up, tests/test_docs.py each file.
ASSETS = files("fastapi_offline") / "static"
SCRIPT, STYLESHEET, FAVICON = "swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"

NOSNIFF = {"X-Content-Type-Options": "nosniff"}
INLINE_SCRIPT = re.compile(rb"<script>(.*?)</script>", re.DOTALL)


class SwaggerAssets(StaticFiles):
    """Only the files the page loads (not the package's ReDoc, which no page uses)."""

    async def get_response(self, path: str, scope: Any) -> Response:
        if path not in (SCRIPT, STYLESHEET, FAVICON):
            raise HTTPException(status_code=404)
        response = await super().get_response(path, scope)
        response.headers.update(NOSNIFF)
        return response


def page(title: str) -> bytes:
    """The Swagger UI page, pointing only at the broker's own URLs."""
    response = get_swagger_ui_html(
        openapi_url=OPENAPI_URL,
        title=title,
        swagger_js_url=f"{ASSETS_URL}/{SCRIPT}",
        swagger_css_url=f"{ASSETS_URL}/{STYLESHEET}",
        swagger_favicon_url=f"{ASSETS_URL}/{FAVICON}",
        # Swagger UI would otherwise send the document to validator.swagger.io for a badge.
        swagger_ui_parameters={"validatorUrl": None},
    )
    return bytes(response.body)


def content_security_policy(html: bytes) -> str:
    """Scripts from the broker, plus the page's inline start-up script by its hash (computed
    from the page itself, so a FastAPI upgrade that changes the script cannot break it)."""
    hashes = [
        "'sha256-" + b64encode(hashlib.sha256(script).digest()).decode() + "'"
        for script in INLINE_SCRIPT.findall(html)
    ]
    return "; ".join(
        (
            "default-src 'self'",
            "script-src 'self' " + " ".join(hashes),
            # No 'unsafe-inline': Swagger UI 5 styles elements through the DOM, which CSP
            # allows, not with inline <style> (tests/test_docs.py watches it in Chromium).
            "style-src 'self'",
            "img-src 'self' data:",  # the stylesheet's icons are data: URLs
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        )
    )


def install(app: FastAPI, mode: DocsMode) -> None:
    """Add the docs routes to `app` (created with FastAPI's own docs turned off)."""
    if mode == "off":
        return  # no route: both answer 404, as any unknown path does
    guard = [Depends(api_key)] if mode == "key" else []
    html = page(app.title)
    headers = {"Content-Security-Policy": content_security_policy(html), **NOSNIFF}

    @app.get(OPENAPI_URL, include_in_schema=False, dependencies=guard)
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi(), headers=NOSNIFF)

    @app.get(DOCS_URL, include_in_schema=False, dependencies=guard)
    async def docs() -> HTMLResponse:
        return HTMLResponse(html, headers=headers)

    # Open in `key` mode too: the files are Swagger UI's, nothing of the broker's.
    app.mount(ASSETS_URL, SwaggerAssets(directory=str(ASSETS)), name="docs-assets")
