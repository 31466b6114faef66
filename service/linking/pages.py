"""The small pages a seller's browser sees. Static text only: nothing from the request is echoed."""

from __future__ import annotations

from html import escape
from typing import Any

from fastapi.responses import HTMLResponse, RedirectResponse

from service.linking.flow import CallbackResult, Outcome, Refusal, with_status
from service.serving.limits import SELLER_FACING

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

_RAW_HEADERS = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]


class SellerPageHeaders:
    """Every answer on a seller-facing path carries the pages' security headers, also the ones
    no page renders: a 405, a 422 of validation, a 429 of the rate limit, a 500."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(SELLER_FACING):
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                missing = [(k, v) for k, v in _RAW_HEADERS if k not in present]
                message["headers"] = [*message.get("headers", []), *missing]
            await send(message)

        await self.app(scope, receive, with_headers)


# Per language: result -> (title, what the seller should know and do). English is the fallback.
Texts = dict[Outcome | Refusal, tuple[str, str]]

_EN_AGAIN = "Open the link you were sent once more to try again."
_EN_ASK = "Ask the platform that sent you the link for a new one."
_ES_AGAIN = "Abre otra vez el enlace que recibiste para intentarlo de nuevo."
_ES_ASK = "Pide un enlace nuevo a la plataforma que te lo envió."
_PT_AGAIN = "Abra novamente o link que você recebeu para tentar outra vez."
_PT_ASK = "Peça um novo link à plataforma que o enviou."
_REMOVE = {
    "en": " To remove access later, open Mercado Pago: Security > Connected apps.",
    "es": " Para quitar el acceso luego, en Mercado Pago: Seguridad > Aplicaciones conectadas.",
    "pt": " Para remover o acesso depois, no Mercado Pago: Segurança > Aplicativos conectados.",
}

TEXTS: dict[str, Texts] = {
    "en": {
        Outcome.LINKED: ("Your account is linked", "You can close this window." + _REMOVE["en"]),
        Outcome.RELINKED: ("Your account is linked again", "You can close this window."),
        Outcome.EXCHANGING: ("Still linking", "Wait a few seconds, then reload this page."),
        Outcome.DENIED: ("Nothing was linked", "You declined access in Mercado Pago. " + _EN_AGAIN),
        Outcome.EXCHANGE_FAILED: (
            "Mercado Pago did not accept the authorization",
            "Nothing was linked. " + _EN_AGAIN,
        ),
        Outcome.UPSTREAM_UNAVAILABLE: (
            "Mercado Pago is not answering right now",
            "Nothing was linked. Wait a minute, then open the link you were sent once more.",
        ),
        Outcome.ACCOUNT_MISMATCH: (
            "This is a different Mercado Pago account",
            "This seller is already linked to another Mercado Pago account, so nothing was "
            "changed. Sign in to Mercado Pago with that account, or contact the platform.",
        ),
        Outcome.LIVE_MODE_MISMATCH: (
            "Test and live accounts do not mix",
            "This seller holds credentials of the other kind (test or live); nothing was "
            "changed. Contact the platform.",
        ),
        Refusal.LINK_NOT_FOUND: ("This link is not valid", _EN_ASK),
        Refusal.LINK_EXPIRED: ("This link has expired", _EN_ASK),
        Refusal.LINK_USED: ("This link was already used", _EN_ASK),
        Refusal.INVALID_CALLBACK: ("This page was opened without its parameters", _EN_AGAIN),
        Refusal.UNKNOWN_STATE: ("This sign-in is not known here", _EN_AGAIN),
        Refusal.UNBOUND_BROWSER: (
            "Please finish in the browser where you started",
            "For your safety, linking must end in the same browser that opened the link. "
            + _EN_AGAIN,
        ),
        Refusal.ATTEMPT_EXPIRED: ("This sign-in took too long", _EN_AGAIN),
        Outcome.ACCOUNT_UNKNOWN: (
            "Mercado Pago did not say which account you linked",
            "Nothing was linked. " + _EN_AGAIN + " If this happens again, contact the platform.",
        ),
        Refusal.APPLICATION_MISMATCH: (
            "This seller is linked in another country",
            "This seller is already linked through another of the platform's Mercado Pago "
            "applications, so nothing was changed. Contact the platform.",
        ),
    },
    "es": {
        Outcome.LINKED: (
            "Tu cuenta quedó vinculada",
            "Ya puedes cerrar esta ventana." + _REMOVE["es"],
        ),
        Outcome.RELINKED: ("Tu cuenta quedó vinculada otra vez", "Ya puedes cerrar esta ventana."),
        Outcome.EXCHANGING: ("Seguimos vinculando", "Espera unos segundos y recarga esta página."),
        Outcome.DENIED: (
            "No se vinculó nada",
            "Rechazaste el acceso en Mercado Pago. " + _ES_AGAIN,
        ),
        Outcome.EXCHANGE_FAILED: (
            "Mercado Pago no aceptó la autorización",
            "No se vinculó nada. " + _ES_AGAIN,
        ),
        Outcome.UPSTREAM_UNAVAILABLE: (
            "Mercado Pago no responde en este momento",
            "No se vinculó nada. Espera un minuto y abre otra vez el enlace que recibiste.",
        ),
        Outcome.ACCOUNT_MISMATCH: (
            "Es otra cuenta de Mercado Pago",
            "Esta tienda ya está vinculada a otra cuenta de Mercado Pago, así que no se cambió "
            "nada. Ingresa a Mercado Pago con esa cuenta o contacta a la plataforma.",
        ),
        Outcome.LIVE_MODE_MISMATCH: (
            "Las cuentas de prueba y reales no se mezclan",
            "Esta tienda tiene credenciales del otro tipo (prueba o real); no se cambió nada. "
            "Contacta a la plataforma.",
        ),
        Refusal.LINK_NOT_FOUND: ("Este enlace no es válido", _ES_ASK),
        Refusal.LINK_EXPIRED: ("Este enlace venció", _ES_ASK),
        Refusal.LINK_USED: ("Este enlace ya se usó", _ES_ASK),
        Refusal.INVALID_CALLBACK: ("Esta página se abrió sin sus parámetros", _ES_AGAIN),
        Refusal.UNKNOWN_STATE: ("No reconocemos este inicio de sesión", _ES_AGAIN),
        Refusal.UNBOUND_BROWSER: (
            "Termina en el navegador donde empezaste",
            "Por tu seguridad, la vinculación debe terminar en el mismo navegador que abrió el "
            "enlace. " + _ES_AGAIN,
        ),
        Refusal.ATTEMPT_EXPIRED: ("Este inicio de sesión tardó demasiado", _ES_AGAIN),
        Outcome.ACCOUNT_UNKNOWN: (
            "Mercado Pago no indicó qué cuenta vinculaste",
            "No se vinculó nada. " + _ES_AGAIN + " Si vuelve a pasar, contacta a la plataforma.",
        ),
        Refusal.APPLICATION_MISMATCH: (
            "Esta tienda está vinculada en otro país",
            "Esta tienda ya está vinculada a través de otra aplicación de Mercado Pago de la "
            "plataforma, así que no se cambió nada. Contacta a la plataforma.",
        ),
    },
    "pt": {
        Outcome.LINKED: (
            "Sua conta foi vinculada",
            "Você já pode fechar esta janela." + _REMOVE["pt"],
        ),
        Outcome.RELINKED: ("Sua conta foi vinculada de novo", "Você já pode fechar esta janela."),
        Outcome.EXCHANGING: ("Ainda vinculando", "Aguarde alguns segundos e recarregue a página."),
        Outcome.DENIED: (
            "Nada foi vinculado",
            "Você recusou o acesso no Mercado Pago. " + _PT_AGAIN,
        ),
        Outcome.EXCHANGE_FAILED: (
            "O Mercado Pago não aceitou a autorização",
            "Nada foi vinculado. " + _PT_AGAIN,
        ),
        Outcome.UPSTREAM_UNAVAILABLE: (
            "O Mercado Pago não está respondendo agora",
            "Nada foi vinculado. Aguarde um minuto e abra novamente o link que você recebeu.",
        ),
        Outcome.ACCOUNT_MISMATCH: (
            "Esta é outra conta do Mercado Pago",
            "Esta loja já está vinculada a outra conta do Mercado Pago, então nada foi alterado. "
            "Entre no Mercado Pago com essa conta ou fale com a plataforma.",
        ),
        Outcome.LIVE_MODE_MISMATCH: (
            "Contas de teste e reais não se misturam",
            "Esta loja tem credenciais do outro tipo (teste ou real); nada foi alterado. "
            "Fale com a plataforma.",
        ),
        Refusal.LINK_NOT_FOUND: ("Este link não é válido", _PT_ASK),
        Refusal.LINK_EXPIRED: ("Este link expirou", _PT_ASK),
        Refusal.LINK_USED: ("Este link já foi usado", _PT_ASK),
        Refusal.INVALID_CALLBACK: ("Esta página foi aberta sem os parâmetros", _PT_AGAIN),
        Refusal.UNKNOWN_STATE: ("Não reconhecemos este acesso", _PT_AGAIN),
        Refusal.UNBOUND_BROWSER: (
            "Conclua no navegador onde você começou",
            "Para sua segurança, a vinculação deve terminar no mesmo navegador que abriu o link. "
            + _PT_AGAIN,
        ),
        Refusal.ATTEMPT_EXPIRED: ("Este acesso demorou demais", _PT_AGAIN),
        Outcome.ACCOUNT_UNKNOWN: (
            "O Mercado Pago não informou qual conta foi vinculada",
            "Nada foi vinculado. " + _PT_AGAIN + " Se acontecer de novo, fale com a plataforma.",
        ),
        Refusal.APPLICATION_MISMATCH: (
            "Esta loja está vinculada em outro país",
            "Esta loja já está vinculada por outro aplicativo do Mercado Pago da plataforma, "
            "então nada foi alterado. Fale com a plataforma.",
        ),
    },
}

# result -> HTTP status, the same in every language
STATUS: dict[Outcome | Refusal, int] = {
    Outcome.LINKED: 200,
    Outcome.RELINKED: 200,
    Outcome.EXCHANGING: 409,
    Outcome.DENIED: 200,
    Outcome.EXCHANGE_FAILED: 502,
    Outcome.UPSTREAM_UNAVAILABLE: 503,
    Outcome.ACCOUNT_MISMATCH: 409,
    Outcome.LIVE_MODE_MISMATCH: 409,
    Refusal.LINK_NOT_FOUND: 404,
    Refusal.LINK_EXPIRED: 410,
    Refusal.LINK_USED: 410,
    Refusal.INVALID_CALLBACK: 400,
    Refusal.UNKNOWN_STATE: 400,
    Refusal.UNBOUND_BROWSER: 403,
    Refusal.ATTEMPT_EXPIRED: 400,
    Outcome.ACCOUNT_UNKNOWN: 502,
    Refusal.APPLICATION_MISMATCH: 409,
}


def language(accept_language: str | None) -> str:
    """The best of en/es/pt for an Accept-Language header (q-values honoured), else English."""
    best, best_q = "en", 0.0
    for part in (accept_language or "")[:512].split(","):
        tag, _, params = part.strip().partition(";")
        try:
            q = float(params.strip()[2:]) if params.strip().startswith("q=") else 1.0
        except ValueError:
            continue
        primary = tag.strip().lower().split("-")[0]
        if primary in TEXTS and q > best_q:
            best, best_q = primary, q
    return best


PAGE = """<!doctype html>
<html lang="{lang}"><head><meta charset="utf-8">
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


def page(result: Outcome | Refusal, lang: str = "en") -> HTMLResponse:
    status = STATUS[result]
    title, message = TEXTS.get(lang, TEXTS["en"])[result]
    color = "#1a7f37" if result in (Outcome.LINKED, Outcome.RELINKED) else "#333"
    html = PAGE.format(
        lang=lang,
        title=escape(title),
        message=escape(message),
        code=escape(result.value),
        color=color,
    )
    headers = SECURITY_HEADERS | {"Content-Language": lang, "Vary": "Accept-Language"}
    return HTMLResponse(html, status_code=status, headers=headers)


def respond(outcome: CallbackResult, lang: str = "en") -> HTMLResponse | RedirectResponse:
    """A redirect to the platform's return_url when it gave one, the broker's own page otherwise."""
    if outcome.return_url and outcome.seller_id and isinstance(outcome.result, Outcome):
        target = with_status(outcome.return_url, outcome.result.value, outcome.seller_id)
        return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)
    return page(outcome.result, lang)
