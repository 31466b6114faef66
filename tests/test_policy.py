"""The refresh schedule and backoff: pure functions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from service.core.config import Settings
from service.refresh.policy import backoff, next_refresh_at

ISSUED = datetime(2026, 1, 1, tzinfo=UTC)
DAY = 24 * 3600


def settings(**overrides: object) -> Settings:
    return Settings(_env_file=None, **overrides)  # type: ignore[arg-type]


def test_a_180_day_token_is_due_about_150_days_in_and_jitter_only_moves_it_earlier() -> None:
    config = settings()
    target = ISSUED + timedelta(days=150)
    spread = ISSUED + timedelta(seconds=180 * DAY * (5 / 6 - config.broker_refresh_jitter_fraction))
    due = [next_refresh_at(ISSUED, 180 * DAY, config) for _ in range(500)]
    assert all(spread <= d <= target for d in due)
    assert len(set(due)) > 400  # spread out, not one thundering instant


def test_a_six_hour_token_is_refreshed_after_about_five_hours() -> None:
    due = next_refresh_at(ISSUED, 6 * 3600, settings())
    assert ISSUED + timedelta(hours=4, minutes=50) <= due <= ISSUED + timedelta(hours=5)


@pytest.mark.parametrize("expires_in", [1, 30, 120, 600])
def test_a_short_lived_token_never_comes_due_at_once(expires_in: int) -> None:
    config = settings(broker_refresh_jitter_fraction=0.1)
    due = next_refresh_at(ISSUED, expires_in, config)
    floor = min(config.broker_refresh_floor_seconds, expires_in * 5 / 6)
    assert due >= ISSUED + timedelta(seconds=floor)
    assert due < ISSUED + timedelta(seconds=expires_in)


def test_backoff_grows_exponentially_within_its_cap() -> None:
    for step, ceiling in [(0, 30), (1, 60), (2, 120), (3, 240), (10, 3600), (10**6, 3600)]:
        delays = [backoff(step, 30, 3600).total_seconds() for _ in range(100)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)


def test_a_lease_shorter_than_the_request_deadline_is_refused() -> None:
    with pytest.raises(ValueError, match="BROKER_LEASE_SECONDS"):
        settings(broker_lease_seconds=12, mp_timeout_seconds=10)
