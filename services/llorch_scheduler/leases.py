"""The lease sweeper: the scheduler's side of leases (the pool manager renews them, see
``llorch.store.LEASE_MS``).

A dispatched task holds a lease in its set's lease set; its pool manager renews it while the task runs.
When a lease expires and no connected pool manager reports the task running, the task ends with
WORKER_RESET; a task that was claimed but never dispatched (its record still says queued: the claimer
died, or lost Redis mid-dispatch) goes back to the head of its class instead. A drop-lru victim whose
evicting admission died before ending it is ended with QUEUE_FULL_DROP_LRU.

The sweeper is its own loop: it never dies with the dispatcher, and a Redis outage only pauses it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from llorch.resilience import Outage, until_done
from llorch.store import LEASE_MS, Store

log = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 2.0


class LeaseSweeper:
    def __init__(
        self,
        store: Store,
        running: Callable[[], frozenset[str] | set[str]],
        expire: Callable[[str, str], Awaitable[None]],
        evicted: Callable[[str, str], Awaitable[None]],
    ) -> None:
        """``running``: the task ids connected pool managers report running; ``expire(rs, task_id)``
        settles a task whose lease lapsed (requeued if never dispatched, else ended);
        ``evicted(rs, task_id)`` ends a drop-lru victim its evicting admission left unended."""
        self.store = store
        self.running = running
        self.expire = expire
        self.evicted = evicted
        self.outage = Outage("redis (lease sweeper)")

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            await until_done(self.sweep, self.outage)

    async def sweep(self) -> int:
        """End every task whose lease expired; returns how many ended."""
        running = self.running()
        ended = 0
        for rs, task_id in await self.store.expired_leases():
            if task_id in running:  # its pool manager is alive and still reports it: renewals were late
                await self.store.renew_leases({rs: [task_id]}, LEASE_MS)
                continue
            await self.expire(rs, task_id)
            ended += 1
            log.warning("lease expired", extra={"event": "lease_expired", "task_id": task_id})
        for rs, task_id in await self.store.expired_evictions():
            await self.evicted(rs, task_id)
            ended += 1
        return ended
