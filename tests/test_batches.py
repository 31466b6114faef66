"""Lookups of one turn of the event loop are answered by one call (service/core/batches.py)."""

from __future__ import annotations

import asyncio

import pytest

from service.core.batches import Batches


class Source:
    """A fetch that records each call's keys; `gate` holds every call until it is set."""

    def __init__(self, missing: frozenset[int] = frozenset()) -> None:
        self.calls: list[list[int]] = []
        self.missing = missing
        self.gate = asyncio.Event()
        self.gate.set()
        self.error: Exception | None = None

    async def fetch(self, keys: list[int]) -> dict[int, str]:
        self.calls.append(keys)
        await self.gate.wait()
        if self.error is not None:
            raise self.error
        return {key: f"v{key}" for key in keys if key not in self.missing}


async def turns(count: int = 5) -> None:
    """Let the loop run a few turns (the lookup's task, its send, the call's task)."""
    for _ in range(count):
        await asyncio.sleep(0)


async def test_the_lookups_of_one_turn_make_one_call_and_a_key_asked_twice_is_read_once() -> None:
    source = Source(missing=frozenset({7}))
    batches = Batches(source.fetch, most=100)
    keys = [1, 2, 3, 2, 7, 1]
    found = await asyncio.gather(*(batches.get(key) for key in keys))
    assert found == ["v1", "v2", "v3", "v2", None, "v1"]
    assert source.calls == [[1, 2, 3, 7]]
    # The next turn's lookups make the next call.
    assert await batches.get(4) == "v4"
    assert source.calls == [[1, 2, 3, 7], [4]]


async def test_a_turn_with_more_keys_than_a_call_takes_makes_several_calls() -> None:
    source = Source()
    batches = Batches(source.fetch, most=3)
    found = await asyncio.gather(*(batches.get(key) for key in range(7)))
    assert found == [f"v{key}" for key in range(7)]
    assert source.calls == [[0, 1, 2], [3, 4, 5], [6]]


async def test_lookups_while_a_call_is_out_go_in_the_next_call() -> None:
    source = Source()
    source.gate.clear()
    batches = Batches(source.fetch, most=100)
    first = asyncio.ensure_future(batches.get(1))
    await turns()
    assert source.calls == [[1]]  # out, and held
    second = asyncio.ensure_future(batches.get(1))
    await turns()
    assert source.calls == [[1], [1]]  # not joined to a read that began before it was asked
    source.gate.set()
    assert (await first, await second) == ("v1", "v1")


async def test_a_failed_call_fails_each_of_its_lookups_with_its_error() -> None:
    source = Source()
    source.error = ConnectionResetError("the database went away")
    batches = Batches(source.fetch, most=100)
    results = await asyncio.gather(*(batches.get(key) for key in (1, 2)), return_exceptions=True)
    assert [type(r) for r in results] == [ConnectionResetError, ConnectionResetError]
    source.error = None
    assert await batches.get(1) == "v1"  # nothing left behind


async def test_a_caller_who_gives_up_does_not_cancel_the_call_for_the_others() -> None:
    source = Source()
    source.gate.clear()
    batches = Batches(source.fetch, most=100)
    impatient = asyncio.ensure_future(batches.get(1))
    patient = asyncio.ensure_future(batches.get(1))
    await turns()
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    source.gate.set()
    assert await patient == "v1"
    assert source.calls == [[1]]
