"""The small pages a seller's browser sees. Static text only: nothing from the request is echoed."""

from __future__ import annotations

from html import escape

from fastapi.responses import HTMLResponse, RedirectResponse

from service.linking import CallbackResult, Outcome, Refusal, with_status

# Seller-facing responses may carry a code in their URL: never leak it through a Referer, never
# render inside someone else's frame, never cache.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'none'; form-action 'none'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "Pragma": "no-cache",
}

AGAIN = "Open the link you were sent once more to try again."
ASK = "Ask the platform that sent you the link for a new one."

# result -> (HTTP status, title, what the seller should know and do)
TEXT: dict[Outcome | Refusal, tuple[int, str, str]] = {
    Outcome.LINKED: (200, "Your account is linked", "You can close this window."),
    Outcome.RELINKED: (200, "Your account is linked again", "You can close this window."),
    Outcome.EXCHANGING: (409, "Still linking", "Wait a few seconds, then reload this page."),
    Outcome.DENIED: (
        200,
        "Nothing was linked",
        "You declined access in Mercado Pago. " + AGAIN,
    ),
    Outcome.EXCHANGE_FAILED: (
        502,
        "Mercado Pago did not accept the authorization",
        "Nothing was linked. " + AGAIN,
    ),
    Outcome.UPSTREAM_UNAVAILABLE: (
        503,
        "Mercado Pago is not answering right now",
        "Nothing was linked. Wait a minute, then " + AGAIN[0].lower() + AGAIN[1:],
    ),
    Outcome.ACCOUNT_MISMATCH: (
        409,
        "This is a different Mercado Pago account",
        "This seller is already linked to another Mercado Pago account, so nothing was changed. "
        "Sign in to Mercado Pago with that account, or contact the platform.",
    ),
    Outcome.LIVE_MODE_MISMATCH: (
        409,
        "Test and live accounts do not mix",
        "This seller holds credentials of the other kind (test or live); nothing was changed. "
        "Contact the platform.",
    ),
    Refusal.LINK_NOT_FOUND: (404, "This link is not valid", ASK),
    Refusal.LINK_EXPIRED: (410, "This link has expired", ASK),
    Refusal.LINK_USED: (410, "This link was already used", ASK),
    Refusal.INVALID_CALLBACK: (400, "This page was opened without its parameters", AGAIN),
    Refusal.UNKNOWN_STATE: (400, "This sign-in is not known here", AGAIN),
    Refusal.UNBOUND_BROWSER: (
        403,
        "Please finish in the browser where you started",
        "For your safety, linking must end in the same browser that opened the link. " + AGAIN,
    ),
    Refusal.ATTEMPT_EXPIRED: (400, "This sign-in took too long", AGAIN),
}

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #f4f6f8; margin: 0; }}
main {{ max-width: 32rem; margin: 12vh auto; background: #fff; padding: 2rem 2.5rem;
        border-radius: 12px; box-shadow: 0 2px 12px rgba(0,0,0,.08); }}
h1 {{ font-size: 1.4rem; margin-top: 0; color: {color}; }}
p {{ color: #333; line-height: 1.5; }}
</style></head>
<body><main><h1>{title}</h1><p>{message}</p><p><small>Reference: {code}</small></p></main></body>
</html>
"""


def page(result: Outcome | Refusal) -> HTMLResponse:
    status, title, message = TEXT[result]
    color = "#1a7f37" if status == 200 and result in (Outcome.LINKED, Outcome.RELINKED) else "#333"
    html = PAGE.format(
        title=escape(title), message=escape(message), code=escape(result.value), color=color
    )
    return HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)


def respond(outcome: CallbackResult) -> HTMLResponse | RedirectResponse:
    """A redirect to the platform's return_url when it gave one, the broker's own page otherwise."""
    if outcome.return_url and outcome.seller_id and isinstance(outcome.result, Outcome):
        target = with_status(outcome.return_url, outcome.result.value, outcome.seller_id)
        return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    return page(outcome.result)
