"""Atomic reload of one pool onto another model, with rollback (SPEC §5.6 ORCH-3031, ORCH-2102).

Reloads of one pool run one at a time, first in, first out. The steps:

1. The new replicas (the next generation: their ids end ``-g<n>``) preload and self-test beside the old
   ones. When VRAM does not allow both (the new preload check reports INSUFFICIENT_VRAM), the old
   replicas drain first (:data:`DRAIN_DEADLINE_S`; tasks still running then end POOL_UNAVAILABLE) and
   stop, and the new ones start alone.
2. The swap is one step on the event loop: the pool's model, digest and replicas change together, so a
   report (and with it the scheduler's view: the pool joins the new model's replica set) never shows a
   half-switched pool. New tasks go to the new replicas from then on.
3. The old replicas take no new task; those running finish (or end at the deadline), then the old
   engines stop.

On any failure before the swap the new replicas stop, the old ones are started again if they had been
stopped, the pool keeps its model, and ``last_error`` says why (RELOAD_FAILED with ``rolled_back``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from llorch.digest import DigestCache
from llorch.errors import Code, OrchestratorError

from .drain import Drains
from .executor import Executor
from .faults import PoolError
from .service import Pools
from .supervisor import Replica, ReplicaState

log = logging.getLogger(__name__)

DRAIN_DEADLINE_S: Final = 30.0
"""SPEC §5.6: how long the old replicas' running tasks may go on after the swap (or before a stop)."""
_FAILED: Final = frozenset({ReplicaState.BACKOFF, ReplicaState.UNAVAILABLE, ReplicaState.FAILED})

MakeReplica = Callable[[Replica, str, Path, int], Replica]
"""(an old replica, the new model id, its file, the generation) → its successor."""


