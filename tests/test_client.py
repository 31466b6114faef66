"""The internal services' client (clients/python) against the real broker and simulator on
loopback. Requests are counted by a transport wrapped around httpx's real one: counted, not
faked."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from mp_broker import (
    AsyncBrokerClient,
    BrokerClient,
    CachePolicy,
    Forbidden,
    InvalidRequest,
    MercadoPagoAuth,
    RateLimited,
    RelinkRequired,
    RetryBudget,
    RetryPolicy,
    SellerNotFound,
    Token,
    TokenWarning,
    Unauthorized,
    Unavailable,
)
from mp_broker.cache import TokenCache

from tests.support import (
    ROOT,
    Broker,
    FakeClock,
    SellerBrowser,
    Simulator,
    bound_socket,
    new_key,
)

SELLER = "acme/s-1"
USER = 241983636
MONTH = 30 * 24 * 3600
TOKEN_READ = ("GET", f"/sellers/{SELLER}/token")
REPORT = ("POST", f"/sellers/{SELLER}/token/invalid")


class Counting(httpx.AsyncBaseTransport):
    """httpx's own transport, counting each (method, path) it is asked to send."""

    def __init__(self, before_sending: Callable[[], None] = lambda: None) -> None:
        self.real = httpx.AsyncHTTPTransport()
        self.sent: Counter[tuple[str, str]] = Counter()
        self.bearers: list[str] = []
        self.before_sending = before_sending

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.before_sending()
        self.sent[request.method, request.url.path] += 1
        self.bearers.append(request.headers.get("authorization", ""))
        return await self.real.handle_async_request(request)

    async def aclose(self) -> None:
        await self.real.aclose()


class CountingSync(httpx.BaseTransport):
    def __init__(self) -> None:
        self.real = httpx.HTTPTransport()
        self.sent: Counter[tuple[str, str]] = Counter()
        self._lock = threading.Lock()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self.sent[request.method, request.url.path] += 1
        return self.real.handle_request(request)

    def close(self) -> None:
        self.real.close()


