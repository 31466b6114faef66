"""An in-memory stand-in for Mercado Pago's OAuth server, for demos and end-to-end tests.

Never used in production. `create_simulator_app(config)` returns a FastAPI app whose
whole state lives in one `Simulator` object at `app.state.sim`.

Faithful to Mercado Pago (as the README's "The flow" and "Refresh policy" describe it):
- `GET /authorization` checks client_id, response_type, the exact redirect_uri and, for
  apps with PKCE enabled, code_challenge + method (S256, plain/Plain). A bad request
  shows an error page (400) and never redirects.
- `POST /oauth/token` takes form or JSON bodies (never the query string), answers with
  Mercado Pago's token JSON and token shapes (`APP_USR-`/`TEST-`, `TG-`), and errors as
  `{"message", "error", "status", "cause"}`. Codes live 10 minutes and are single-use;
  refresh tokens are single-use and rotate; earlier access tokens keep working until
  they expire.
- `GET /users/me` accepts a valid bearer access token.
- A few payments endpoints (`/v1/payments...`, `service/simulator/api.py`) for the proxy and
  client tests: bearer tokens checked the same way, `X-Idempotency-Key` honoured.

Simplified or chosen where Mercado Pago is silent:
- No login: the consent page asks for the simulated seller's user id instead.
- A denial comes back as RFC 6749 `error=access_denied` (Mercado Pago's is undocumented).
- Any exchange attempt burns the code, even one that fails (wrong verifier, wrong
  redirect_uri). Reusing a code fails but leaves the tokens it issued alone.
- Each code exchange starts a new grant; refresh tokens never expire on their own here
  (use `POST /_control/revoke` to kill a seller's grants).
- Sandbox (`test_token=true`) grants get `TEST-` access tokens and a `TEST-` public key.

Control API (`/_control/*`, tests only): `reset` forgets codes, grants, faults, the log,
the clock offset and any `config` change; `clock` moves time forward; `faults` replaces
the fault plan; `release` sends held replies; `revoke` unlinks a seller; `issue` seeds a
grant without the browser (with `count`, one grant per user id from `user_id` on, answered
as a list: bulk seeding for bench/); `config` with `{"expires_in": N}` (N >= 1) sets the lifetime
of tokens issued from then on by code exchanges, refreshes and `issue` (tokens already
out keep theirs); `log` (with the seller each successful request served), `api-log` (the
payments API's calls) and `grants`
(with the app holding each seller's newest live grant) observe.

Fault injection (`POST /_control/faults`) touches `/oauth/token`, and `/users/me` only
through `users_me_status` (below). A `status` fault answers without processing the
request; its body carries `error` (e.g. `invalid_client`, `invalid_grant`; it requires
`status`) or, by default, a code derived from the status (`internal_server_error`),
under `error_field`. With `omit_refresh_token` (not limited by `count`) refresh replies
carry no `refresh_token` and nothing rotates: the refresh token presented stays valid
and only a new access token is issued. With `after_rotate="drop"` the grant is processed
fully (the old refresh token is dead, the new pair exists server-side) and then the
reply is replaced by a 502 with an HTML body, as a proxy in front of Mercado Pago would
send when the upstream connection breaks. A 502 was chosen over really dropping the
connection because it behaves the same under `httpx.ASGITransport` and under uvicorn;
either way the client never sees its tokens.

With `plain_reply` token replies (exchange, refresh and `issue`) are a plain RFC 6749
server's: only access_token, token_type, expires_in, refresh_token and scope, and both
tokens opaque (no `-<user_id>` tail to find the seller by); `/users/me` still names the
seller. It is read when tokens are issued and fixes their reply's shape too, so a held
reply released under another plan still matches its tokens. With `users_me_status`
every `/users/me` answers that status and a Mercado Pago error body, whatever the token,
until the plan is replaced (`count` does not apply).
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import asdict
from http import HTTPStatus
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from service.simulator.api import api
from service.simulator.pages import consent_page, error_page
from service.simulator.state import (
    SCOPE,
    AuthorizationError,
    FaultPlan,
    GrantSummary,
    IssuedTokens,
    LogEntry,
    Simulator,
    SimulatorConfig,
    TokenError,
    wants_sandbox,
)

_AUTHORIZATION_PARAMS = (
    "client_id",
    "response_type",
    "platform_id",
    "state",
    "redirect_uri",
    "code_challenge",
    "code_challenge_method",
)
_USER_ID = re.compile(r"[0-9]{1,15}")
# RFC 6749 section 5.1's fields: all that minimal_refresh_reply and plain_reply keep.
_PLAIN_FIELDS = ("access_token", "token_type", "expires_in", "scope", "refresh_token")
_PROXY_502 = (
    "<html><head><title>502 Bad Gateway</title></head><body>"
    "<center><h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>\n"
)


def create_simulator_app(config: SimulatorConfig) -> FastAPI:
    """Build one simulator; every app gets its own, independent state."""
    app = FastAPI(title="Mercado Pago OAuth simulator", version="1")
    app.state.sim = Simulator(config)
    app.include_router(oauth)
    app.include_router(api)
    app.include_router(control)
    return app


async def _simulator(request: Request) -> Simulator:
    # async: FastAPI runs a plain `def` dependency on a worker thread, one hop per request
    # (the simulator's token endpoint spent more time handing off than working).
    sim: Simulator = request.app.state.sim
    return sim


Sim = Annotated[Simulator, Depends(_simulator)]
oauth = APIRouter()
control = APIRouter(prefix="/_control", tags=["control"])


# -- the Mercado Pago API ----------------------------------------------------------------


@oauth.get("/authorization", response_class=HTMLResponse)
async def authorization(request: Request, sim: Sim) -> HTMLResponse:
    """Show the consent page, or an error page that never redirects."""
    params = dict(request.query_params)
    try:
        auth = sim.validate_authorization(params)
    except AuthorizationError as exc:
        return HTMLResponse(error_page(str(exc)), status_code=400)
    # Only parameters that were sent are carried, so an absent state stays absent.
    hidden = {name: params[name] for name in _AUTHORIZATION_PARAMS if name in params}
    return HTMLResponse(consent_page(auth.client.display_name, auth.redirect_uri, hidden))


@oauth.post("/authorization/decision", response_class=HTMLResponse)
async def authorization_decision(request: Request, sim: Sim) -> Response:
    """Redirect back to the app with a code, or with error=access_denied."""
    try:
        params = _parse_form(await request.body())
        # The hidden fields came back from the browser: check them all again.
        auth = sim.validate_authorization(params)
    except (ValueError, AuthorizationError) as exc:
        return HTMLResponse(error_page(str(exc)), status_code=400)
    decision = params.get("decision")
    if decision == "deny":
        reply = {"error": "access_denied", "error_description": "The user denied access."}
    elif decision == "allow":
        user_id = params.get("user_id", "").strip()
        if not _USER_ID.fullmatch(user_id) or int(user_id) == 0:
            return HTMLResponse(error_page("user_id must be a positive number."), 400)
        reply = {"code": sim.create_code(auth, int(user_id))}
    else:
        return HTMLResponse(error_page("decision must be allow or deny."), status_code=400)
    if auth.state is not None:
        reply["state"] = auth.state
    return RedirectResponse(_with_query(auth.redirect_uri, reply), status_code=302)


@oauth.post("/oauth/token")
async def token(request: Request, sim: Sim) -> Response:
    """Exchange an authorization code, or rotate a refresh token."""
    body = await request.body()
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    is_json = media_type == "application/json"
    parse_error: TokenError | None = None
    try:
        params = _parse_json(body) if is_json else _parse_form(body)
    except ValueError:
        params, parse_error = {}, TokenError("invalid_request", "malformed request body")
    entry = LogEntry(
        grant_type=params.get("grant_type"),
        client_id=params.get("client_id"),
        has_code_verifier=bool(params.get("code_verifier")),
        test_token=wants_sandbox(params),
        content_type="json" if is_json else "form",
    )
    sim.log.append(entry)

    if sim.faults.latency_ms:
        await asyncio.sleep(sim.faults.latency_ms / 1000)
    plan = sim.faults
    fault_status = 429 if plan.rate_limited else plan.status
    if fault_status is not None and sim.take_fault():
        entry.outcome = f"fault:{fault_status}"
        if plan.rate_limited:
            return _error(sim, "local_rate_limited", "local_rate_limited", 429)
        code = plan.error or _status_code_name(fault_status)
        return _error(sim, code, "upstream failure", fault_status)

    try:
        if parse_error is not None:
            raise parse_error
        issued = sim.token(params)
    except TokenError as exc:
        entry.outcome = exc.code
        return _error(sim, exc.code, exc.message, exc.status)

    # The grant is already processed (rotated) at this point: what follows only decides
    # whether and when the client hears about it.
    if plan.after_rotate is not None and sim.take_fault():
        if plan.after_rotate == "drop":
            entry.outcome = "fault:drop"
            return HTMLResponse(_PROXY_502, status_code=502)
        entry.outcome = "held"
        sim.held += 1
        try:
            await sim.release_event.wait()
        finally:
            sim.held -= 1
    entry.outcome = "ok"
    entry.user_id = issued.grant.user_id
    is_refresh = params.get("grant_type") == "refresh_token"
    return JSONResponse(_token_body(sim, issued, minimal=is_refresh))


@oauth.get("/users/me")
async def users_me(request: Request, sim: Sim) -> JSONResponse:
    """Return the seller behind a bearer access token."""
    failure = sim.faults.users_me_status
    if failure is not None:
        code = _status_code_name(failure)
        body = {"message": "upstream failure", "error": code, "status": failure, "cause": []}
        return JSONResponse(body, status_code=failure)
    scheme, _, token_value = request.headers.get("authorization", "").partition(" ")
    user_id = None
    if scheme.lower() == "bearer" and token_value.strip():
        user_id = sim.user_for_access_token(token_value.strip())
    if user_id is None:
        body = {"message": "invalid_token", "error": "unauthorized", "status": 401, "cause": []}
        return JSONResponse(body, status_code=401)
    return JSONResponse(
        {
            "id": user_id,
            "nickname": f"TESTUSER{user_id}",
            "first_name": "Test",
            "last_name": "User",
            "email": f"test_user_{user_id}@testuser.com",
            "site_id": "MLA",
            "country_id": "AR",
        }
    )


def _parse_form(body: bytes) -> dict[str, str]:
    return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True))


def _parse_json(body: bytes) -> dict[str, str]:
    """Flatten a JSON object to strings, the way the form parser sees its values."""
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("the JSON body must be an object")
    params: dict[str, str] = {}
    for key, value in data.items():
        if isinstance(value, bool):
            params[key] = "true" if value else "false"
        elif isinstance(value, str | int):
            params[key] = str(value)
        elif value is not None:
            raise ValueError(f"{key} must be a string")
    return params


def _with_query(uri: str, extra: dict[str, str]) -> str:
    parts = urlsplit(uri)
    added = urlencode(extra)
    return urlunsplit(parts._replace(query=f"{parts.query}&{added}" if parts.query else added))


def _status_code_name(status: int) -> str:
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "error"


def _error(sim: Simulator, code: str, message: str, status: int) -> JSONResponse:
    body = {"message": message, sim.faults.error_field: code, "status": status, "cause": []}
    return JSONResponse(body, status_code=status)


def _token_body(sim: Simulator, issued: IssuedTokens, *, minimal: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {
        "access_token": issued.access_token,
        "token_type": sim.faults.token_type,
        "expires_in": issued.expires_in,
        "scope": SCOPE,
        "user_id": issued.grant.user_id,
        "refresh_token": issued.refresh_token,
        "public_key": issued.grant.public_key,
        "live_mode": issued.grant.live_mode,
    }
    if issued.refresh_token is None:
        del body["refresh_token"]
    if issued.plain or (minimal and sim.faults.minimal_refresh_reply):
        return {name: body[name] for name in _PLAIN_FIELDS if name in body}
    return body


# -- the control API (tests only) --------------------------------------------------------


class _Strict(BaseModel):
    # Unknown fields are refused so that a typo in a test fails instead of doing nothing.
    model_config = ConfigDict(extra="forbid")


class ClockAdvance(_Strict):
    advance_seconds: float = Field(ge=0)


class Revoke(_Strict):
    user_id: int


class Issue(_Strict):
    client_id: str
    user_id: int = Field(gt=0)
    test: bool = False
    count: int | None = Field(default=None, ge=1, le=100_000)  # user_id, user_id + 1, ...


class Config(_Strict):
    expires_in: int = Field(ge=1)


@control.post("/reset")
async def reset(sim: Sim) -> dict[str, bool]:
    """Forget codes, grants, faults, the log, the clock offset and any `config` change;
    release held replies."""
    sim.reset()
    return {"reset": True}


@control.post("/clock")
async def advance_clock(body: ClockAdvance, sim: Sim) -> dict[str, float]:
    """Move the simulator clock forward."""
    sim.clock_offset += body.advance_seconds
    return {"offset_seconds": sim.clock_offset, "now": sim.now()}


@control.post("/faults")
async def set_faults(plan: FaultPlan, sim: Sim) -> FaultPlan:
    """Replace the fault plan of /oauth/token and /users/me (omitted fields take their
    defaults)."""
    sim.set_faults(plan)
    return plan


@control.post("/config")
async def configure(body: Config, sim: Sim) -> dict[str, int]:
    """Set the lifetime (expires_in) of tokens issued from now on."""
    sim.expires_in = body.expires_in
    return {"expires_in": sim.expires_in}


@control.post("/release")
async def release(sim: Sim) -> dict[str, int]:
    """Send every reply held by after_rotate=hold."""
    return {"released": sim.release()}


@control.post("/revoke")
async def revoke(body: Revoke, sim: Sim) -> dict[str, int]:
    """Kill every grant of a seller, like unlinking the app in Mercado Pago."""
    return {"revoked_grants": sim.revoke_user(body.user_id)}


@control.get("/log")
async def request_log(sim: Sim) -> list[dict[str, Any]]:
    """Token requests received, oldest first, without any secret (user_id is not one)."""
    return [asdict(entry) for entry in sim.log]


@control.get("/api-log")
async def api_log(sim: Sim) -> list[dict[str, Any]]:
    """Payments API calls received (`/v1/...`), oldest first, without any token."""
    return [asdict(call) for call in sim.api_log]


@control.get("/grants")
async def grants(sim: Sim) -> dict[str, GrantSummary]:
    """Per seller user_id: grants, refreshes done, and the newest live grant's refresh
    token fingerprint and client_id."""
    return sim.grants_by_user()


@control.post("/issue")
async def issue(body: Issue, sim: Sim) -> JSONResponse:
    """Create a grant directly and return its token JSON, as /oauth/token would; with
    `count`, grants for `count` consecutive user ids and a list of their token JSONs."""
    if body.client_id not in sim.clients:
        return JSONResponse({"detail": "unknown client_id"}, status_code=404)
    issued = [
        sim.issue_directly(body.client_id, body.user_id + n, test=body.test)
        for n in range(body.count or 1)
    ]
    if body.count is None:
        return JSONResponse(_token_body(sim, issued[0]))
    return JSONResponse([_token_body(sim, one) for one in issued])
