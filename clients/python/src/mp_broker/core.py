"""The client without I/O: requests, retries, replies and the cache, for both shells.

A call is a generator that yields what it needs done, an `httpx.Request` to send or a `Sleep`,
and is sent back the outcome: the response, the transport error it raised, or None after a
sleep. `BrokerClient` drives it with httpx.Client and time.sleep, `AsyncBrokerClient` with
httpx.AsyncClient and asyncio.sleep; everything they decide is here, once.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx

from mp_broker import errors, token
from mp_broker.cache import TokenCache
from mp_broker.errors import InvalidRequest
from mp_broker.retry import RETRIED_STATUSES, RetryPolicy
from mp_broker.token import Token

T = TypeVar("T")

# The broker's seller_id: `/`-separated segments of letters, digits and `. _ : @ -`, each
# starting with a letter or digit. Checked here so that no id can reach another route.
SELLER_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]*(/[A-Za-z0-9][A-Za-z0-9._:@-]*)*")
SELLER_ID_MAX = 128
# Only these errors surely left nothing at the broker; any other may have been received.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout)
DEFAULT_TIMEOUT = httpx.Timeout(5.0)


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


Step = httpx.Request | Sleep
Outcome = httpx.Response | httpx.TransportError | None
Call = Generator[Step, Outcome, T]


class Core:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        cache: TokenCache,
        retry: RetryPolicy,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base_url = httpx.URL(base_url.rstrip("/") + "/")
        self.headers = {"Authorization": f"Bearer {api_key}", "Accept": "application/json"}
        self.cache = cache
        self.retry = retry
        self.monotonic = monotonic

    def fetch_token(self, seller_id: str, min_ttl: int) -> Call[Token]:
        """Ask the broker (the cache had nothing good enough) and cache the answer."""
        request = self._request("GET", seller_id, "token", {"min_ttl": str(min_ttl)})
        reply = yield from self._exchange(request)
        if reply.status_code != 200:
            raise errors.from_reply(reply)
        fetched = token.parse(reply)
        self.cache.put(seller_id, fetched)
        return fetched

    def report_invalid(self, seller_id: str) -> Call[dict[str, Any]]:
        """Tell the broker Mercado Pago refused the seller's token; answers the seller's status.
        The cached token goes whatever the answer: it was refused."""
        request = self._request("POST", seller_id, "token/invalid")
        try:
            reply = yield from self._exchange(request)
        finally:
            self.cache.drop(seller_id)
        if reply.status_code != 200:
            raise errors.from_reply(reply)
        status: dict[str, Any] = reply.json()
        return status

    def _request(
        self, method: str, seller_id: str, tail: str, params: dict[str, str] | None = None
    ) -> httpx.Request:
        if len(seller_id) > SELLER_ID_MAX or not SELLER_ID.fullmatch(seller_id):
            raise InvalidRequest(None, "invalid_request", "seller_id is not a valid seller id.")
        # As-is, slashes too: the broker's route takes the id as a path.
        url = self.base_url.join(f"sellers/{seller_id}/{tail}")
        return httpx.Request(method, url, params=params, headers=self.headers)

    def _exchange(self, request: httpx.Request) -> Call[httpx.Response]:
        """The broker's answer to `request`, sent again only where that is safe (retry.py).
        A last retryable answer is returned for the caller to raise; a transport error that
        outlived its retries is raised as `Unavailable`."""
        policy = self.retry
        give_up_at = self.monotonic() + policy.total_seconds
        attempt = 1
        while True:
            outcome = yield request
            if isinstance(outcome, httpx.Response):
                if outcome.status_code not in RETRIED_STATUSES:
                    policy.budget.answered()
                    return outcome
                retry_after = errors.parse_retry_after(outcome.headers.get("Retry-After"))
            elif isinstance(outcome, NOT_SENT):
                retry_after = None
            else:  # sent, and maybe acted on: sending it again could act twice
                raise errors.unreachable(outcome) from outcome
            wait = policy.wait(attempt, retry_after)
            if (
                attempt >= policy.attempts
                or self.monotonic() + wait > give_up_at
                or not policy.budget.take()
            ):
                if isinstance(outcome, httpx.Response):
                    return outcome
                raise errors.unreachable(outcome) from outcome
            yield Sleep(wait)
            attempt += 1
