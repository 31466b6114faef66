"""The refresh engine: exactly one refresh per rotation, whoever asks and on any replica.

Mercado Pago refresh tokens are single-use, so every refresh follows the same steps, whether
the background loop or a token read (`min_ttl`) started it:

1. Claim: one conditional UPDATE takes the seller's lease (owner + expiry). Inside a process a
   single-flight map joins callers for the same seller on top of that.
2. Record the attempt (fingerprint of the refresh token, `sent_at`) and commit, then send one
   POST under a deadline shorter than the lease. Never retried at the HTTP layer; only a
   request that surely did not leave (connection refused, 429) is sent again at once.
3. Store at once, guarded by the rotation `version` read at claim time (not by the lease), and
   retried until it lands: a late success always wins, even over a `relink_required` set
   meanwhile (that is a `recovered`).
4. `invalid_grant`: if `version` moved it was a race; otherwise `relink_required`, reason
   `rotation_lost` when the previous attempt with this same token had an unknown outcome, else
   `revoked`.
5. Application-wide errors, and bursts of `invalid_grant`, trip the breaker (`breaker.py`).
6. Transient errors: release the lease, back off `next_refresh_at`.

Every refresh runs as a task of the process: a caller that disconnects or times out cannot
cancel it between Mercado Pago's reply and the write; shutdown waits for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import asyncpg
from sqlalchemy import or_, update
from sqlalchemy.exc import DBAPIError

from service.core import db, logs, metrics
from service.core.config import LEASE_MARGIN_SECONDS
from service.core.crypto import context
from service.core.db import BROKEN_CONNECTION, transaction
from service.core.mercadopago import (
    ApplicationError,
    MercadoPagoError,
    PermanentGrantError,
    TokenSet,
    TransientUpstreamError,
)
from service.core.models import Seller
from service.core.runtime import Runtime
from service.lifecycle import audit, events
from service.refresh import breaker, policy

log = logging.getLogger("broker.refresh")

NOT_SENT_RETRIES = 2  # extra sends when the request surely never reached Mercado Pago
PRUNE_EVERY_SECONDS = 3600
EXPIRING_EVERY_SECONDS = 300  # how often to look for tokens that will lapse unrefreshed
GATE_CLEAR_SECONDS = 1.0


# The statements every refresh of a wave runs, as plain SQL on the direct asyncpg pool
# (service/core/db.py): SQLAlchemy's statement building and execution cost more CPU than
# PostgreSQL spends on them. Parameters: $1 owner, $2 lease_until, $3 now, $4 client_id,
# $5 the late-reply grace in seconds (see FREE).
#
# FREE: whether nobody may be refreshing the seller. A lease that lapsed over an attempt
# still marked 'sent' (its owner never said how it ended: it may be paused, its clock may lag,
# or it died) stays taken for one grace more. The request's own deadline is shorter than a
# lease, so by then any reply to it has landed or been dropped, and re-sending that refresh
# token cannot burn a pair that is still on its way to be stored.
FREE = """(lease_until IS NULL OR lease_until < {now}::timestamptz
    - CASE WHEN attempt_outcome = 'sent' THEN make_interval(secs => {grace}) ELSE '0' END)"""
FREE_CLAIM = FREE.format(now="$3", grace="$5")
_CLAIM = """
UPDATE sellers SET lease_owner = $1, lease_until = $2,
    -- If this owner dies, the background refresher retries as soon as the seller is free
    -- again (an on-read claim may be of a seller not due for days).
    next_refresh_at = least(coalesce(next_refresh_at, $2), $2 + make_interval(secs => $5))
