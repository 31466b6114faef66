"""The broker's refusals as exceptions, one class per problem+json `code` a caller acts on.

BrokerError              status, code, detail, retry_after
├── Unauthorized         401: the API key is missing, unknown or revoked.
├── Forbidden            403 forbidden: the key lacks the scope or the seller's namespace.
├── SellerNotFound       404 seller_not_found: no such seller is linked.
├── RelinkRequired       409 relink_required: send the seller a new link (`reason` says why).
├── RateLimited          429 rate_limited: `retry_after` seconds.
├── Unavailable          503 upstream_unavailable, database_unavailable; or the broker could
│                        not be reached (status None, code broker_unreachable).
└── InvalidRequest       422 invalid_request, and any other 4xx.

Any other answer (a 500, a proxy's 502) is a plain BrokerError.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

import httpx

PROBLEM_JSON = "application/problem+json"
# Brokers older than the `reason` member only said it in `detail`.
REASON_IN_DETAIL = re.compile(r"\(reason: ([a-z_]+)\)")


class BrokerError(Exception):
    def __init__(
        self, status: int | None, code: str, detail: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.retry_after = retry_after  # seconds, from the Retry-After header


class Unauthorized(BrokerError):
    pass


class Forbidden(BrokerError):
    pass


class SellerNotFound(BrokerError):
    pass


class RelinkRequired(BrokerError):
    def __init__(self, status: int | None, code: str, detail: str, *, reason: str | None) -> None:
        super().__init__(status, code, detail)
        self.reason = reason  # rotation_lost, revoked, ...: the seller's status_reason


class RateLimited(BrokerError):
    pass


class Unavailable(BrokerError):
    pass


class InvalidRequest(BrokerError):
    pass


BY_CODE: dict[str, type[BrokerError]] = {
    "unauthorized": Unauthorized,
    "forbidden": Forbidden,
    "seller_not_found": SellerNotFound,
    "rate_limited": RateLimited,
    "upstream_unavailable": Unavailable,
    "database_unavailable": Unavailable,
    "invalid_request": InvalidRequest,
}
# An answer without a problem body (a proxy in between, say) is classed by its status alone.
BY_STATUS: dict[int, type[BrokerError]] = {
    401: Unauthorized,
    403: Forbidden,
    429: RateLimited,
    503: Unavailable,
}


def from_reply(reply: httpx.Response) -> BrokerError:
    """The exception for a broker answer that is not a success."""
    problem = _problem(reply)
    code = str(problem.get("code") or f"http_{reply.status_code}")
    detail = str(problem.get("detail") or reply.reason_phrase)
    if code == "relink_required":
        reason = problem.get("reason")
        if not isinstance(reason, str):
            found = REASON_IN_DETAIL.search(detail)
            reason = found.group(1) if found else None
        return RelinkRequired(reply.status_code, code, detail, reason=reason)
    kind = BY_CODE.get(code) or BY_STATUS.get(reply.status_code)
    if kind is None:
        kind = InvalidRequest if 400 <= reply.status_code < 500 else BrokerError
    retry_after = parse_retry_after(reply.headers.get("Retry-After"))
    return kind(reply.status_code, code, detail, retry_after=retry_after)


def unreachable(cause: BaseException | None) -> Unavailable:
    return Unavailable(None, "broker_unreachable", f"The broker cannot be reached ({cause!r}).")


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait, from either form of Retry-After (RFC 9110 §10.2.3)."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, by RFC 5322
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _problem(reply: httpx.Response) -> dict[str, object]:
    if not reply.headers.get("content-type", "").startswith(("application/json", PROBLEM_JSON)):
        return {}
    try:
        body = reply.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}
