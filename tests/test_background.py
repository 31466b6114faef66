"""The process's loops: one that ends by itself is named, and stops the process after the same
shutdown as a signal would."""

from __future__ import annotations

import asyncio
import logging

import pytest

from service.core.config import Settings
from service.core.runtime import Runtime
from service.lifecycle.events import Dispatcher
from service.ops import observe
from service.ops.background import Background, refresher_of


async def test_a_loop_that_ends_by_itself_is_logged_by_name_and_raised(
    settings: Settings,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(self: Dispatcher, stop: asyncio.Event, poll_seconds: float = 1.0) -> None:
        raise RuntimeError("a bug in the loop")

    monkeypatch.setattr(Dispatcher, "run", broken)
    rt = await Runtime.build(settings, database_url, application_name="broker-refresher")
    background = Background(rt, refresher_of(rt), observe.Health(30.0), api=False)
    with caplog.at_level(logging.ERROR, logger="broker"), pytest.raises(RuntimeError, match="bug"):
        await asyncio.wait_for(background.wait(), 10)
    took = await background.stop()
    assert took < settings.broker_shutdown_seconds
    crashed = [r for r in caplog.records if r.getMessage() == "background.loop_crashed"]
    assert [r.fields for r in crashed] == [{"loop": "events", "error": "RuntimeError"}]  # type: ignore[attr-defined]
    assert all(task.done() for task in background.loops)  # the others stopped with it
