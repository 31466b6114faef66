"""The loops of one broker process, and its one shutdown.

`broker serve` runs them in its lifespan, `broker refresher` as the whole process: the same
runner, so both stop the same way. Shutdown is one sequence under one budget,
`BROKER_SHUTDOWN_SECONDS` (15 s), inside the 30 s that docker-compose (and Kubernetes by
default) grant after SIGTERM; in `broker serve`, uvicorn first lets requests in flight finish
for up to `REQUEST_GRACE_SECONDS` (`server.uvicorn_config`):

1. stop the loops: no new claims, no new deliveries;
2. drain: exchanges and refreshes the process owns may hold a reply Mercado Pago already
   sent, so they get to store it (a refresh's own deadline is `MP_TIMEOUT_SECONDS`);
3. give back every lease whose request was surely not sent (a replacement claims at once),
   then the owner lock: the leases left are taken over within seconds (`refresh/owners.py`);
4. flush the token-read and proxy-call counts, close the clients and pools (a statement still
   running by the end of the budget is cut off).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from service.core import keys, logs
from service.core.runtime import Runtime
from service.lifecycle.events import Dispatcher
from service.ops import observe
from service.refresh import owners
from service.refresh.engine import Refresher

log = logging.getLogger("broker")

REQUEST_GRACE_SECONDS = 10.0  # uvicorn's, before the lifespan's shutdown starts
CLOSE_RESERVE_SECONDS = 3.0  # of the budget, kept for leases, counts and pools


def refresher_of(rt: Runtime) -> Refresher:
    return Refresher(rt.settings, rt.clock, rt.db, rt.keyring, rt.upstream, rt.tasks)


class Background:
    """Starts the process's loops; `stop()` runs the shutdown sequence once."""

    def __init__(
        self, rt: Runtime, refresher: Refresher, health: observe.Health, *, api: bool
    ) -> None:
        self.rt, self.refresher, self.health = rt, refresher, health
        self.stopping = asyncio.Event()
        settings = rt.settings
        loops: dict[str, Coroutine[Any, Any, None]] = {
            "health": observe.watch(health, settings, rt.clock, rt.db.sessions, self.stopping),
            # Every process may claim leases (refresh on read): it says it is alive.
            "owner_lock": refresher.liveness.watch(self.stopping),
            "failover": refresher.failover.watch(self.stopping),
        }
        if rt.key_service is not None:
            watch = keys.KeyWatch(
                rt.keyring, rt.db.sessions, rt.key_service, settings.broker_key_check_seconds
            )
            health.keys = watch
            loops["keys"] = watch.run(self.stopping)
        if api:
            for name, counts in (("read_counts", rt.reads), ("proxy_counts", rt.proxied)):
                loops[name] = counts.run(
                    rt.db.direct, self.stopping, settings.broker_audit_flush_seconds
                )
            loops["cache_listener"] = rt.cache.listen(rt.db.url, self.stopping)
        if not api or settings.broker_serve_refresher:
            dispatcher = Dispatcher(settings, rt.clock, rt.db.sessions, rt.http)
            loops["refresher"] = refresher.run(self.stopping)
            loops["events"] = dispatcher.run(self.stopping)
            takeover = owners.Takeover(rt.db.direct, freed=refresher.wake.set)
            loops["takeover"] = takeover.run(rt.clock, self.stopping)
        self.loops = [asyncio.create_task(work, name=name) for name, work in loops.items()]
        for task in self.loops:
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            # Each loop guards its own rounds; one that still ends has a bug: say which.
            fields: dict[str, object] = {"loop": task.get_name(), "error": type(exc).__name__}
            logs.event(log, "background.loop_crashed", fields, logging.ERROR)

    async def wait(self) -> None:
        """Until a loop ends by itself (it should not: then its error is raised) or stops."""
        done, _ = await asyncio.wait(self.loops, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if not task.cancelled() and (exc := task.exception()) is not None:
                raise exc

    async def stop(self) -> float:
        """The shutdown sequence; how many seconds it took."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.rt.settings.broker_shutdown_seconds
        self.health.stopping = True  # /readyz fails at once: the balancer drains this replica
        self.stopping.set()
        await asyncio.wait(self.loops, timeout=deadline - CLOSE_RESERVE_SECONDS - loop.time())
        left = await self.rt.tasks.drain(deadline - CLOSE_RESERVE_SECONDS - loop.time())
        if left:
            logs.event(log, "shutdown.undrained", {"in_flight": left}, logging.ERROR)
        with contextlib.suppress(TimeoutError):  # a database out of reach: they lapse
            await asyncio.wait_for(
                self.refresher.release_leases(), max(deadline - 1.0 - loop.time(), 0.1)
            )
        await self.refresher.aclose()  # what it still leases is now taken over in seconds
        for task in self.loops:
            task.cancel()
        await self.rt.close(deadline - loop.time())
        took = loop.time() - started
        logs.event(log, "shutdown.done", {"seconds": round(took, 3)})
        return took
