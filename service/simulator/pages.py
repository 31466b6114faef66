"""The simulator's two HTML pages: the consent screen and the error screen.

Every value that reaches the markup goes through `_e` (HTML escaping, quotes included),
because query parameters are attacker-controlled even on a fake login page.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape

from service.simulator.state import DEFAULT_USER_ID

_STYLE = """
body{margin:0;min-height:100vh;display:flex;align-items:center;justify-content:center;
 background:#eef1f5;color:#1f2933;
 font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
.card{background:#fff;max-width:26rem;width:100%;margin:1rem;padding:2rem;border-radius:12px;
 box-shadow:0 4px 24px rgba(0,0,0,.08)}
.brand{margin:0 0 1.5rem;font-weight:700;color:#009ee3}
.brand span{font-weight:400;color:#7b8794;font-size:.85rem}
h1{font-size:1.25rem;margin:0 0 1rem}
ul{padding-left:1.2rem;color:#52606d}
label{display:block;font-size:.85rem;color:#52606d;margin:1.25rem 0 .25rem}
input[type=text]{box-sizing:border-box;width:100%;padding:.6rem;border:1px solid #cbd2d9;
 border-radius:6px;font:inherit}
.actions{display:flex;gap:.75rem;margin-top:1.5rem}
button{flex:1;padding:.7rem;border-radius:6px;font:inherit;font-weight:600;cursor:pointer;
 border:1px solid #009ee3}
.allow{background:#009ee3;color:#fff}
.deny{background:#fff;color:#009ee3}
.note{font-size:.8rem;color:#7b8794;margin-top:1.5rem;word-break:break-all}
.error h1{color:#c62828}
"""


def _e(value: str) -> str:
    return escape(value, quote=True)


def _page(title: str, body: str, extra_class: str = "") -> str:
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>"
        f'<body><main class="card {extra_class}">'
        '<p class="brand">mercado pago <span>(simulator)</span></p>'
        f"{body}</main></body></html>\n"
    )


def consent_page(app_name: str, redirect_uri: str, hidden: Mapping[str, str]) -> str:
    """The login-free consent screen; `hidden` carries the request to the decision POST."""
    inputs = "".join(
        f'<input type="hidden" name="{_e(name)}" value="{_e(value)}">'
        for name, value in hidden.items()
    )
    title = f"{app_name} wants to access your Mercado Pago account"
    body = (
        f"<h1>{_e(title)}</h1>"
        "<p>It will be able to:</p>"
        "<ul><li>read your account data</li><li>act on your behalf (payments, sales)</li>"
        "<li>keep access while you are away (offline_access)</li></ul>"
        '<form method="post" action="/authorization/decision">'
        f"{inputs}"
        '<label for="user_id">Simulated Mercado Pago user id</label>'
        f'<input type="text" id="user_id" name="user_id" value="{DEFAULT_USER_ID}"'
        ' inputmode="numeric" pattern="[0-9]+" required>'
        # "allow" comes first so that pressing Enter in the text field allows.
        '<div class="actions">'
        '<button type="submit" class="allow" name="decision" value="allow">Allow</button>'
        '<button type="submit" class="deny" name="decision" value="deny">Deny</button>'
        "</div></form>"
        f'<p class="note">You will be sent back to {_e(redirect_uri)}</p>'
    )
    return _page(title, body)


def error_page(message: str) -> str:
    body = (
        "<h1>Something went wrong</h1>"
        f"<p>{_e(message)}</p>"
        "<p>Ask the application's developer to check its configuration.</p>"
    )
    return _page("Error - Mercado Pago", body, extra_class="error")
