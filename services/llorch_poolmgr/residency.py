"""Unloading a pool's engines when the scheduler asks (issue 13: on-demand residency).

The scheduler decides every load and unload; the pool manager never swaps a pool by itself. A load is
``Resume`` (it starts a Stopped pool's engines, behind the usual VRAM/RAM preload check); an unload is
:meth:`Residency.unload`. Busy work is never evicted: an unload is refused while any replica of the pool
runs a task, even when the scheduler raced a dispatch. Otherwise every replica refuses new Starts first
(a Start that races the unload gets ``accepted=false``, which the scheduler re-queues), then the engines
stop; their GPU reservations go with them. The replicas stay ``Stopped`` until the next ``Resume``.

Loads and unloads of one pool take turns (:meth:`Residency.lock`): a ``Resume`` that arrives while the
engines are stopping waits until they have, instead of starting a second run of the same replica.
"""

from __future__ import annotations

import asyncio
import logging

from .reload import Runner
from .service import Pools
from .supervisor import Replica, ReplicaState
from .telemetry import Telemetry

log = logging.getLogger(__name__)


class Residency:
    """Unloads of this manager's pools, one at a time per pool (with the pool's loads)."""

    def __init__(self, pools: Pools, runner: Runner) -> None:
        self.pools = pools
        self.runner = runner
        self._locks: dict[str, asyncio.Lock] = {}

    def lock(self, pool_id: str) -> asyncio.Lock:
        """The lock that a load (Resume) and an unload of ``pool_id`` hold."""
        return self._locks.setdefault(pool_id, asyncio.Lock())

    def _replicas(self, pool_id: str) -> tuple[str, list[Replica]] | None:
        """(model id, replicas) of ``pool_id`` now (a reload may have swapped them), or None."""
        return next(((cfg.model, r) for cfg, _, r in self.pools.pools if cfg.id == pool_id), None)

    async def unload(self, pool_id: str, reason: str) -> bool | None:
        """Stop ``pool_id``'s engines: True once they have stopped (at once for a pool already
        Stopped), False (nothing changed) while a task runs on one of its replicas, None for an
        unknown pool. ``reason`` (idle, evicted) goes into the log line."""
        if self._replicas(pool_id) is None:
            return None
        async with self.lock(pool_id):
            found = self._replicas(pool_id)
            if found is None:
                return None
            model_id, replicas = found
            busy = sum(len(r.running) for r in replicas)
            if busy:
                log.info(
                    "unload refused: tasks running",
                    extra={"event": "unload_refused", "pool_id": pool_id, "reason": reason, "tasks": busy},
                )
                return False
            loaded = any(r.state != ReplicaState.STOPPED for r in replicas)  # else: log no unload
            # No await between the check above and this: no Start can slip in between.
            drained = [r.draining for r in replicas]
            for replica in replicas:
                replica.draining = True  # Executor.try_start refuses a draining replica
            for replica in replicas:
                await self.runner.stop(replica)  # the run loop's end releases its GPU reservation
            for replica, was in zip(replicas, drained, strict=True):
                replica.draining = was  # an operator's drain outlives the unload; Resume undoes it
                replica.state = ReplicaState.STOPPED
                replica.watcher.telemetry = Telemetry()  # a stopped engine uses no memory
                replica.on_change()
        if loaded:
            log.info(
                "model unloaded",
                extra={"event": "model_unloaded", "pool_id": pool_id, "model_id": model_id, "reason": reason},
            )
        return True
