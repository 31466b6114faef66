"""Fuzzing: requests generated from the committed OpenAPI document, sent to a real broker, never
get a 5xx nor an answer that breaks the document (status, media type, headers, body schema).

Schemathesis builds Hypothesis strategies from `openapi/openapi.json`, positive and negative
data, for every operation. Bounded and derandomized, so `make test` stays quick and a failure
reproduces; `FUZZ_MAX_EXAMPLES=1000` digs deeper by hand. Hypothesis is synchronous: it runs in
a worker thread while the test's event loop keeps serving the broker. No database reset between
examples: what one request stores, the next ones meet.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import Any

import asyncpg
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode
from schemathesis.checks import CheckFunction
from schemathesis.core.failures import FailureGroup
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.core.config import Settings
from service.linking.routes import COOKIE
from tests.support import ROOT, Broker, SellerBrowser, Simulator, query_of, seed_sellers

DOCUMENT = ROOT / "openapi" / "openapi.json"
MAX_EXAMPLES = int(os.environ.get("FUZZ_MAX_EXAMPLES", "100"))  # per operation

CHECKS: list[CheckFunction] = [
    schemathesis.checks.not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]

# A 429 is a limit doing its job, not a bug: raise the limits out of the fuzzer's reach.
pytestmark = [
    pytest.mark.fuzz,
    pytest.mark.parametrize(
        "settings_overrides",
        [
            {
                "broker_rate_limit_per_address_per_minute": 1_000_000,
                "broker_rate_limit_per_key_per_second": 1_000_000,
            }
        ],
    ),
]


def fuzz(
    base_url: str,
    *,
    api_key: str | None = None,
    path_parameters: Mapping[str, str] | None = None,
    query: Mapping[str, str] | None = None,
    cookies: Mapping[str, str] | None = None,
) -> list[str]:
    """Every distinct failure the checks find, each with a curl command that reproduces it.

    With `api_key`, only the operations that take one, always with it; else every operation,
    with whatever `authorization` the document lets the fuzzer make up. `path_parameters` and
    `query` are real values (a linked seller, a live link): one more strategy, with them fixed,
    for each operation that has such a parameter.
    """
    schema = schemathesis.openapi.from_path(DOCUMENT)
    schema.config.update(base_url=base_url)
    failures: dict[str, str] = {}
    with requests.Session() as session:
        for result in schema.get_all_operations():
            if isinstance(result, Err):
                pytest.fail(f"{DOCUMENT} has an operation schemathesis cannot use: {result.err()}")
            operation = result.ok()
            takes_key = operation.get_parameter("authorization", "header") is not None
            if api_key is not None and not takes_key:
                continue
            headers = {"authorization": f"Bearer {api_key}"} if api_key is not None else None
            strategies = [operation.as_strategy(mode, headers=headers) for mode in GenerationMode]
            in_path = {p.name for p in operation.path_parameters}
            in_query = {p.name for p in operation.query}
            known_path = {k: v for k, v in (path_parameters or {}).items() if k in in_path}
            known_query = {k: v for k, v in (query or {}).items() if k in in_query}
            if known_path or known_query:
                strategies.append(
                    operation.as_strategy(
                        headers=headers, path_parameters=known_path, query=known_query
                    )
                )

            @given(case=st.one_of(strategies))
            @settings(
                max_examples=MAX_EXAMPLES,
                deadline=None,
                database=None,
                derandomize=True,
                suppress_health_check=list(HealthCheck),
            )
            def send(case: Case[Any]) -> None:
                try:
                    case.call_and_validate(
                        session=session, checks=CHECKS, cookies=dict(cookies or {})
                    )
                except FailureGroup as group:
                    # Keep going: one run lists every distinct failure, each with the
                    # shortest reproduction seen.
                    report = str(group)
                    for failure in group.exceptions:
                        key = f"{case.operation.label}: {failure.title}: {failure.message}"
                        if key not in failures or len(report) < len(failures[key]):
                            failures[key] = report

            send()
    return [f"{key}\n{report}" for key, report in sorted(failures.items())]


async def test_any_caller_gets_no_5xx_and_only_answers_the_document_describes(
    broker: Broker,
) -> None:
    """Every operation, as callers without a valid key and sellers' browsers see them."""
    live_link = await broker.start_link("fuzz/live-link")
    async with SellerBrowser() as browser:
        callback = query_of(await browser.authorize(await broker.start_link("fuzz/callback")))
        binder = browser.http.cookies[COOKIE]
    # The seller's browser cookie goes with every request, so the known state can complete.
    failures = await asyncio.to_thread(
        fuzz,
        broker.url,
        path_parameters={"token": live_link.rsplit("/", 1)[-1]},
        query={"state": callback["state"], "code": callback["code"]},
        cookies={COOKIE: binder},
    )
    assert not failures, "\n\n".join(failures)


async def test_a_caller_with_a_valid_api_key_gets_no_5xx_and_only_documented_answers(
    broker: Broker, simulator: Simulator, settings: Settings, sql: asyncpg.Connection
) -> None:
    """The internal API with a key holding every scope, over a linked seller and unknown ones."""
    [seller_id] = await seed_sellers(sql, simulator, settings, 1, expires_in=3600, due=False)
    failures = await asyncio.to_thread(
        fuzz, broker.url, api_key=broker.api_key, path_parameters={"seller_id": seller_id}
    )
    assert not failures, "\n\n".join(failures)
