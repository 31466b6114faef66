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
   Everything about applications is per application: each seller is refreshed with its own
   application's credentials, under that application's breaker and rate limit, so a broken
   secret in one pauses that one only while the others' sellers go on being refreshed.
6. Transient errors: release the lease, back off `next_refresh_at`.
7. A dead owner's leases: every claimer holds an owner lock in the database while it lives,
   and refreshers take over the leases of an owner whose lock is gone within seconds
   (`owners.py`); a live owner, however slow, keeps its leases and their grace.

Every refresh runs as a task of the process: a caller that disconnects or times out cannot
cancel it between Mercado Pago's reply and the write; shutdown waits for it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import asyncpg
from sqlalchemy import or_, update
from sqlalchemy.exc import DBAPIError

from service.core import db, logs, metrics
from service.core.applications import Application
from service.core.config import LEASE_MARGIN_SECONDS, Settings
from service.core.crypto import Keyring, fingerprint
from service.core.db import BROKEN_CONNECTION, transaction
from service.core.domain import OUTCOME_UNKNOWN, AttemptOutcome, Reason
from service.core.mercadopago import (
    ApplicationError,
    MercadoPagoError,
    PermanentGrantError,
    TokenSet,
    TransientUpstreamError,
)
from service.core.models import Seller
from service.core.runtime import Clock, Database, Tasks, Upstream
from service.lifecycle import audit, events, sellers
from service.lifecycle.sellers import Stored
from service.refresh import breaker, failover, owners
from service.refresh.sql import CLAIM_DUE, CLAIM_ONE, IS_FREE, RECORD_ATTEMPT

log = logging.getLogger("broker.refresh")

NOT_SENT_RETRIES = 2  # extra sends when the request surely never reached Mercado Pago
PRUNE_EVERY_SECONDS = 3600
EXPIRING_EVERY_SECONDS = 300  # how often to look for tokens that will lapse unrefreshed
GATE_CLEAR_SECONDS = 1.0


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


def _event(name: str, level: int = logging.INFO, **fields: object) -> None:
    logs.event(log, name, fields, level)


class RateLimiter:
    """At most `rate` sends per second from this process, in any second.

    Senders take turns in arrival order, and a turn is counted when it is taken, not booked
    ahead: booking turns on a token bucket let sends whose wake-up the busy event loop delayed
    go out together with the ones on time, and a 400/s cap saw 431 in one second (the bench's
    rate-cap wave). A sender late by up to SLACK makes its lateness up; later than that, the
    pace restarts from now. Turns are paced HEADROOM under the rate, so that making lateness up
    never takes a second over it: at SLACK alone, the sends left at up to 1.02 x the rate, and
    what delays a request between its turn and Mercado Pago's door (this loop, the network,
    theirs) bunched them further, 422 in one second at the simulator against 400/s. The first
    send goes at once, or below one a second after one interval less a second, as a bucket
    holding one second's worth would let it."""

    SLACK = 0.02  # seconds of lateness made up
    HEADROOM = 0.02  # turns come at rate x (1 - HEADROOM); x (1 + SLACK) is still <= rate

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / (rate * (1 - self.HEADROOM))
        self.next_at: float | None = None  # loop time of the next turn
        self.turns = asyncio.Lock()

    async def wait(self) -> None:
        async with self.turns:
            loop = asyncio.get_running_loop()
            if self.next_at is None:
                self.next_at = loop.time() - 1.0 + self.interval
            delay = self.next_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            self.next_at = max(self.next_at, loop.time() - self.SLACK) + self.interval