class Runner:
    """The run loops of the manager's replicas: started with the manager, and by reloads."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, replica: Replica) -> None:
        self._tasks[replica.replica_id] = asyncio.create_task(replica.run())

    def runs(self, replica: Replica) -> bool:
        return replica.replica_id in self._tasks

    async def stop(self, replica: Replica) -> None:
        """Cancel the replica's loop; its engine stops before this returns."""
        task = self._tasks.pop(replica.replica_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def run(self) -> None:
        """Hold the loops for the manager's lifetime; cancelling this stops every one of them."""
        try:
            await asyncio.Event().wait()
        finally:
            tasks = list(self._tasks.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class Reloaded:
    state: str
    model_ref: str
    model_digest: str
    engine_version: str


class Reloads:
    def __init__(
        self,
        pools: Pools,
        executor: Executor,
        drains: Drains,
        runner: Runner,
        digests: DigestCache,
        make: MakeReplica,
    ) -> None:
        self.pools = pools
        self.executor = executor
        self.drains = drains
        self.runner = runner
        self.digests = digests
        self.make = make
        self.generation = 0
        self._locks: dict[str, asyncio.Lock] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    async def reload(self, pool_id: str, model_ref: str, path: Path, declared: str) -> Reloaded:
        """Swap ``pool_id`` onto ``model_ref`` (the file at ``path``, whose digest must equal
        ``declared`` when one is given); raises RELOAD_FAILED (rolled back) on any failure."""
        lock = self._locks.setdefault(pool_id, asyncio.Lock())  # asyncio's lock wakes waiters FIFO
        async with lock:
            index = next((i for i, (cfg, _, _) in enumerate(self.pools.pools) if cfg.id == pool_id), None)
            if index is None:
                raise OrchestratorError(Code.NOT_FOUND, f"pool {pool_id} is unknown")
            cfg, _digest, old = self.pools.pools[index]
            started = time.monotonic()
            log.info(
                "reload started",
                extra={"event": "reload_started", "pool_id": pool_id, "from": cfg.model, "to": model_ref},
            )
            try:
                if not old:
                    raise _Failed(PoolError.PRELOAD_FAILED, f"pool {pool_id} has no replica to reload")
                digest = await self._digest(path, declared)
                new, stopped_old = await self._bring_up(pool_id, old, model_ref, path)
            except _Failed as exc:
                self._failed(pool_id, exc)
                raise OrchestratorError(
                    Code.RELOAD_FAILED,
                    f"reload of {pool_id} onto {model_ref} failed and was rolled back: {exc.message}",
                    rolled_back=True,
                    last_error={"code": exc.code.value, "message": exc.message, "at_ms": _now_ms()},
                ) from None
            new_cfg = new[0].pool
            footprint = await self.pools.sizer.measure(new_cfg, new[0].devices, path)  # facts: cached
            self.pools.pools[index] = (new_cfg, digest, new)  # the swap: one step, nothing awaits
            self.pools.footprints[pool_id] = footprint
            for replica in new:
                self.executor.replicas[replica.replica_id] = replica
            self.drains.replicas[pool_id] = new
            for replica in old:
                replica.draining = True
            self.pools.errors.pop(pool_id, None)
            self.pools.on_change()
            log.info(
                "reload swapped",
                extra={
                    "event": "reload_swapped",
                    "pool_id": pool_id,
                    "model_ref": model_ref,
                    "seconds": round(time.monotonic() - started, 3),
                },
            )
            if not stopped_old:
                retire = asyncio.create_task(self._retire(pool_id, old))
                self._retiring.add(retire)
                retire.add_done_callback(self._retiring.discard)
            return Reloaded("Ready", model_ref, digest, new[0].engine_version)

    async def _digest(self, path: Path, declared: str) -> str:
        try:
            digest = await self.digests.digest(path)
        except OSError as exc:
            raise _Failed(PoolError.MODEL_NOT_FOUND, f"cannot read {path}: {type(exc).__name__}") from None
        if declared and digest != declared:
            raise _Failed(
                PoolError.PRELOAD_FAILED, f"{path} has digest {digest}, not the declared {declared}"
            )
        return digest

    async def _bring_up(
        self, pool_id: str, old: list[Replica], model_ref: str, path: Path
    ) -> tuple[list[Replica], bool]:
        """The new replicas, Ready; and whether the old ones had to stop first."""
        failure = await self._try(old, model_ref, path)
        if isinstance(failure, list):
            return failure, False
        if failure.code != PoolError.INSUFFICIENT_VRAM.value:
            raise _Failed(_code(failure.code), failure.message)
        log.info("reload needs the old engines' VRAM", extra={"event": "reload_stop_old", "pool_id": pool_id})
        for replica in old:
            replica.draining = True
        await self._retire(pool_id, old)
        second = await self._try(old, model_ref, path)
        if isinstance(second, list):
            return second, True
        for replica in old:  # roll back: the old model comes back
            replica.draining = False
            replica.state = ReplicaState.PRELOADING
            self.runner.start(replica)
        raise _Failed(_code(second.code), second.message)

    async def _try(self, old: list[Replica], model_ref: str, path: Path) -> list[Replica] | _Failure:
        """Start the next generation and wait until every replica is Ready (the list) or one fails."""
        self.generation += 1
        new = [self.make(replica, model_ref, path, self.generation) for replica in old]
        self.drains.watch(new)
        changed = self.drains.changed
        for replica in new:
            self.runner.start(replica)
        timeouts = new[0].pool.timeouts
        limit_s = (timeouts.start_ms + timeouts.selftest_ms) / 1000 + 5
        try:
            async with asyncio.timeout(limit_s):
                while True:
                    failed = next((r for r in new if r.state in _FAILED), None)
                    if failed is not None:
                        code, message, _ = failed.last_error or (PoolError.PRELOAD_FAILED.value, "failed", 0)
                        break
                    if all(r.state == ReplicaState.READY for r in new):
                        return new
                    changed.clear()
                    await changed.wait()
        except TimeoutError:
            code, message = (
                PoolError.PRELOAD_FAILED.value,
                f"the new engine was not Ready within {limit_s:g} s",
            )
        for replica in new:
            await self.runner.stop(replica)
        return _Failure(code, message)

    async def _retire(self, pool_id: str, old: list[Replica]) -> None:
        """Let the old replicas' tasks finish (or end at the deadline), then stop their engines."""
        await self.drains.settle(pool_id, old, DRAIN_DEADLINE_S, "reloaded")
        for replica in old:
            await self.runner.stop(replica)
            with contextlib.suppress(KeyError):
                del self.executor.replicas[replica.replica_id]
        log.info("old engines stopped", extra={"event": "reload_old_stopped", "pool_id": pool_id})

    def _failed(self, pool_id: str, exc: _Failed) -> None:
        message = f"reload failed and was rolled back: {exc.code.value}: {exc.message}"
        self.pools.errors[pool_id] = ("RELOAD_FAILED", message, _now_ms())
        self.pools.on_change()
        log.warning("reload failed", extra={"event": "reload_failed", "pool_id": pool_id, "reason": message})


@dataclass(frozen=True, slots=True)
class _Failure:
    code: str
    message: str


class _Failed(Exception):
    def __init__(self, code: PoolError, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _code(value: str) -> PoolError:
    try:
        return PoolError(value)
    except ValueError:
        return PoolError.PRELOAD_FAILED


def _now_ms() -> int:
    return int(time.time() * 1000)
