"""Prometheus metrics (`GET /metrics`). Names are a contract: `ops/alerts.yml` and
`ops/grafana-dashboard.json` use them, and a test checks that every name they use exists.

Counters and histograms are updated in place; gauges about the database (sellers by status,
expiring tokens, outbox, refresher lag) are computed by one periodic query batch per process
(`BROKER_METRICS_DB_SECONDS`), never per scrape or per request.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString
from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from service.core.domain import DeliveryState, Status
from service.core.models import AppBreaker, Event, EventDelivery, RefreshPause, Seller

if TYPE_CHECKING:  # applications.py imports the client, which imports these metrics
    from service.core.applications import Applications

# The *_created series would double the exposition for nothing the dashboard uses.
disable_created_metrics()  # type: ignore[no-untyped-call]

FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
UPSTREAM = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Requests:
    """HTTP requests by route template and status, and their latency: `broker_http_requests`
    and `broker_http_request_duration_seconds`, as a Counter and a Histogram would export them,
    kept in plain dicts of numbers. Every request is counted from the event loop's thread, so
    nothing needs their locks: a lock per counter and per histogram bucket, and the calls around
    them, cost 2.3 µs of a cached token read (of the broker's own 10.3 µs, in process)."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.bounds = [*(floatToGoString(b) for b in buckets), "+Inf"]  # type: ignore[no-untyped-call]
        self.counts: dict[tuple[str, int], int] = {}
        self.latency: dict[str, list[float]] = {}  # per bucket (then +Inf), then the sum

    def record(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        self.counts[key] = self.counts.get(key, 0) + 1
        row = self.latency.get(route)
        if row is None:
            row = self.latency[route] = [0.0] * (len(self.buckets) + 2)
        row[bisect_left(self.buckets, seconds)] += 1  # the first bucket whose bound holds it
        row[-1] += seconds

    def describe(self) -> list[Metric]:
        return list(self._families([], []))

    def collect(self) -> Iterator[Metric]:
        # Copied first (each copy one step under the GIL): a scrape on another thread (the
        # refresher's metrics port) reads a snapshot while the loop goes on counting.
        latency = [(route, list(row)) for route, row in list(self.latency.items())]
        return self._families(list(self.counts.items()), latency)

    def _families(
        self, counts: list[tuple[tuple[str, int], int]], latency: list[tuple[str, list[float]]]
    ) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "broker_http_requests", "HTTP requests by route template and status.",
            labels=["route", "status"],
        )  # fmt: skip
        for (route, status), n in counts:
            requests.add_metric([route, str(status)], n)
        seconds = HistogramMetricFamily(
            "broker_http_request_duration_seconds", "HTTP request latency.", labels=["route"]
        )
        for route, row in latency:
            cumulative = list(itertools.accumulate(row[:-1]))
            seconds.add_metric([route], list(zip(self.bounds, cumulative, strict=True)), row[-1])
        yield requests
        yield seconds


REQUESTS = Requests(FAST)
REGISTRY.register(REQUESTS)
# Everything about sellers, links, exchanges and refreshes is labelled by `application` (its
# name; "" for a callback refused before its application was known).
LINK_ATTEMPTS = Counter(
    "broker_link_attempts",
    "Link callbacks by application and outcome (linked, denied, expired...).",
    ["application", "outcome"],
)
TOKEN_EXCHANGES = Counter(
    "broker_token_exchanges",
    "Authorization-code exchanges by application and outcome.",
    ["application", "outcome"],
)
REFRESHES = Counter(
    "broker_refreshes",
    "Refresh attempts by application, outcome and reason (the upstream error code, or none).",
    ["application", "outcome", "reason"],
)
UPSTREAM_SECONDS = Histogram(
    "broker_upstream_request_duration_seconds",
    "Mercado Pago request latency by application and endpoint.",
    ["application", "endpoint"],
    buckets=UPSTREAM,
)
# The Mercado Pago API proxy (service/proxy/): by the upstream route's template (ids as `{id}`).
PROXY_REQUESTS = Counter(
    "broker_proxy_requests",
    "Calls proxied to Mercado Pago's API by application, upstream route template and status "
    "(502 when no reply came, 504 when none came in time).",
    ["application", "route", "status"],
)
PROXY_SECONDS = Histogram(
    "broker_proxy_upstream_duration_seconds",
    "Proxied calls' latency until Mercado Pago's reply head, by application and route template.",
    ["application", "route"],
    buckets=UPSTREAM,
)
LEASES_TAKEN_OVER = Counter(
    "broker_leases_taken_over",
    "Leases freed because their owner's process was found dead (service/refresh/owners.py).",
)
ROTATIONS_RESTORED = Counter(
    "broker_rotations_restored",
    "Rotations stored again after a database failover lost them (service/refresh/failover.py).",
)
EVENTS_EMITTED = Counter(
    "broker_events_emitted", "Events about sellers written to the outbox.", ["application", "type"]
)
EVENT_DELIVERIES = Counter(
    "broker_event_deliveries",
    "Event delivery attempts by subscriber and outcome (delivered, retry, failed).",
    ["subscriber", "outcome"],
)
EVENT_DELIVERY_SECONDS = Histogram(
    "broker_event_delivery_duration_seconds", "Event POST latency.", buckets=UPSTREAM
)
DATABASE_UP = Gauge("broker_database_up", "1 when the last database check answered.")
READY = Gauge("broker_ready", "1 when /readyz answers 200.")
# With a key service (service/core/keys.py): its last check, and the data keys held in memory.
KEY_SERVICE_UP = Gauge("broker_key_service_up", "1 when the key service's last check answered.")
KEY_SERVICE_FAILURES = Counter(
    "broker_key_service_failures", "Failed key service checks, by reason.", ["reason"]
)
DATA_KEYS = Gauge("broker_data_keys", "Data keys this process holds (unwrapped, in memory).")
SELLERS = Gauge("broker_sellers", "Sellers by application and status.", ["application", "status"])
EXPIRING = Gauge(
    "broker_tokens_expiring",
    "Linked sellers whose token lapses within a window, by application.",
    ["application", "within"],
)
AT_RISK = Gauge(
    "broker_sellers_at_risk",
    "Sellers whose token lapses within BROKER_EXPIRING_SOON_DAYS and cannot be refreshed "
    "(relink required, or refresh failing), by application.",
    ["application"],
)
REFRESHER_LAG = Gauge(
    "broker_refresher_lag_seconds",
    "Now minus the oldest due next_refresh_at (0 when none), by application.",
    ["application"],
)
REFRESH_BACKLOG = Gauge(
    "broker_refresh_backlog",
    "Linked sellers due for a refresh now, by application.",
    ["application"],
)
OUTBOX_BACKLOG = Gauge("broker_outbox_backlog", "Event deliveries pending.")
OUTBOX_OLDEST = Gauge(
    "broker_outbox_oldest_age_seconds", "Age of the oldest event still pending delivery."
)
OUTBOX_FAILED = Gauge("broker_outbox_failed", "Event deliveries parked as failed.")
BREAKERS_OPEN = Gauge(
    "broker_breakers_open", "1 while the application's refresh breaker is open.", ["application"]
)
REFRESH_PAUSED = Gauge("broker_refresh_paused", "1 while an operator paused all refreshing.")

STATUSES = tuple(Status)


def queue_query(client_id: str, now: datetime) -> Select[datetime | None, int]:
    """An application's earliest next_refresh_at and how many are due now, in one round trip
    (the gauges, `GET /applications`). Both read its part of the work-queue index
    (client_id, next_refresh_at) WHERE status = 'linked': no scan."""
    queue = (Seller.status == Status.LINKED) & (Seller.client_id == client_id)
    earliest = select(func.min(Seller.next_refresh_at)).where(queue).scalar_subquery()
    due = select(func.count()).where(queue, Seller.next_refresh_at <= now).scalar_subquery()
    return select(earliest, due)


async def collect_database_gauges(
    session: AsyncSession, now: datetime, at_risk_days: float, apps: Applications
) -> None:
    """The gauges about stored state: a handful of aggregate queries, run periodically."""
    linked = Seller.status == Status.LINKED
    horizon = now + timedelta(days=at_risk_days)
    counts = (
        await session.execute(
            select(
                Seller.client_id,
                Seller.status,
                func.count(),
                func.count().filter(linked, Seller.expires_at < now + timedelta(days=7)),
                func.count().filter(linked, Seller.expires_at < now + timedelta(days=30)),
                func.count().filter(
                    Seller.status != Status.UNLINKED,
                    Seller.expires_at > now,
                    Seller.expires_at < horizon,
                    (Seller.status == Status.RELINK_REQUIRED) | (Seller.refresh_failures > 0),
                ),
            ).group_by(Seller.client_id, Seller.status)
        )
    ).all()

    # Every configured application shows, with zeros, before it links anyone.
    def zero() -> dict[str, Any]:
        return {"sellers": dict.fromkeys(STATUSES, 0), "7d": 0, "30d": 0, "at_risk": 0}

    by_app = {name: zero() for name in apps}
    for client_id, status, total, seven, thirty, risky in counts:
        name = apps.name_of(client_id)
        tally = by_app.setdefault(name, zero())
        tally["sellers"][status] = total
        tally["7d"] += seven
        tally["30d"] += thirty
        tally["at_risk"] += risky
    for name, tally in by_app.items():
        for status, total in tally["sellers"].items():
            SELLERS.labels(name, status).set(total)
        EXPIRING.labels(name, "7d").set(tally["7d"])
        EXPIRING.labels(name, "30d").set(tally["30d"])
        AT_RISK.labels(name).set(tally["at_risk"])

    for app in apps.values():
        oldest_due, backlog = (await session.execute(queue_query(app.client_id, now))).one()
        lag = max(0.0, (now - oldest_due).total_seconds()) if oldest_due else 0.0
        REFRESHER_LAG.labels(app.name).set(lag)
        REFRESH_BACKLOG.labels(app.name).set(backlog)

    pending, oldest = (
        await session.execute(
            select(func.count(), func.min(Event.created_at))
            .select_from(EventDelivery)
            .join(Event, Event.id == EventDelivery.event_id)
            .where(EventDelivery.state == DeliveryState.PENDING)
        )
    ).one()
    OUTBOX_BACKLOG.set(pending)
    OUTBOX_OLDEST.set(max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
    OUTBOX_FAILED.set(
        await session.scalar(
            select(func.count()).where(EventDelivery.state == DeliveryState.FAILED)
        )
        or 0
    )
    tripped = set(await session.scalars(select(AppBreaker.client_id)))
    for app in apps.values():
        BREAKERS_OPEN.labels(app.name).set(1 if app.client_id in tripped else 0)
    paused = await session.scalar(select(func.count()).select_from(RefreshPause))
    REFRESH_PAUSED.set(1 if paused else 0)
