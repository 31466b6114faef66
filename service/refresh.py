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
from typing import Any, cast

from sqlalchemy import (
    Boolean,
    Table,
    Text,
    bindparam,
    exists,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.exc import DBAPIError

from service import audit, breaker, events, logs, metrics, policy
from service.config import LEASE_MARGIN_SECONDS
from service.crypto import context
from service.db import transaction
from service.mercadopago import (
    ApplicationError,
    MercadoPagoError,
    PermanentGrantError,
    TokenSet,
    TransientUpstreamError,
)
from service.models import AppBreaker, AuditEvent, RefreshPause, Seller, Timestamp
from service.runtime import Runtime

log = logging.getLogger("broker.refresh")

NOT_SENT_RETRIES = 2  # extra sends when the request surely never reached Mercado Pago
PRUNE_EVERY_SECONDS = 3600
EXPIRING_EVERY_SECONDS = 300  # how often to look for tokens that will lapse unrefreshed
GATE_CLEAR_SECONDS = 1.0
CLAIM_GATHER_SECONDS = 0.01
SELLERS = cast(Table, Seller.__table__)
AUDIT_EVENTS = cast(Table, AuditEvent.__table__)


def _store_healthy_statement() -> Any:
    """UPDATE the pair WHERE still at the claimed version, linked and not failing, and INSERT
    its audit row, in one statement (built once: SQLAlchemy caches its compiled form)."""
    keep = func.coalesce
    stored = (
        update(SELLERS)
        .where(
            SELLERS.c.seller_id == bindparam("sid"),
            SELLERS.c.version == bindparam("claimed"),
            SELLERS.c.status == "linked",
            SELLERS.c.refresh_failures == 0,
        )
        .values(
            access_token=bindparam("access_token"),
            refresh_token=keep(bindparam("refresh_token", type_=Text), SELLERS.c.refresh_token),
            expires_at=bindparam("expires_at"),
            next_refresh_at=bindparam("next_refresh_at"),
            scope=keep(bindparam("scope", type_=Text), SELLERS.c.scope),
            public_key=keep(bindparam("public_key", type_=Text), SELLERS.c.public_key),
            live_mode=keep(bindparam("live_mode", type_=Boolean), SELLERS.c.live_mode),
            last_refreshed_at=bindparam("now"),
            last_refresh_error=None,
            attempt_outcome="ok",
            lease_owner=None,
            lease_until=None,
            version=bindparam("new_version"),
            updated_at=bindparam("now"),
        )
        .returning(SELLERS.c.seller_id)
        .cte("stored")
    )
    return (
        insert(AUDIT_EVENTS)
        .from_select(
            ["at", "actor", "action", "seller_id"],
            select(
                bindparam("now", type_=Timestamp),
                literal("system"),
                literal(f"seller.{Outcome.REFRESHED}"),
                stored.c.seller_id,
            ),
        )
        .returning(AUDIT_EVENTS.c.seller_id)
    )


# Each claimed seller's attempt, written in the claim's transaction (one executemany).
RECORD_ATTEMPT = (
    update(SELLERS)
    .where(SELLERS.c.seller_id == bindparam("sid"))
    .values(
        attempt_fingerprint=bindparam("fp"), attempt_sent_at=bindparam("at"), attempt_outcome="sent"
    )
)


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
        self.rate = RateLimiter(self.settings.broker_refresh_rate_per_second)
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
                # Full batch: more may be due. Wait for a slot to free up, then a moment more
                # so that the next claim takes several rows: a claim is a transaction, and one
                # per finished refresh would cap a wave at the claim rate.
                await asyncio.wait(active, return_when=asyncio.FIRST_COMPLETED)
                await asyncio.sleep(CLAIM_GATHER_SECONDS)
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
        A lease whose request may be at Mercado Pago stays until it lapses (its outcome is
        unknown: the next attempt's `invalid_grant` will say so)."""
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

    def _lease_free(self, now: datetime) -> Any:
        return or_(Seller.lease_until.is_(None), Seller.lease_until < now)

    async def _claim_one(self, seller_id: str, on_read: bool) -> Outcome:
        now = self.rt.clock()
        conditions = [
            Seller.seller_id == seller_id,
            Seller.status == "linked",
            Seller.client_id == self.rt.oauth.client_id,
            self._lease_free(now),
        ]
        if on_read:
            # At most one on-read refresh per seller per cooldown window.
            cooldown = now - timedelta(seconds=self.settings.broker_on_read_cooldown_seconds)
            conditions.append(
                or_(Seller.attempt_sent_at.is_(None), Seller.attempt_sent_at < cooldown)
            )
        claims = await self._claim(conditions, now)
        if not claims:
            async with self.rt.sessions() as session:
                lease_until = await session.scalar(
                    select(Seller.lease_until).where(Seller.seller_id == seller_id)
                )
            return Outcome.BUSY if lease_until and lease_until >= now else Outcome.SKIPPED
        return await self._refresh_claimed(claims[0])

    async def _claim_due(self, limit: int) -> Sequence[Claim]:
        now = self.rt.clock()
        return await self._claim([Seller.seller_id.in_(self.due(now, limit))], now)

    def due(self, now: datetime, limit: int) -> Any:
        """The due-work query: the oldest due sellers, on the partial index, skipping locks."""
        paused = select(AppBreaker.client_id).where(AppBreaker.probe_after > now)
        switched_off = exists(select(RefreshPause.id))  # `broker refresher pause`
        # SKIP LOCKED: concurrent refreshers each take different due rows, never wait on them.
        due = (
            select(Seller.seller_id)
            .where(
                Seller.status == "linked",
                Seller.next_refresh_at <= now,
                Seller.client_id == self.rt.oauth.client_id,
                Seller.client_id.not_in(paused),
                ~switched_off,
                self._lease_free(now),
            )
            .order_by(Seller.next_refresh_at)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
        return due.scalar_subquery()

    async def _claim(self, conditions: list[Any], now: datetime) -> list[Claim]:
        """Take the leases and record the attempts in one transaction (one per batch).

        The attempt (fingerprint of the refresh token about to be sent, `sent_at`) is durable
        before anything is sent. A claim that ends up not sending sets `not_sent` again."""
        lease_until = now + timedelta(seconds=self.settings.broker_lease_seconds)
        claims = []
        async with transaction(self.rt.sessions) as session:
            rows = (
                await session.execute(
                    update(Seller)
                    .where(*conditions)
                    .values(
                        lease_owner=self.owner,
                        lease_until=lease_until,
                        # If this owner dies, the background refresher retries as soon as the
                        # lease lapses (an on-read claim may be of a seller not due for days).
                        next_refresh_at=func.least(
                            func.coalesce(Seller.next_refresh_at, lease_until), lease_until
                        ),
                    )
                    .returning(
                        Seller.seller_id,
                        Seller.client_id,
                        Seller.version,
                        Seller.refresh_token,
                        Seller.attempt_fingerprint,
                        Seller.attempt_outcome,
                    )
                )
            ).all()
            for row in rows:
                assert row.refresh_token is not None
                token = self.rt.keyring.open(
                    row.refresh_token,
                    context("sellers", row.seller_id, "refresh_token", row.client_id),
                )
                claims.append(
                    Claim(
                        seller_id=row.seller_id,
                        client_id=row.client_id,
                        version=row.version,
                        refresh_token=token,
                        lease_until=lease_until,
                        # The previous attempt (the values before this claim's record).
                        previous_unknown=row.attempt_fingerprint == fingerprint(token)
                        and row.attempt_outcome in ("sent", "unknown"),
                    )
                )
            if claims:
                await session.execute(
                    RECORD_ATTEMPT,
                    [
                        {"sid": c.seller_id, "fp": fingerprint(c.refresh_token), "at": now}
                        for c in claims
                    ],
                )
        return claims

    # -- 2. record and send ------------------------------------------------------------------

    async def _gate(self, client_id: str) -> breaker.Gate:
        """The breaker and the pause switch, asked at most once a second while all is clear:
        a wave of refreshes must not cost a transaction each for a switch that is off. (The
        claim query itself skips paused applications, so a pause stops new claims at once.)"""
        loop = asyncio.get_running_loop()
        if loop.time() < self.clear_until:
            return breaker.Gate.CLOSED
        gate = await breaker.gate(
            self.rt.sessions,
            client_id,
            self.rt.clock(),
            self.settings.broker_breaker_probe_seconds,
        )
        if gate == breaker.Gate.CLOSED:
            self.clear_until = loop.time() + GATE_CLEAR_SECONDS
        return gate

    async def _refresh_claimed(self, claim: Claim) -> Outcome:
        gate = await self._gate(claim.client_id)
        if gate == breaker.Gate.OPEN:
            await self._release(claim, attempt_outcome="not_sent")
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
            except (DBAPIError, OSError) as exc:
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

        params = {
            "sid": claim.seller_id,
            "claimed": claim.version,
            "new_version": claim.version + 1,
            "access_token": seal("access_token", tokens.access_token),
            # A reply without a refresh token keeps the old one (NULL: keep).
            "refresh_token": seal("refresh_token", tokens.refresh_token)
            if tokens.refresh_token is not None
            else None,
            "expires_at": sent_at + timedelta(seconds=tokens.expires_in),
            "next_refresh_at": policy.next_refresh_at(sent_at, tokens.expires_in, self.settings),
            "scope": tokens.scope,
            "public_key": tokens.public_key,
            "live_mode": tokens.live_mode,
            "now": now,
        }
        async with self.rt.autocommit.connect() as connection:
            done = (await connection.execute(STORE_HEALTHY, params)).first() is not None
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
        # The seller's grant is not at fault: its status stays, it stays due.
        await self._release(claim, attempt_outcome="rejected", error=exc.error)
        metrics.REFRESHES.labels(Outcome.APPLICATION_ERROR, exc.error).inc()

    async def _on_transient(self, claim: Claim, exc: TransientUpstreamError) -> None:
        async with transaction(self.rt.sessions) as session:
            seller = await session.get(Seller, claim.seller_id, with_for_update=True)
            if seller is None or seller.lease_owner != self.owner:
                return
            seller.refresh_failures += 1
            seller.last_refresh_error = exc.error
            seller.attempt_outcome = "not_sent" if exc.not_sent else "unknown"
            seller.next_refresh_at = self.rt.clock() + policy.backoff(
                seller.refresh_failures, self.settings
            )
            seller.lease_owner = seller.lease_until = None
            if seller.refresh_failures == 1:  # once per failing streak, not once per retry
                events.emit_for(
                    session, self.settings, self.rt.clock(), "token.refresh_failed", seller
                )
        metrics.REFRESHES.labels(Outcome.TRANSIENT, exc.error).inc()
        _event(
            "refresh.transient_failure",
            logging.WARNING,
            seller_id=claim.seller_id,
            error=exc.error,
            outcome_unknown=not exc.not_sent,
        )

    async def _release(
        self, claim: Claim, attempt_outcome: str | None = None, error: str | None = None
    ) -> None:
        values: dict[str, Any] = {"lease_owner": None, "lease_until": None}
        if attempt_outcome:
            values |= {"attempt_outcome": attempt_outcome, "last_refresh_error": error}
        async with transaction(self.rt.sessions) as session:
            await session.execute(
                update(Seller)
                .where(Seller.seller_id == claim.seller_id, Seller.lease_owner == self.owner)
                .values(**values)
            )


STORE_HEALTHY = _store_healthy_statement()
