"""The watchdog (SPEC §5.5): the pool's wall_ms and idle_ms and the task's deadline for every run, and
the event log's outage limit: one scan of the running tasks every ``interval_s`` instead of a timer per
token (which would cost a timer-heap operation per token). A run past a limit is cut off (its asyncio
task cancelled) and ends with the reason recorded in its :class:`Progress`."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from llorch.errors import Code, JsonValue, OrchestratorError

from .eventlog import APPEND_GIVE_UP_S, EventLog
from .supervisor import Replica

log = logging.getLogger(__name__)

DECODE_METRICS_EVERY_S = 1.0
LOG_UNREACHABLE = f"the event log (Redis) was unreachable for more than {APPEND_GIVE_UP_S:g} s"


@dataclass(slots=True)
class Progress:
    """A run's progress and limits; survives the run's cancellation (an abort or the watchdog)."""

    idle_s: float
    wall_at: float
    deadline_at: float
    last_event_at: float
    started_at: float = 0.0
    metrics_at: float = 0.0
    replica_id: str = ""
    tokens: int = 0
    first_token_ms: int = 0
    expired: OrchestratorError | None = None  # why the executor cut the run off (None: an Abort)
    streaming: bool = True  # False once the run only waits for its log: no cut-off any more
    retry: bool = False
    budget: dict[str, JsonValue] | None = None  # the session's budgets at dispatch, parsed once

    def overdue(self, now: float) -> OrchestratorError | None:
        if now >= self.deadline_at:
            return OrchestratorError(Code.DEADLINE_UNMET, "the task passed its deadline")
        if now >= self.wall_at or now - self.last_event_at >= self.idle_s:
            return OrchestratorError(
                Code.DECODE_TIMEOUT, "the engine stopped producing tokens within the pool's timeouts"
            )
        return None


class Watchdog:
    def __init__(
        self,
        running: Mapping[str, asyncio.Task[Any]],
        replicas: Mapping[str, Replica],
        events: EventLog,
        every_second: Callable[[], Awaitable[None]],
    ) -> None:
        """``running``: the runs by task id (cancelled to cut one off); ``every_second``: a side job the
        watch loop starts about once a second and never waits for (a frozen Redis cannot stall it)."""
        self.running = running
        self.replicas = replicas
        self.events = events
        self.every_second = every_second
        self.progress: dict[str, Progress] = {}

    async def watch(self, interval_s: float = 0.25) -> None:
        ticks = 0
        side: asyncio.Task[None] | None = None
        failing = False
        try:
            while True:
                await asyncio.sleep(interval_s)
                ticks += 1
                if ticks % round(DECODE_METRICS_EVERY_S / interval_s) == 0 and (side is None or side.done()):
                    side = asyncio.create_task(_run(self.every_second))
                try:
                    self.scan()
                except Exception:  # a bug: keep watching (logged once, not every tick)
                    if not failing:
                        log.exception("watchdog scan failed", extra={"event": "watchdog_failed"})
                    failing = True
                else:
                    failing = False
        finally:
            if side is not None:
                side.cancel()

    def scan(self) -> None:
        """Cut off every run past its limits, or past APPEND_GIVE_UP_S of unreachable event log."""
        now = asyncio.get_running_loop().time()
        log_lost = self.events.down_s >= APPEND_GIVE_UP_S
        lost_cut = 0
        for task_id, progress in list(self.progress.items()):
            why = progress.overdue(now)
            if why is None and log_lost:
                why = OrchestratorError(Code.WORKER_RESET, LOG_UNREACHABLE)
            if why is None or not self.cut(task_id, why):
                continue
            if why.message == LOG_UNREACHABLE:
                lost_cut += 1
            replica = self.replicas.get(progress.replica_id)
            if why.code == Code.DECODE_TIMEOUT and replica is not None:
                replica.suspect()
        if lost_cut:
            log.warning(
                "tasks cut off: the event log is unreachable",
                extra={"event": "event_log_unreachable", "tasks": lost_cut},
            )

    def cut(self, task_id: str, why: OrchestratorError) -> bool:
        """Stop a streaming run; it ends with ``why``. False when it is not streaming (any more)."""
        progress = self.progress.get(task_id)
        task = self.running.get(task_id)
        if progress is None or task is None or not progress.streaming or progress.expired is not None:
            return False
        progress.expired = why
        task.cancel()
        return True


async def _run(job: Callable[[], Awaitable[None]]) -> None:
    await job()
