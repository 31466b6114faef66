"""The few Mercado Pago API endpoints the proxy and client tests call: payments.

Every call needs a bearer access token the simulator issued and still honours (401 in Mercado
Pago's error shape otherwise, as for a revoked grant), and acts for that token's seller only:
a payment of another seller is a 404. `POST /v1/payments` needs `X-Idempotency-Key`, as Mercado
Pago's does: the same key again (same seller) answers the payment it created, creating none.
Every call, matched or not, is logged in `sim.api_log` (method, path, status, seller, key),
which `GET /_control/api-log` shows; fault plans may delay (`api_latency_ms`) or fail
(`api_status`) them all.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from service.simulator.state import ApiCall, Simulator

api = APIRouter(prefix="/v1")
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
PAYMENT_FIELDS = ("transaction_amount", "description", "payment_method_id", "external_reference")
BEARER = re.compile(r"bearer\s+(\S+)", re.IGNORECASE)


async def _simulator(request: Request) -> Simulator:
    sim: Simulator = request.app.state.sim
    return sim


Sim = Annotated[Simulator, Depends(_simulator)]


def error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(
        {"message": message, "error": code, "status": status, "cause": []}, status_code=status
    )


async def _gate(request: Request, sim: Simulator) -> tuple[ApiCall, int | Response]:
    """Log the call and, after the planned delay, find its seller: the user id of a valid
    bearer token, or the refusal already answered (a planned failure, a 401)."""
    match = BEARER.fullmatch(request.headers.get("authorization", "").strip())
    user_id = sim.user_for_access_token(match.group(1)) if match else None
    call = ApiCall(
        request.method,
        request.url.path,
        0,
        user_id,
        request.headers.get("x-idempotency-key"),
        sorted(request.headers.keys()),
    )
    sim.api_log.append(call)
    if sim.faults.api_latency_ms:
        await asyncio.sleep(sim.faults.api_latency_ms / 1000)
    if (status := sim.faults.api_status) is not None:
        code = "internal_error" if status >= 500 else "bad_request"
        return call, _answer(call, error(status, code, "failure"))
    if user_id is None:
        return call, _answer(call, error(401, "unauthorized", "invalid access token"))
    return call, user_id


def _answer(call: ApiCall, reply: Response) -> Response:
    call.status = reply.status_code
    return reply


@api.get("/payments/search")
async def search_payments(request: Request, sim: Sim) -> Response:
    """The seller's payments, newest first (`limit`, `offset`, `status` filter)."""
    call, user_id = await _gate(request, sim)
    if isinstance(user_id, Response):
        return user_id
    query = request.query_params
    try:
        limit, offset = int(query.get("limit", "30")), int(query.get("offset", "0"))
    except ValueError:
        return _answer(call, error(400, "bad_request", "limit and offset are numbers"))
    mine = [p for p in reversed(sim.payments.values()) if p["collector_id"] == user_id]
    if status := query.get("status"):
        mine = [p for p in mine if p["status"] == status]
    body = {
        "paging": {"total": len(mine), "limit": limit, "offset": offset},
        "results": mine[offset : offset + limit],
    }
    return _answer(call, JSONResponse(body))


@api.post("/payments")
async def create_payment(request: Request, sim: Sim) -> Response:
    """Create an approved payment for the token's seller, once per X-Idempotency-Key."""
    call, user_id = await _gate(request, sim)
    if isinstance(user_id, Response):
        return user_id
    if not call.idempotency_key:
        return _answer(call, error(400, "bad_request", "Header X-Idempotency-Key can't be null"))
    known = sim.idempotent.get((user_id, call.idempotency_key))
    if known is not None:
        return _answer(call, JSONResponse(sim.payments[known], status_code=201))
    try:
        body = json.loads(await request.body())
        amount = float(body["transaction_amount"])
    except (ValueError, KeyError, TypeError):
        return _answer(call, error(400, "bad_request", "transaction_amount is required"))
    if amount <= 0:
        return _answer(call, error(400, "bad_request", "transaction_amount must be positive"))
    payment_id = 1_000_000_000 + len(sim.payments) + 1
    payment: dict[str, Any] = {name: body.get(name) for name in PAYMENT_FIELDS}
    payment |= {
        "id": payment_id,
        "status": "approved",
        "collector_id": user_id,
        "transaction_amount": amount,
    }
    sim.payments[payment_id] = payment
    sim.idempotent[(user_id, call.idempotency_key)] = payment_id
    return _answer(call, JSONResponse(payment, status_code=201))


async def _payment(
    request: Request, sim: Simulator, payment_id: str
) -> tuple[ApiCall, dict[str, Any] | Response]:
    """The token's seller's payment `payment_id`, or the refusal already answered (a 404 for
    one of another seller, as for none)."""
    call, user_id = await _gate(request, sim)
    if isinstance(user_id, Response):
        return call, user_id
    payment = sim.payments.get(int(payment_id)) if payment_id.isdigit() else None
    if payment is None or payment["collector_id"] != user_id:
        return call, _answer(call, error(404, "not_found", "Payment not found"))
    return call, payment


@api.get("/payments/{payment_id}")
async def get_payment(payment_id: str, request: Request, sim: Sim) -> Response:
    """One of the seller's payments."""
    call, payment = await _payment(request, sim, payment_id)
    if isinstance(payment, Response):
        return payment
    return _answer(call, JSONResponse(payment))


@api.put("/payments/{payment_id}")
async def update_payment(payment_id: str, request: Request, sim: Sim) -> Response:
    """Cancel one of the seller's payments (`{"status": "cancelled"}`)."""
    call, payment = await _payment(request, sim, payment_id)
    if isinstance(payment, Response):
        return payment
    try:
        wanted = json.loads(await request.body()).get("status")
    except (ValueError, AttributeError):
        wanted = None
    if wanted != "cancelled":
        return _answer(call, error(400, "bad_request", "only status=cancelled is supported"))
    payment["status"] = "cancelled"
    return _answer(call, JSONResponse(payment))


@api.api_route("/{rest:path}", methods=METHODS)
async def anything_else(request: Request, sim: Sim) -> Response:
    """Any other `/v1` call: logged (with its method), then Mercado Pago's 404."""
    call, user_id = await _gate(request, sim)
    if isinstance(user_id, Response):
        return user_id
    return _answer(call, error(404, "not_found", "resource not found"))