WHERE {where}
RETURNING seller_id, client_id, version, refresh_token, attempt_fingerprint, attempt_outcome
"""
# The due-work query ($6: how many): the oldest due sellers on the partial index. SKIP LOCKED:
# concurrent refreshers each take different due rows and never wait on one another.
_DUE = """seller_id IN (
    SELECT seller_id FROM sellers
    WHERE status = 'linked' AND next_refresh_at <= $3 AND client_id = $4 AND {free}
        AND NOT EXISTS (SELECT FROM app_breakers WHERE client_id = $4 AND probe_after > $3)
        AND NOT EXISTS (SELECT FROM refresh_pause)  -- `broker refresher pause`
    ORDER BY next_refresh_at
    LIMIT $6
    FOR UPDATE SKIP LOCKED)"""
CLAIM_DUE = _CLAIM.format(where=_DUE.format(free=FREE_CLAIM))
# One seller ($6), on demand; $7, when set: at most one on-read refresh per cooldown window.
_ONE = """seller_id = $6 AND status = 'linked' AND client_id = $4 AND {free}
    AND ($7::timestamptz IS NULL OR attempt_sent_at IS NULL OR attempt_sent_at < $7)"""
CLAIM_ONE = _CLAIM.format(where=_ONE.format(free=FREE_CLAIM))
# After a failed claim: false when someone holds the seller (NULL: no such seller).
_IS_FREE = "SELECT {free} FROM sellers WHERE seller_id = $1"
IS_FREE = _IS_FREE.format(free=FREE.format(now="$2", grace="$3"))
# Each claimed seller's attempt, written in the claim's transaction (one executemany).
RECORD_ATTEMPT = """
UPDATE sellers SET attempt_fingerprint = $2, attempt_sent_at = $3, attempt_outcome = 'sent'
WHERE seller_id = $1
"""
# The common store in one statement (one round trip, atomic): the pair, WHERE still at the
# claimed version ($2), linked and not failing, and its audit row. $10 is now.
STORE_HEALTHY = """
WITH stored AS (
    UPDATE sellers SET
        access_token = $3, refresh_token = coalesce($4, refresh_token),
        expires_at = $5, next_refresh_at = $6,
        scope = coalesce($7, scope), public_key = coalesce($8, public_key),
        live_mode = coalesce($9, live_mode),
        last_refreshed_at = $10, updated_at = $10, last_refresh_error = NULL,
        attempt_outcome = 'ok', lease_owner = NULL, lease_until = NULL, version = $2 + 1
    WHERE seller_id = $1 AND version = $2 AND status = 'linked' AND refresh_failures = 0
    RETURNING seller_id
)
INSERT INTO audit_events (at, actor, action, seller_id)
SELECT $10::timestamptz, 'system', 'seller.refreshed', seller_id FROM stored
RETURNING seller_id
"""


class Outcome(StrEnum):
    REFRESHED = "refreshed"
    RECOVERED = "recovered"  # a late success over a relink_required set meanwhile
    RACED = "raced"  # someone else rotated first; nothing to do
    BUSY = "busy"  # another process holds the lease
    SKIPPED = "skipped"  # not linked, not due, in cooldown, or another application's seller
    PAUSED = "paused"  # the application's breaker is open
    RELINK_REQUIRED = "relink_required"
    TRANSIENT = "transient"
    APPLICATION_ERROR = "application_error"


@dataclass(frozen=True)
class Claim:
    seller_id: str
    client_id: str
    version: int
    refresh_token: str
    lease_until: datetime
    previous_unknown: bool  # the last attempt used this same token and its outcome is unknown


def fingerprint(refresh_token: str) -> str:
    return hashlib.sha256(refresh_token.encode()).hexdigest()[:16]


def _event(name: str, level: int = logging.INFO, **fields: object) -> None:
    logs.event(log, name, fields, level)


class RateLimiter:
    """A token bucket: at most `rate` sends per second from this process, bursts of one second."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.updated = asyncio.get_running_loop().time()
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        async with self.lock:
            loop = asyncio.get_running_loop()
            now = loop.time()
            self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            if self.tokens < 1:
                await asyncio.sleep((1 - self.tokens) / self.rate)
                self.updated = loop.time()
                self.tokens = 1
            self.tokens -= 1