class Refresher:
    """One per process: refreshes on demand (`refresh`) and in the background (`run`)."""

    def __init__(
        self,
        settings: Settings,
        clock: Clock,
        database: Database,
        keyring: Keyring,
        upstream: Upstream,
        tasks: Tasks,
    ) -> None:
        self.settings, self.clock, self.db = settings, clock, database
        self.keyring, self.upstream, self.tasks = keyring, upstream, tasks
        self.owner = owners.owner_name()
        # Held while this process lives; a claim takes it first (owners.py: dead-owner takeover).
        self.liveness = owners.Liveness(self.owner, database.url)
        self.wake = asyncio.Event()  # set when a takeover made sellers due (owners.Takeover)
        # The rotations it stored lately, stored again if a failover lost them (failover.py).
        self.failover = failover.Failover(settings, clock, database.sessions, database.direct)
        self.inflight: dict[str, asyncio.Task[Outcome]] = {}
        self.joined = 0  # callers that joined a refresh already in flight (single-flight)
        self.apps = upstream.apps
        # Per application (by client_id): no breaker or pause seen until then (loop time), the
        # check in flight (one at a time), and the rate Mercado Pago allows it.
        self.clear_until: dict[str, float] = {}
        self.gate_check: dict[str, asyncio.Task[breaker.Gate]] = {}
        self.rates = {app.client_id: RateLimiter(app.refresh_rate) for app in self.apps.values()}
        self.turn = 0  # which application claims first in the next round (fair shares)
        # One lease: longer than any request's deadline (settings refuse less), see sql.free().
        self.late_reply_grace = timedelta(seconds=self.settings.broker_lease_seconds)
        self.burst = breaker.Burst(
            self.settings.broker_breaker_invalid_grant_threshold,
            self.settings.broker_breaker_window_seconds,
        )

    def replica(self) -> Refresher:
        """A refresher with the same parts under another owner: another process, as far as
        the leases can tell (tests race two of them)."""
        return Refresher(
            self.settings, self.clock, self.db, self.keyring, self.upstream, self.tasks
        )

    async def aclose(self) -> None:
        """The process is leaving: let its owner lock go (what it still leases is taken over)."""
        await self.liveness.close()

    # -- entry points ----------------------------------------------------------------------

    async def refresh(self, seller_id: str, *, on_read: bool = False) -> Outcome:
        """Refresh one seller now, joining a refresh of it already in flight in this process."""
        task = self.inflight.get(seller_id)
        if task is None:
            task = self._start(seller_id, self._claim_one(seller_id, on_read=on_read))
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
            self.wake.clear()  # this round claims whatever a takeover made due until now
            if loop.time() >= next_prune:  # retention, hourly, from whichever refresher runs
                next_prune = loop.time() + PRUNE_EVERY_SECONDS
                await self._prune()
            if loop.time() >= next_expiring:
                next_expiring = loop.time() + EXPIRING_EVERY_SECONDS
                await self._notify_expiring()
            free = cap - len(active)
            claims, more = await self._claim_round(free) if free > 0 else ([], False)
            for claim in claims:
                if claim.seller_id in self.inflight:
                    continue  # already being refreshed here (its lease had lapsed)
                task = self._start(claim.seller_id, self._refresh_claimed(claim))
                active.add(task)
                task.add_done_callback(active.discard)
            if more:
                # Full batch: more may be due. Claim again as soon as a slot frees up. (Waiting
                # a moment more to claim several rows at once cost more in idle slots than it
                # saved in transactions: measured in the wave benchmark, 449/s against 491/s.)
                # Slots that free up during a claim are filled by the next one, so batches
                # grow by themselves with the rate.
                if len(active) >= cap:
                    await asyncio.wait(active, return_when=asyncio.FIRST_COMPLETED)
                continue
            # Woken early by a takeover: the dead owner's sellers are due now.
            waits: set[asyncio.Future[Any]] = {
                asyncio.ensure_future(stop.wait()),
                asyncio.ensure_future(self.wake.wait()),
            }
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
            async with transaction(self.db.sessions) as session:
                released = await session.execute(
                    update(Seller)
                    .where(
                        Seller.lease_owner == self.owner,
                        or_(
                            Seller.attempt_outcome.is_(None),
                            Seller.attempt_outcome != AttemptOutcome.SENT,
                        ),
                    )
                    .values(lease_owner=None, lease_until=None)
                )
        except Exception as exc:  # noqa: BLE001 shutting down; the leases lapse by themselves
            _event("refresher.release_failed", logging.ERROR, error=type(exc).__name__)
            return 0
        count = int(released.rowcount)  # type: ignore[attr-defined]
        if count:
            _event("refresher.leases_released", logging.WARNING, leases=count)
        return count

    async def _prune(self) -> None:
        try:
            events, attempts, links = await audit.prune(
                self.db.sessions,
                self.clock(),
                self.settings.broker_audit_retention_days,
                self.settings.broker_attempt_retention_days,
            )
        except Exception as exc:  # noqa: BLE001 retention waits for the next round, not the loop
            _event("retention.failed", logging.ERROR, error=type(exc).__name__)
            return
        if events or attempts or links:
            _event("retention.pruned", audit_events=events, link_attempts=attempts, links=links)

    async def _notify_expiring(self) -> None:
        try:
            sent = await events.notify_expiring(self.db.sessions, self.settings, self.clock())
        except Exception as exc:  # noqa: BLE001 the warning waits for the next round
            _event("expiring.scan_failed", logging.ERROR, error=type(exc).__name__)
            return
        if sent:
            _event("expiring.notified", logging.WARNING, sellers=sent)

    def _start(self, seller_id: str, work: Any) -> asyncio.Task[Outcome]:
        task: asyncio.Task[Outcome] = self.tasks.spawn(work)
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

    async def _claim_one(self, seller_id: str, *, on_read: bool) -> Outcome:
        now = self.clock()
        # At most one on-read refresh per seller per cooldown window.
        cooldown = (
            now - timedelta(seconds=self.settings.broker_on_read_cooldown_seconds)
            if on_read
            else None
        )
        claims = await self._claim(
            CLAIM_ONE,
            now,
            seller_id=seller_id,
            cooldown=cooldown,
            client_ids=self.apps.client_ids,
        )
        if not claims:
            async with db.direct(self.db.direct) as connection:
                free = await connection.fetchval(
                    IS_FREE.sql,
                    *IS_FREE.args(seller_id=seller_id, now=now, grace=self.late_reply_grace),
                )
            return Outcome.BUSY if free is False else Outcome.SKIPPED
        return await self._refresh_claimed(claims[0])

    async def _claim_round(self, free: int) -> tuple[list[Claim], bool]:
        """Claim due sellers into `free` slots, each application its share in turn (the first
        to claim rotates), so one application's backlog cannot starve another's. True when an
        application filled its share: more may be due."""
        apps = list(self.apps.values())
        self.turn = (self.turn + 1) % len(apps)
        claims: list[Claim] = []
        more = False
        for position, app in enumerate(apps[self.turn :] + apps[: self.turn]):
            left = free - len(claims)
            share = min(-(-left // (len(apps) - position)), self.settings.broker_refresh_batch_size)
            if share <= 0:
                break
            try:
                got = await self._claim(
                    CLAIM_DUE, self.clock(), client_id=app.client_id, limit=share
                )
            except Exception as exc:  # noqa: BLE001 the loop must outlive a blip or a bad row
                _event(
                    "refresher.claim_failed",
                    logging.ERROR,
                    application=app.name,
                    error=type(exc).__name__,
                )
                continue
            claims += got
            more = more or len(got) == share
        return claims, more

    async def _claim(self, statement: db.Hot, now: datetime, **where: object) -> list[Claim]:
        """Take the leases and record the attempts in one transaction (one per batch).

        The attempt (fingerprint of the refresh token about to be sent, `sent_at`) is durable
        before anything is sent. A claim that ends up not sending sets `not_sent` again."""
        lease_until = now + timedelta(seconds=self.settings.broker_lease_seconds)
        await self.liveness.ensure()  # never a lease that a looker could call dead
        async with db.direct(self.db.direct) as connection:
            # On a new server (a failover), what it may have lost is stored again first: no
            # claim may send a refresh token whose rotation this process already holds.
            await self.failover.check(connection)
            return await self._claim_in(connection, statement, now, lease_until, where)

    async def _claim_in(
        self,
        connection: asyncpg.Connection,
        statement: db.Hot,
        now: datetime,
        lease_until: datetime,
        where: dict[str, object],
    ) -> list[Claim]:
        claims = []
        async with connection.transaction():
            rows = await connection.fetch(
                statement.sql,
                *statement.args(
                    owner=self.owner,
                    lease_until=lease_until,
                    now=now,
                    grace=self.late_reply_grace,
                    **where,
                ),
            )
            for row in rows:
                token = self.keyring.open_column(
                    Seller.refresh_token, row["seller_id"], row["client_id"], row["refresh_token"]
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
                        and row["attempt_outcome"] in OUTCOME_UNKNOWN,
                    )
                )
            if claims:
                await connection.executemany(
                    RECORD_ATTEMPT.sql,
                    [
                        RECORD_ATTEMPT.args(
                            seller_id=c.seller_id,
                            fingerprint=fingerprint(c.refresh_token),
                            sent_at=now,
                        )
                        for c in claims
                    ],
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
        if loop.time() < self.clear_until.get(client_id, 0.0):
            return breaker.Gate.CLOSED
        shared = self.gate_check.get(client_id)
        if (
            shared is not None
            and not shared.done()
            and await asyncio.shield(shared) == breaker.Gate.CLOSED
        ):
            return breaker.Gate.CLOSED
        check = self.gate_check[client_id] = loop.create_task(
            breaker.gate(
                self.db.sessions,
                client_id,
                self.clock(),
                self.settings.broker_breaker_probe_seconds,
            )
        )
        gate = await asyncio.shield(check)
        if gate == breaker.Gate.CLOSED:
            self.clear_until[client_id] = loop.time() + GATE_CLEAR_SECONDS
        return gate

    async def _refresh_claimed(self, claim: Claim) -> Outcome:
        app = self.apps.by_client_id[claim.client_id]  # both claims take configured ones only
        gate = await self._gate(claim.client_id)
        if gate == breaker.Gate.OPEN:
            await self._record_failure(
                claim, AttemptOutcome.NOT_SENT, "refresh_paused", back_off=False
            )
            metrics.REFRESHES.labels(app.name, Outcome.PAUSED, "").inc()
            return Outcome.PAUSED
        try:
            tokens, sent_at = await self._send(app, claim)
        except PermanentGrantError as exc:
            return await self._on_invalid_grant(app, claim, exc)
        except ApplicationError as exc:
            await self._on_application_error(app, claim, exc)
            return Outcome.APPLICATION_ERROR
        except TransientUpstreamError as exc:
            await self._on_transient(app, claim, exc)
            return Outcome.TRANSIENT
        outcome = await self._store(app, claim, tokens, sent_at)
        if gate == breaker.Gate.PROBE:
            await breaker.close(self.db.sessions, claim.client_id)
        return outcome

    async def _send(self, app: Application, claim: Claim) -> tuple[TokenSet, datetime]:
        deadline = self.upstream.mercadopago.timeout + LEASE_MARGIN_SECONDS
        for attempt in range(NOT_SENT_RETRIES + 1):
            await self.rates[app.client_id].wait()
            if (claim.lease_until - self.clock()).total_seconds() < deadline:
                # Not enough lease left to finish: another worker could claim mid-flight.
                raise TransientUpstreamError("lease_too_short", not_sent=True)
            try:
                return await self.upstream.mercadopago.refresh(app.oauth, claim.refresh_token)
            except TransientUpstreamError as exc:
                if not exc.not_sent or attempt == NOT_SENT_RETRIES:
                    raise
        raise AssertionError("unreachable")

    # -- 3. store ----------------------------------------------------------------------------

    async def _store(
        self, app: Application, claim: Claim, tokens: TokenSet, sent_at: datetime
    ) -> Outcome:
        """Write the new pair at once, retried until it lands: it exists nowhere else."""
        pair = sellers.sealed_pair(
            self.keyring, self.settings, claim.seller_id, claim.client_id, tokens, sent_at
        )
        delay = 0.05
        while True:
            try:
                return await self._store_pair(app, claim, pair)
            except (DBAPIError, OSError, asyncpg.PostgresError, *BROKEN_CONNECTION) as exc:
                _event(
                    "refresh.store_retry",
                    logging.ERROR,
                    seller_id=claim.seller_id,
                    error=type(exc).__name__,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _store_pair(self, app: Application, claim: Claim, pair: sellers.Pair) -> Outcome:
        now = self.clock()
        # The common case in one statement: linked, not failing, still at the claimed version.
        async with db.direct(self.db.direct) as connection:
            healthy = await sellers.store_refreshed_healthy(
                connection, claim.seller_id, claim.version, pair, now, app.name
            )
        stored = Stored.REFRESHED
        if not healthy:
            stored = await sellers.store_refreshed(
                self.db.sessions, self.settings, now, claim.seller_id, claim.version, pair
            )
        if stored == Stored.SUPERSEDED:
            # A relink stored a newer pair meanwhile; ours is older and not needed.
            _event("refresh.superseded", logging.WARNING, seller_id=claim.seller_id)
            return Outcome.RACED
        self.failover.journal.keep(claim.seller_id, app.name, claim.version, pair)
        outcome = Outcome.RECOVERED if stored == Stored.RECOVERED else Outcome.REFRESHED
        metrics.REFRESHES.labels(app.name, outcome, "").inc()
        _event(
            f"refresh.{outcome}",
            seller_id=claim.seller_id,
            application=app.name,
            version=claim.version + 1,
        )
        return outcome

    # -- 4-6. failures -------------------------------------------------------------------------

    async def _on_invalid_grant(
        self, app: Application, claim: Claim, exc: MercadoPagoError
    ) -> Outcome:
        now = self.clock()
        reason = Reason.ROTATION_LOST if claim.previous_unknown else Reason.REVOKED
        marked = await sellers.mark_relink_required(
            self.db.sessions,
            self.settings,
            now,
            claim.seller_id,
            claim.version,
            reason,
            refresh_error=exc.error,
            lease_owner=self.owner,
        )
        if not marked:
            _event("refresh.raced", seller_id=claim.seller_id)
            metrics.REFRESHES.labels(app.name, Outcome.RACED, exc.error).inc()
            return Outcome.RACED  # someone rotated first: a race, not a revocation
        metrics.REFRESHES.labels(app.name, Outcome.RELINK_REQUIRED, reason).inc()
        _event(
            "refresh.relink_required",
            logging.WARNING,
            seller_id=claim.seller_id,
            application=app.name,
            reason=reason,
        )
        if self.burst.add(claim.client_id, now):
            self.clear_until.pop(claim.client_id, None)
            await breaker.trip(
                self.db.sessions,
                claim.client_id,
                "invalid_grant_burst",
                now,
                self.settings.broker_breaker_probe_seconds,
            )
        return Outcome.RELINK_REQUIRED

    async def _on_application_error(
        self, app: Application, claim: Claim, exc: MercadoPagoError
    ) -> None:
        now = self.clock()
        self.clear_until.pop(claim.client_id, None)
        await breaker.trip(
            self.db.sessions,
            claim.client_id,
            exc.error,
            now,
            self.settings.broker_breaker_probe_seconds,
        )
        await self._record_failure(claim, AttemptOutcome.REJECTED, exc.error, back_off=False)
        metrics.REFRESHES.labels(app.name, Outcome.APPLICATION_ERROR, exc.error).inc()

    async def _on_transient(
        self, app: Application, claim: Claim, exc: TransientUpstreamError
    ) -> None:
        outcome = AttemptOutcome.NOT_SENT if exc.not_sent else AttemptOutcome.UNKNOWN
        await self._record_failure(claim, outcome, exc.error, back_off=True)
        metrics.REFRESHES.labels(app.name, Outcome.TRANSIENT, exc.error).inc()
        _event(
            "refresh.transient_failure",
            logging.WARNING,
            seller_id=claim.seller_id,
            application=app.name,
            error=exc.error,
            outcome_unknown=not exc.not_sent,
        )

    async def _record_failure(
        self, claim: Claim, outcome: AttemptOutcome, error: str, *, back_off: bool
    ) -> None:
        await sellers.record_failure(
            self.db.sessions,
            self.settings,
            self.clock(),
            claim.seller_id,
            self.owner,
            outcome,
            error,
            back_off=back_off,
        )