class Clock:
    """The client's clock (seconds since the epoch), moved by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def on_clock(
    broker: Broker, counting: Counting, clock: Clock, cache: CachePolicy | None = None
) -> AsyncBrokerClient:
    return AsyncBrokerClient(
        broker.url, broker.api_key, transport=counting, cache=cache or CachePolicy(), clock=clock
    )


def own_budget() -> RetryPolicy:
    """The default policy with a budget of its own: one test's failures never spend
    another's (the default budget is the whole process's)."""
    return RetryPolicy(budget=RetryBudget())


async def link(broker: Broker, seller_id: str = SELLER, user_id: int = USER) -> None:
    async with SellerBrowser() as browser:
        page = await browser.link(await broker.start_link(seller_id), user_id=user_id)
    assert page.status_code == 200, page.text


@pytest.fixture
def counting() -> Counting:
    return Counting()


@pytest.fixture
async def client(broker: Broker, counting: Counting) -> AsyncIterator[AsyncBrokerClient]:
    async with AsyncBrokerClient(
        broker.url, broker.api_key, transport=counting, retry=own_budget()
    ) as client:
        yield client


@pytest.fixture
def sync_client(broker: Broker) -> Iterator[tuple[BrokerClient, CountingSync]]:
    counting = CountingSync()
    with BrokerClient(broker.url, broker.api_key, transport=counting, retry=own_budget()) as client:
        yield client, counting


# -- reading a token ---------------------------------------------------------------------------


async def test_a_token_read_answers_the_typed_fields_and_its_repr_hides_the_token(
    broker: Broker, client: AsyncBrokerClient
) -> None:
    await link(broker)
    served = (await broker.token(SELLER)).json()
    token = await client.token(SELLER)
    assert token.access_token == served["access_token"]
    assert token.expires_at == datetime.fromisoformat(served["expires_at"])
    assert token.expires_at.tzinfo is not None
    assert token.expires_at > datetime.now(UTC) + timedelta(days=100)
    assert (token.mp_user_id, token.live_mode, token.scope) == (
        USER,
        served["live_mode"],
        served["scope"],
    )
    assert isinstance(token.live_mode, bool)
    assert token.warning is None
    assert token.access_token not in repr(token)
    assert "access_token='***'" in repr(token)


async def test_the_sync_client_reads_the_same_token(
    broker: Broker, sync_client: tuple[BrokerClient, CountingSync]
) -> None:
    await link(broker)
    client, _ = sync_client
    served = (await broker.token(SELLER)).json()
    token = await asyncio.to_thread(client.token, SELLER)
    assert token.access_token == served["access_token"]
    with pytest.raises(SellerNotFound):
        await asyncio.to_thread(client.token, "nobody")


# -- each refusal, as its type ---------------------------------------------------------------


async def test_an_unknown_seller_raises_seller_not_found(client: AsyncBrokerClient) -> None:
    with pytest.raises(SellerNotFound) as raised:
        await client.token("acme/nobody")
    assert (raised.value.status, raised.value.code) == (404, "seller_not_found")
    assert raised.value.detail


async def test_an_unknown_api_key_raises_unauthorized(broker: Broker) -> None:
    async with AsyncBrokerClient(broker.url, "mpb_00000000_" + "A" * 43) as stranger:
        with pytest.raises(Unauthorized) as raised:
            await stranger.token(SELLER)
    assert (raised.value.status, raised.value.code) == (401, "unauthorized")


async def test_a_key_without_tokens_read_raises_forbidden(
    broker: Broker, database_url: str
) -> None:
    await link(broker)
    key = await new_key(database_url, scopes=("links:write",))
    async with AsyncBrokerClient(broker.url, key) as linker:
        with pytest.raises(Forbidden) as raised:
            await linker.token(SELLER)
    assert (raised.value.status, raised.value.code) == (403, "forbidden")


async def test_a_seller_to_relink_raises_relink_required_with_its_reason(
    broker: Broker, client: AsyncBrokerClient, sql: asyncpg.Connection
) -> None:
    await link(broker)
    await sql.execute(
        "UPDATE sellers SET status = 'relink_required', status_reason = 'revoked',"
        " expires_at = now() - interval '1 minute', next_refresh_at = NULL"
    )
    with pytest.raises(RelinkRequired) as raised:
        await client.token(SELLER)
    assert (raised.value.status, raised.value.code, raised.value.reason) == (
        409,
        "relink_required",
        "revoked",
    )


async def test_a_min_ttl_beyond_the_brokers_cap_raises_invalid_request(
    broker: Broker, client: AsyncBrokerClient
) -> None:
    await link(broker)
    with pytest.raises(InvalidRequest) as raised:
        await client.token(SELLER, min_ttl=broker.settings.broker_min_ttl_max_seconds + 1)
    assert (raised.value.status, raised.value.code) == (422, "invalid_request")


@pytest.mark.parametrize("seller_id", ["../link/start", "a//b", "a?min_ttl=1", "", "x" * 129])
async def test_a_seller_id_the_broker_would_refuse_is_refused_before_sending(
    client: AsyncBrokerClient, counting: Counting, seller_id: str
) -> None:
    with pytest.raises(InvalidRequest):
        await client.token(seller_id)
    assert not counting.sent


@pytest.mark.parametrize("settings_overrides", [{"broker_rate_limit_per_key_per_second": 1}])
async def test_a_rate_limited_read_raises_rate_limited_with_retry_after(broker: Broker) -> None:
    async with AsyncBrokerClient(
        broker.url, broker.api_key, retry=RetryPolicy(attempts=1, budget=RetryBudget())
    ) as client:
        with pytest.raises(SellerNotFound):
            await client.token("acme/nobody")  # takes the second's one request
        with pytest.raises(RateLimited) as raised:
            await client.token("acme/nobody")
    assert (raised.value.status, raised.value.code) == (429, "rate_limited")
    assert raised.value.retry_after == 1


# -- the cache ---------------------------------------------------------------------------------


async def test_a_second_read_is_answered_from_the_cache(
    broker: Broker, client: AsyncBrokerClient, counting: Counting
) -> None:
    await link(broker)
    first = await client.token(SELLER)
    assert await client.token(SELLER) is first
    assert counting.sent[TOKEN_READ] == 1


async def test_a_min_ttl_longer_than_the_cached_token_lasts_asks_the_broker(
    broker: Broker, counting: Counting
) -> None:
    await link(broker)
    clock = Clock()
    held_long = CachePolicy(max_age_seconds=365 * 24 * 3600)
    async with on_clock(broker, counting, clock, held_long) as client:
        token = await client.token(SELLER)
        clock.now = token.expires_at.timestamp() - MONTH - 10  # a month and 10 s left
        await client.token(SELLER, min_ttl=MONTH)
        assert counting.sent[TOKEN_READ] == 1
        clock.now += 20
        await client.token(SELLER, min_ttl=MONTH)
        assert counting.sent[TOKEN_READ] == 2


async def test_a_token_about_to_expire_or_held_too_long_is_read_again(
    broker: Broker, counting: Counting
) -> None:
    await link(broker)
    clock = Clock()
    policy = CachePolicy(max_age_seconds=300, margin_seconds=60)
    async with on_clock(broker, counting, clock, policy) as client:
        token = await client.token(SELLER)
        clock.now += 299
        await client.token(SELLER)
        assert counting.sent[TOKEN_READ] == 1
        clock.now += 2  # held 301 s: the broker is asked again
        await client.token(SELLER)
        assert counting.sent[TOKEN_READ] == 2
        clock.now = token.expires_at.timestamp() - 59  # inside the margin
        await client.token(SELLER)
        assert counting.sent[TOKEN_READ] == 3


async def test_a_token_with_a_warning_keeps_it_and_is_cached_briefly(
    broker: Broker,
    simulator: Simulator,
    clock: FakeClock,
    counting: Counting,
) -> None:
    await link(broker)
    await simulator.http.post("/_control/revoke", json={"user_id": USER})
    clock.advance(days=160)
    assert (await broker.token(SELLER, min_ttl=MONTH)).status_code == 409  # found revoked
    ours = Clock()
    async with on_clock(broker, counting, ours) as client:
        assert (await client.token(SELLER)).warning == TokenWarning.RELINK_REQUIRED
        ours.now += 29
        assert (await client.token(SELLER)).warning == TokenWarning.RELINK_REQUIRED
        assert counting.sent[TOKEN_READ] == 1
        ours.now += 2
        await client.token(SELLER)
        assert counting.sent[TOKEN_READ] == 2


def test_the_cache_keeps_only_the_most_recently_used_sellers() -> None:
    cache = TokenCache(CachePolicy(size=2))
    token = Token("t", datetime.now(UTC) + timedelta(days=1), 1, True, "read", None)
    for seller_id in ("a", "b"):
        cache.put(seller_id, token)
    assert cache.get("a", 0) is token  # now "b" is the least recently used
    cache.put("c", token)
    assert len(cache) == 2
    assert cache.get("b", 0) is None
    assert cache.get("a", 0) is token
    assert cache.get("c", 0) is token


# -- one request for many callers ------------------------------------------------------------


async def test_a_hundred_concurrent_reads_of_one_seller_make_one_request(
    broker: Broker, client: AsyncBrokerClient, counting: Counting
) -> None:
    await link(broker)
    tokens = await asyncio.gather(*(client.token(SELLER) for _ in range(100)))
    assert len({t.access_token for t in tokens}) == 1
    assert counting.sent[TOKEN_READ] == 1


async def test_concurrent_reads_from_threads_make_one_request(
    broker: Broker, sync_client: tuple[BrokerClient, CountingSync]
) -> None:
    await link(broker)
    client, counting = sync_client
    threads = 32
    start = threading.Barrier(threads)

    def read(_: int) -> Token:
        start.wait(timeout=10)
        return client.token(SELLER)

    def read_all() -> list[Token]:
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(read, range(threads)))

    tokens = await asyncio.to_thread(read_all)
    assert len({t.access_token for t in tokens}) == 1
    assert counting.sent[TOKEN_READ] == 1


async def test_callers_that_joined_a_failing_read_get_its_error_without_asking_again(
    broker: Broker, client: AsyncBrokerClient, counting: Counting
) -> None:
    results = await asyncio.gather(
        *(client.token("acme/nobody") for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, SellerNotFound) for r in results)
    assert counting.sent["GET", "/sellers/acme/nobody/token"] == 1


# -- retries -----------------------------------------------------------------------------------


@pytest.fixture
async def due(
    broker: Broker, clock: FakeClock
) -> AsyncIterator[tuple[AsyncBrokerClient, Counting]]:
    """A seller due for refresh (a read with min_ttl refreshes first), and a client whose every
    send moves the broker's fake clock on by a second, as real time does: the broker refreshes
    on read again only once a moment has passed since its last attempt."""
    await link(broker)
    clock.advance(days=160)
    counting = Counting(before_sending=lambda: clock.advance(seconds=1))
    async with AsyncBrokerClient(
        broker.url, broker.api_key, transport=counting, retry=own_budget()
    ) as client:
        yield client, counting


@pytest.mark.parametrize("settings_overrides", [{"broker_on_read_cooldown_seconds": 0}])
async def test_a_503_is_sent_again_after_its_retry_after_and_then_served(
    due: tuple[AsyncBrokerClient, Counting], simulator: Simulator, clock: FakeClock
) -> None:
    client, counting = due
    await simulator.faults(status=500, count=1)  # the first refresh fails: a 503
    started = time.monotonic()
    token = await client.token(SELLER, min_ttl=MONTH)
    assert time.monotonic() - started >= 1.0  # the broker's Retry-After: 1
    assert counting.sent[TOKEN_READ] == 2
    assert token.expires_at > clock.now + timedelta(days=170)


@pytest.mark.parametrize("settings_overrides", [{"broker_on_read_cooldown_seconds": 0}])
async def test_a_broker_that_keeps_answering_503_is_asked_three_times_at_most(
    due: tuple[AsyncBrokerClient, Counting], simulator: Simulator
) -> None:
    client, counting = due
    await simulator.faults(status=500)
    started = time.monotonic()
    with pytest.raises(Unavailable) as raised:
        await client.token(SELLER, min_ttl=MONTH)
    assert (raised.value.status, raised.value.code) == (503, "upstream_unavailable")
    assert raised.value.retry_after == 1
    assert counting.sent[TOKEN_READ] == 3
    assert time.monotonic() - started >= 2.0  # Retry-After honoured before each retry
    assert len([e for e in await simulator.log() if e["grant_type"] == "refresh_token"]) == 3


@pytest.mark.parametrize("settings_overrides", [{"broker_rate_limit_per_key_per_second": 1}])
async def test_a_rate_limited_read_is_sent_again_after_retry_after(
    broker: Broker, client: AsyncBrokerClient, counting: Counting
) -> None:
    with pytest.raises(SellerNotFound):
        await client.token("acme/nobody")
    started = time.monotonic()
    with pytest.raises(SellerNotFound):  # the broker's answer once it let us in again
        await client.token("acme/other")
    assert time.monotonic() - started >= 1.0
    assert counting.sent["GET", "/sellers/acme/other/token"] == 2


def refused_url() -> str:
    """A loopback port bound but not listening: every connection is refused."""
    sock = bound_socket()
    host, port = sock.getsockname()
    sock.close()
    return f"http://{host}:{port}"


async def test_a_refused_connection_is_tried_three_times_then_raises_unavailable(
    counting: Counting,
) -> None:
    async with AsyncBrokerClient(
        refused_url(), "key", transport=counting, retry=own_budget()
    ) as client:
        with pytest.raises(Unavailable) as raised:
            await client.token(SELLER)
    assert (raised.value.status, raised.value.code) == (None, "broker_unreachable")
    assert isinstance(raised.value.__cause__, httpx.ConnectError)
    assert counting.sent[TOKEN_READ] == 3


async def test_many_callers_failing_at_once_share_one_retry_budget(counting: Counting) -> None:
    budget = RetryBudget(capacity=10)
    async with AsyncBrokerClient(
        refused_url(), "key", transport=counting, retry=RetryPolicy(budget=budget)
    ) as client:
        results = await asyncio.gather(
            *(client.token(f"acme/s-{n}") for n in range(50)), return_exceptions=True
        )
    assert all(isinstance(r, Unavailable) for r in results)
    assert sum(counting.sent.values()) == 50 + 10  # each once, and only 10 retries in all


# -- MercadoPagoAuth ---------------------------------------------------------------------------


@pytest.fixture
async def mercado_pago(
    simulator: Simulator, client: AsyncBrokerClient
) -> AsyncIterator[tuple[httpx.AsyncClient, Counting]]:
    """Mercado Pago's API (the simulator's /users/me checks bearer tokens), with the Auth."""
    counting = Counting()
    async with httpx.AsyncClient(
        base_url=simulator.url, auth=MercadoPagoAuth(client, SELLER), transport=counting
    ) as api:
        yield api, counting


async def test_a_401_from_mercado_pago_reports_the_token_and_a_revoked_seller_must_relink(
    broker: Broker,
    simulator: Simulator,
    client: AsyncBrokerClient,
    counting: Counting,
    mercado_pago: tuple[httpx.AsyncClient, Counting],
    sql: asyncpg.Connection,
) -> None:
    api, sent_to_mp = mercado_pago
    await link(broker)
    assert (await api.get("/users/me")).json()["id"] == USER
    await simulator.http.post("/_control/revoke", json={"user_id": USER})
    assert (await api.get("/users/me")).status_code == 401
    # The broker still hands out the same token (valid until it expires): not sent again.
    assert sent_to_mp.sent["GET", "/users/me"] == 2
    assert counting.sent[REPORT] == 1
    row = await sql.fetchrow("SELECT status, status_reason FROM sellers")
    assert row is not None
    assert (row["status"], row["status_reason"]) == ("relink_required", "revoked")
    assert (await client.token(SELLER)).warning == TokenWarning.RELINK_REQUIRED


async def test_a_401_for_a_token_the_broker_still_trusts_is_not_sent_again(
    broker: Broker,
    simulator: Simulator,
    counting: Counting,
    mercado_pago: tuple[httpx.AsyncClient, Counting],
    sql: asyncpg.Connection,
) -> None:
    api, sent_to_mp = mercado_pago
    await link(broker)
    await simulator.faults(users_me_status=401)

    async def heal(response: httpx.Response) -> None:
        if response.status_code == 401:  # only our call fails: the broker's check passes
            await simulator.faults()

    api.event_hooks["response"] = [heal]
    assert (await api.get("/users/me")).status_code == 401
    assert sent_to_mp.sent["GET", "/users/me"] == 1
    assert counting.sent[REPORT] == 1
    assert await sql.fetchval("SELECT status FROM sellers") == "linked"


async def test_a_401_after_the_seller_linked_again_is_sent_once_more_with_the_new_token(
    broker: Broker,
    simulator: Simulator,
    client: AsyncBrokerClient,
    mercado_pago: tuple[httpx.AsyncClient, Counting],
) -> None:
    api, sent_to_mp = mercado_pago
    await link(broker)
    old = await client.token(SELLER)  # cached, then revoked and replaced behind our back
    await simulator.http.post("/_control/revoke", json={"user_id": USER})
    await link(broker)
    reply = await api.get("/users/me")
    assert reply.status_code == 200
    new = (await broker.token(SELLER)).json()["access_token"]
    assert sent_to_mp.bearers == [f"Bearer {old.access_token}", f"Bearer {new}"]


async def test_the_auth_serves_httpx_client_through_the_sync_client(
    broker: Broker, simulator: Simulator, sync_client: tuple[BrokerClient, CountingSync]
) -> None:
    await link(broker)
    client, _ = sync_client

    def who_am_i() -> Any:
        with httpx.Client(base_url=simulator.url, auth=MercadoPagoAuth(client, SELLER)) as api:
            return api.get("/users/me").json()["id"]

    assert await asyncio.to_thread(who_am_i) == USER


def test_the_client_installs_with_pip_from_the_repository_path_with_httpx_alone(
    tmp_path: Path,
) -> None:
    # Into a directory of its own (not the dev install's editable copy), built as pip builds
    # any source tree: setuptools fetched into an isolated build environment.
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target"]
    subprocess.run([*pip, str(target), str(ROOT / "clients" / "python")], check=True, timeout=180)  # noqa: S603
    installed = target / "mp_broker"
    assert (installed / "py.typed").is_file()  # the types ship with it
    (metadata,) = target.glob("mp_token_broker_client-*.dist-info/METADATA")
    requires = [
        line for line in metadata.read_text().splitlines() if line.startswith("Requires-Dist")
    ]
    assert requires == ["Requires-Dist: httpx<1,>=0.27"]
    probe = "import mp_broker, sys; print(mp_broker.__file__); print('service' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(target)}
    out = subprocess.run(  # noqa: S603
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, env=env
    ).stdout.split()
    assert out == [str(installed / "__init__.py"), "False"]  # nothing of the broker's server