class Refresher:
    """One per process: refreshes on demand (`refresh`) and in the background (`run`)."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.settings = rt.settings
        self.owner = f"{socket.gethostname()[:32]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.inflight: dict[str, asyncio.Task[Outcome]] = {}
        self.joined = 0  # callers that joined a refresh already in flight (single-flight)
        self.clear_until = 0.0  # no breaker or pause seen until then (loop time)
        self.gate_check: asyncio.Task[breaker.Gate] | None = None  # one check at a time
        self.rate = RateLimiter(self.settings.broker_refresh_rate_per_second)
        # One lease: longer than any request's deadline (settings refuse less), see FREE.
        self.late_reply_grace = float(self.settings.broker_lease_seconds)
        self.burst = breaker.Burst(
            self.settings.broker_breaker_invalid_grant_threshold,
            self.settings.broker_breaker_window_seconds,
        )

    # -- entry points ----------------------------------------------------------------------

    async def refresh(self, seller_id: str, *, on_read: bool = False) -> Outcome:
        """Refresh one seller now, joining a refresh of it already in flight in this process."""
        task = self.inflight.get(seller_id)
        if task is None:
            task = self._start(seller_id, self._claim_one(seller_id, on_read))
        else:
            self.joined += 1
        return await asyncio.shield(task)

    async def run(self, stop: asyncio.Event) -> None:
        """The background loop: claim due sellers into free slots until `stop` is set."""
        active: set[asyncio.Task[Outcome]] = set()
        cap = self.settings.broker_refresh_concurrency
        _event("refresher.started", owner=self.owner, concurrency=cap)
        next_prune = next_expiring = 0.0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            if loop.time() >= next_prune:  # retention, hourly, from whichever refresher runs
                next_prune = loop.time() + PRUNE_EVERY_SECONDS
                await self._prune()
            if loop.time() >= next_expiring:
                next_expiring = loop.time() + EXPIRING_EVERY_SECONDS
                await self._notify_expiring()
            free = cap - len(active)
            claims: Sequence[Claim] = []
            if free > 0:
                try:
                    claims = await self._claim_due(
                        min(free, self.settings.broker_refresh_batch_size)
                    )
                except Exception as exc:  # the loop must outlive a database blip or a bad row
                    _event("refresher.claim_failed", logging.ERROR, error=type(exc).__name__)
            for claim in claims:
                if claim.seller_id in self.inflight:
                    continue  # already being refreshed here (its lease had lapsed)
                task = self._start(claim.seller_id, self._refresh_claimed(claim))
                active.add(task)
                task.add_done_callback(active.discard)
            if claims and len(claims) == free:
                # Full batch: more may be due. Claim again as soon as a slot frees up. (Waiting
                # a moment more to claim several rows at once cost more in idle slots than it
                # saved in transactions: measured in the wave benchmark, 449/s against 491/s.)
                # Slots that free up during a claim are filled by the next one, so batches
                # grow by themselves with the rate.
                await asyncio.wait(active, return_when=asyncio.FIRST_COMPLETED)
                continue
            waits: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait())}
            try:
                await asyncio.wait(
                    waits | active,
                    timeout=self.settings.broker_refresh_poll_seconds,
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for waiter in waits:
                    waiter.cancel()
        _event("refresher.stopping", owner=self.owner, in_flight=len(active))

    async def release_leases(self) -> int:
        """At shutdown, after in-flight refreshes had their grace: give back every lease whose
        request was surely not sent, so a replacement process claims those sellers at once.
        A lease whose request may be at Mercado Pago stays until it lapses and the late-reply
        grace after it has run (its outcome is unknown: the next attempt will tell)."""
        try:
            async with transaction(self.rt.sessions) as session:
                released = await session.execute(
                    update(Seller)
                    .where(
                        Seller.lease_owner == self.owner,
                        or_(Seller.attempt_outcome.is_(None), Seller.attempt_outcome != "sent"),
                    )
                    .values(lease_owner=None, lease_until=None)
                )
        except Exception as exc:  # shutting down anyway; the leases lapse by themselves
            _event("refresher.release_failed", logging.ERROR, error=type(exc).__name__)
            return 0
        count = int(released.rowcount)  # type: ignore[attr-defined]
        if count:
            _event("refresher.leases_released", logging.WARNING, leases=count)
        return count

    async def _prune(self) -> None:
        try:
            events, attempts = await audit.prune(
                self.rt.sessions,
                self.rt.clock(),
                self.settings.broker_audit_retention_days,
                self.settings.broker_attempt_retention_days,
            )
        except Exception as exc:
            _event("retention.failed", logging.ERROR, error=type(exc).__name__)
            return
        if events or attempts:
            _event("retention.pruned", audit_events=events, link_attempts=attempts)

    async def _notify_expiring(self) -> None:
        try:
            sent = await events.notify_expiring(self.rt.sessions, self.settings, self.rt.clock())
        except Exception as exc:
            _event("expiring.scan_failed", logging.ERROR, error=type(exc).__name__)
            return
        if sent:
            _event("expiring.notified", logging.WARNING, sellers=sent)

    def _start(self, seller_id: str, work: Any) -> asyncio.Task[Outcome]:
        task: asyncio.Task[Outcome] = self.rt.spawn(work)
        self.inflight[seller_id] = task

        def done(task: asyncio.Task[Outcome]) -> None:
            self.inflight.pop(seller_id, None)
            if not task.cancelled() and (exc := task.exception()) is not None:
                # The lease lapses by itself; say what broke (the type only: no secrets).
                _event(
                    "refresh.crashed", logging.ERROR, seller_id=seller_id, error=type(exc).__name__
                )

        task.add_done_callback(done)
        return task

    # -- 1. claim ----------------------------------------------------------------------------

    async def _claim_one(self, seller_id: str, on_read: bool) -> Outcome:
        now = self.rt.clock()
        # At most one on-read refresh per seller per cooldown window.
        cooldown = (
            now - timedelta(seconds=self.settings.broker_on_read_cooldown_seconds)
            if on_read
            else None
        )
        claims = await self._claim(CLAIM_ONE, now, seller_id, cooldown)
        if not claims:
            async with db.direct(self.rt.direct) as connection:
                free = await connection.fetchval(IS_FREE, seller_id, now, self.late_reply_grace)
            return Outcome.BUSY if free is False else Outcome.SKIPPED
        return await self._refresh_claimed(claims[0])

    async def _claim_due(self, limit: int) -> Sequence[Claim]:
        return await self._claim(CLAIM_DUE, self.rt.clock(), limit)

    async def _claim(self, statement: str, now: datetime, *args: object) -> list[Claim]:
        """Take the leases and record the attempts in one transaction (one per batch).

        The attempt (fingerprint of the refresh token about to be sent, `sent_at`) is durable
        before anything is sent. A claim that ends up not sending sets `not_sent` again."""
        lease_until = now + timedelta(seconds=self.settings.broker_lease_seconds)
        claims = []
        async with (
            db.direct(self.rt.direct) as connection,
            connection.transaction(),
        ):
            rows = await connection.fetch(
                statement,
                self.owner,
                lease_until,
                now,
                self.rt.oauth.client_id,
                self.late_reply_grace,
                *args,
            )
            for row in rows:
                token = self.rt.keyring.open(
                    row["refresh_token"],
                    context("sellers", row["seller_id"], "refresh_token", row["client_id"]),
                )
                claims.append(
                    Claim(
                        seller_id=row["seller_id"],
                        client_id=row["client_id"],
                        version=row["version"],
                        refresh_token=token,
                        lease_until=lease_until,
                        # The previous attempt (RETURNING shows the values this claim left).
                        previous_unknown=row["attempt_fingerprint"] == fingerprint(token)
                        and row["attempt_outcome"] in ("sent", "unknown"),
                    )
                )
            if claims:
                await connection.executemany(
                    RECORD_ATTEMPT,
                    [(c.seller_id, fingerprint(c.refresh_token), now) for c in claims],
                )
        return claims

    # -- 2. record and send ------------------------------------------------------------------

    async def _gate(self, client_id: str) -> breaker.Gate:
        """The breaker and the pause switch, asked at most once a second while all is clear:
        a wave of refreshes must not cost a transaction each for a switch that is off. (The
        claim query itself skips paused applications, so a pause stops new claims at once.)
        Callers arriving while a check is in flight share its answer when it is "clear"; any
        other answer they ask again themselves (only one caller may win a probe)."""
        loop = asyncio.get_running_loop()
        if loop.time() < self.clear_until:
            return breaker.Gate.CLOSED
        shared = self.gate_check
        if (
            shared is not None
            and not shared.done()
            and await asyncio.shield(shared) == breaker.Gate.CLOSED
        ):
            return breaker.Gate.CLOSED
        check = self.gate_check = loop.create_task(
            breaker.gate(
                self.rt.sessions,
                client_id,
                self.rt.clock(),
                self.settings.broker_breaker_probe_seconds,
            )
        )
        gate = await asyncio.shield(check)
        if gate == breaker.Gate.CLOSED:
            self.clear_until = loop.time() + GATE_CLEAR_SECONDS
        return gate

    async def _refresh_claimed(self, claim: Claim) -> Outcome:
        gate = await self._gate(claim.client_id)
        if gate == breaker.Gate.OPEN:
            await self._record_failure(claim, "not_sent", "refresh_paused", back_off=False)
            metrics.REFRESHES.labels(Outcome.PAUSED, "").inc()
            return Outcome.PAUSED
        try:
            tokens, sent_at = await self._send(claim)
        except PermanentGrantError as exc:
            return await self._on_invalid_grant(claim, exc)
        except ApplicationError as exc:
            await self._on_application_error(claim, exc)
            return Outcome.APPLICATION_ERROR
        except TransientUpstreamError as exc:
            await self._on_transient(claim, exc)
            return Outcome.TRANSIENT
        outcome = await self._store(claim, tokens, sent_at)
        if gate == breaker.Gate.PROBE:
            await breaker.close(self.rt.sessions, claim.client_id)
        return outcome

    async def _send(self, claim: Claim) -> tuple[TokenSet, datetime]:
        deadline = self.rt.mercadopago.timeout + LEASE_MARGIN_SECONDS
        for attempt in range(NOT_SENT_RETRIES + 1):
            await self.rate.wait()
            if (claim.lease_until - self.rt.clock()).total_seconds() < deadline:
                # Not enough lease left to finish: another worker could claim mid-flight.
                raise TransientUpstreamError("lease_too_short", not_sent=True)
            try:
                return await self.rt.mercadopago.refresh(self.rt.oauth, claim.refresh_token)
            except TransientUpstreamError as exc:
                if not exc.not_sent or attempt == NOT_SENT_RETRIES:
                    raise
        raise AssertionError("unreachable")

    # -- 3. store ----------------------------------------------------------------------------

    async def _store(self, claim: Claim, tokens: TokenSet, sent_at: datetime) -> Outcome:
        """Write the new pair at once, retried until it lands: it exists nowhere else."""
        delay = 0.05
        while True:
            try:
                if await self._store_healthy(claim, tokens, sent_at):
                    return Outcome.REFRESHED
                return await self._store_once(claim, tokens, sent_at)
            except (DBAPIError, OSError, asyncpg.PostgresError, *BROKEN_CONNECTION) as exc:
                _event(
                    "refresh.store_retry",
                    logging.ERROR,
                    seller_id=claim.seller_id,
                    error=type(exc).__name__,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _store_healthy(self, claim: Claim, tokens: TokenSet, sent_at: datetime) -> bool:
        """The common case in one statement (one round trip, atomic): the seller is linked,
        not failing, and still at the claimed version. The pair and its audit row are written
        together. False: something else is true, `_store_once` decides what."""
        now = self.rt.clock()

        def seal(column: str, value: str) -> str:
            return self.rt.keyring.seal(
                value, context("sellers", claim.seller_id, column, claim.client_id)
            )

        async with db.direct(self.rt.direct) as connection:
            done = (
                await connection.fetchval(
                    STORE_HEALTHY,
                    claim.seller_id,
                    claim.version,
                    seal("access_token", tokens.access_token),
                    # A reply without a refresh token keeps the old one (NULL: keep).
                    seal("refresh_token", tokens.refresh_token)
                    if tokens.refresh_token is not None
                    else None,
                    sent_at + timedelta(seconds=tokens.expires_in),
                    policy.next_refresh_at(sent_at, tokens.expires_in, self.settings),
                    tokens.scope,
                    tokens.public_key,
                    tokens.live_mode,
                    now,
                )
                is not None
            )
        if done:
            metrics.REFRESHES.labels(Outcome.REFRESHED, "").inc()
            _event("refresh.refreshed", seller_id=claim.seller_id, version=claim.version + 1)
        return done

    async def _store_once(self, claim: Claim, tokens: TokenSet, sent_at: datetime) -> Outcome:
        now = self.rt.clock()

        def ctx(column: str) -> str:
            return context("sellers", claim.seller_id, column, claim.client_id)

        async with transaction(self.rt.sessions) as session:
            seller = await session.get(Seller, claim.seller_id, with_for_update=True)
            if seller is None or seller.version != claim.version:
                # A relink stored a newer pair meanwhile; ours is older and not needed.
                _event("refresh.superseded", logging.WARNING, seller_id=claim.seller_id)
                return Outcome.RACED
            recovered = seller.status == "relink_required"
            was_failing = recovered or seller.refresh_failures > 0
            seller.access_token = self.rt.keyring.seal(tokens.access_token, ctx("access_token"))
            if tokens.refresh_token is not None:  # a reply without one keeps the old one
                seller.refresh_token = self.rt.keyring.seal(
                    tokens.refresh_token, ctx("refresh_token")
                )
            seller.expires_at = sent_at + timedelta(seconds=tokens.expires_in)
            seller.next_refresh_at = policy.next_refresh_at(
                sent_at, tokens.expires_in, self.settings
            )
            seller.scope = tokens.scope or seller.scope
            seller.public_key = tokens.public_key or seller.public_key
            if tokens.live_mode is not None:
                seller.live_mode = tokens.live_mode
            seller.status, seller.status_reason = "linked", None
            seller.last_refreshed_at = now
            seller.refresh_failures, seller.last_refresh_error = 0, None
            seller.attempt_outcome = "ok"
            seller.lease_owner = seller.lease_until = None
            seller.version = claim.version + 1
            seller.updated_at = now
            outcome = Outcome.RECOVERED if recovered else Outcome.REFRESHED
            audit.record(session, now, "system", f"seller.{outcome}", claim.seller_id)
            if was_failing:  # closes a token.refresh_failed or a relink_required
                events.emit_for(session, self.settings, now, "seller.recovered", seller)
        metrics.REFRESHES.labels(outcome, "").inc()
        _event(f"refresh.{outcome}", seller_id=claim.seller_id, version=claim.version + 1)
        return outcome

    # -- 4-6. failures -------------------------------------------------------------------------

    async def _on_invalid_grant(self, claim: Claim, exc: MercadoPagoError) -> Outcome:
        now = self.rt.clock()
        reason = "rotation_lost" if claim.previous_unknown else "revoked"
        async with transaction(self.rt.sessions) as session:
            seller = await session.get(Seller, claim.seller_id, with_for_update=True)
            if seller is None or seller.version != claim.version:
                _event("refresh.raced", seller_id=claim.seller_id)
                metrics.REFRESHES.labels(Outcome.RACED, exc.error).inc()
                return Outcome.RACED  # someone rotated first: a race, not a revocation
            seller.status, seller.status_reason = "relink_required", reason
            seller.attempt_outcome = "invalid_grant"
            seller.last_refresh_error = exc.error
            seller.refresh_failures += 1
            seller.next_refresh_at = None
            seller.updated_at = now
            if seller.lease_owner == self.owner:
                seller.lease_owner = seller.lease_until = None
            audit.record(session, now, "system", "seller.relink_required", claim.seller_id, reason)
            events.emit_for(session, self.settings, now, "seller.relink_required", seller)
        metrics.REFRESHES.labels(Outcome.RELINK_REQUIRED, reason).inc()
        _event("refresh.relink_required", logging.WARNING, seller_id=claim.seller_id, reason=reason)
        if self.burst.add(claim.client_id, now):
            self.clear_until = 0.0
            await breaker.trip(
                self.rt.sessions,
                claim.client_id,
                "invalid_grant_burst",
                now,
                self.settings.broker_breaker_probe_seconds,
            )
        return Outcome.RELINK_REQUIRED

    async def _on_application_error(self, claim: Claim, exc: MercadoPagoError) -> None:
        now = self.rt.clock()
        self.clear_until = 0.0
        await breaker.trip(
            self.rt.sessions,
            claim.client_id,
            exc.error,
            now,
            self.settings.broker_breaker_probe_seconds,
        )
        await self._record_failure(claim, "rejected", exc.error, back_off=False)
        metrics.REFRESHES.labels(Outcome.APPLICATION_ERROR, exc.error).inc()

    async def _on_transient(self, claim: Claim, exc: TransientUpstreamError) -> None:
        await self._record_failure(
            claim, "not_sent" if exc.not_sent else "unknown", exc.error, back_off=True
        )
        metrics.REFRESHES.labels(Outcome.TRANSIENT, exc.error).inc()
        _event(
            "refresh.transient_failure",
            logging.WARNING,
            seller_id=claim.seller_id,
            error=exc.error,
            outcome_unknown=not exc.not_sent,
        )

    async def _record_failure(
        self, claim: Claim, attempt_outcome: str, error: str, *, back_off: bool
    ) -> None:
        """A refresh failed and the seller's grant is not blamed: its status stays, the lease
        is given back, and it counts as failing (reads carry the warning; the streak's first
        failure is an event). `back_off`: retry later (a transient error); otherwise it stays
        due (refused by the application's breaker, which holds every refresh until it closes)."""
        async with transaction(self.rt.sessions) as session:
            seller = await session.get(Seller, claim.seller_id, with_for_update=True)
            if seller is None or seller.lease_owner != self.owner:
                return
            seller.refresh_failures += 1
            seller.last_refresh_error = error
            seller.attempt_outcome = attempt_outcome
            if back_off:
                seller.next_refresh_at = self.rt.clock() + policy.backoff(
                    seller.refresh_failures, self.settings
                )
            seller.lease_owner = seller.lease_until = None
            if seller.refresh_failures == 1:  # once per failing streak, not once per retry
                events.emit_for(
                    session, self.settings, self.rt.clock(), "token.refresh_failed", seller
                )
