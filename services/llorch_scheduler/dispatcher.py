"""Dispatch: claim queued tasks (with a lease) onto Ready replicas with a free slot; sweep dead leases.

A dispatch is one start on the pool manager's ``StartStream`` (:mod:`llorch.callstream`); the task's
end comes back batched on its pool manager's registration stream (`finished`), which frees the slot.
A pool manager whose stream breaks and does not return within a grace period has its tasks ended with
WORKER_RESET; the lease sweeper covers what a scheduler restart forgot.

One loop, woken by admissions, finished tasks and pool reports. Every path ends a task through the
store's append-unless-terminal step.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, cast

from opentelemetry.trace import SpanKind

from llorch import events, tracing
from llorch.callstream import CallChannel, call_context
from llorch.config import LlorchConfig, SamplerProfile
from llorch.errors import Code, OrchestratorError
from llorch.resilience import Outage, until_done
from llorch.rpc import auth_metadata
from llorch.store import LEASE_MS, Claim, Placement, Priority, Store, TaskRecord, TaskState, now_ms
from llorch.v1 import poolmgr_pb2, types_pb2

from .estimator import Estimator
from .inventory import SloWindow
from .metrics import SchedulerMetrics
from .registry import Candidate, Manager, PoolRegistry
from .sessions import Sessions, budget_json
from .throttles import Throttles

log = logging.getLogger(__name__)

RECONCILE_AFTER_S = 10.0
"""A task dispatched longer ago than this that its manager does not report running has ended."""
LOST_GRACE_S = 3.0
"""How long a pool manager whose stream broke has to come back before its tasks end."""
STORE_ATTEMPTS = 5
"""Tries of a store step on a report's path before it is left to the lease sweeper."""
Starts = CallChannel[poolmgr_pb2.StartCall, poolmgr_pb2.StartResult]
_CANCEL_REASONS = {Code.DECODE_TIMEOUT.value: "watchdog", Code.DEADLINE_UNMET.value: "deadline"}


@dataclass(frozen=True)
class DispatchSettings:
    sampler_profiles: Mapping[str, SamplerProfile]
    dispatch_attempts: int
    max_batch_wait_ms: int  # 0: no aging
    retention_s: int

    @classmethod
    def of(cls, cfg: LlorchConfig) -> DispatchSettings:
        return cls(
            cfg.sampler_profiles,
            cfg.scheduler.dispatch_attempts,
            cfg.queue.max_batch_wait_ms or 0,
            cfg.sse.retention_s,
        )


class Residency(Protocol):
    """What dispatch asks of on-demand residency (the loader): see :mod:`.loader`."""

    def held(self, rs: str) -> bool: ...
    def touch(self, pool_id: str) -> None: ...
    def wake(self) -> None: ...


class _AlwaysResident:
    def held(self, rs: str) -> bool:
        return False

    def touch(self, pool_id: str) -> None:
        pass

    def wake(self) -> None:
        pass


@dataclass
class InFlight:
    rs: str
    claim: Claim
    target: Candidate
    dispatched_at: float


class Dispatcher:
    def __init__(
        self,
        settings: DispatchSettings,
        store: Store,
        registry: PoolRegistry,
        estimator: Estimator,
        sessions: Sessions,
        throttles: Throttles,
        metrics: SchedulerMetrics,
        internal_token: str,
        residency: Residency | None = None,
        queue_moved: Callable[[str, Iterable[Priority], int], None] = lambda _rs, _priorities, _step: None,
    ) -> None:
        """``residency``: which sets hold their dispatch for a swap, and who hears of each use;
        ``queue_moved``: told the priorities of the tasks each claim took out of a set's queue (-1)
        and of each task put back (+1)."""
        self.residency = residency or _AlwaysResident()
        self.queue_moved = queue_moved
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.registry = registry
        self.estimator = estimator
        self.throttles = throttles
        self.metrics = metrics
        self.token = internal_token
        self._wake = asyncio.Event()
        self._inflight: dict[str, InFlight] = {}
        self._attempts: dict[str, int] = {}
        self._retried: dict[str, str] = {}  # task_id -> the replica that reset under it
        # Per set: how many tasks this process put in its queue (admitted or put back), and that
        # count as of the last claim that found the queue empty. While they are equal the queue is
        # known to be empty, and a wake (a task's end, a pool report) claims nothing from it.
        self._added: dict[str, int] = {}
        self._drained_at: dict[str, int] = {}
        self.slo = SloWindow()
        self.outage = Outage("redis (dispatcher)")

    def wake(self) -> None:
        self._wake.set()
        self.residency.wake()

    def queued(self, rs: str) -> None:
        """A task went into the set's queue (admitted, or put back): fill the set again. Called once
        the store step that queued it has answered, so a claim sent before this call either saw the
        task or cannot mark the queue empty past it (see :meth:`_fill`)."""
        self._added[rs] = self._added.get(rs, 0) + 1
        self.wake()

    def seen_waiting(self, rs: str) -> None:
        """The queue watch read tasks in the set's queue. Were it taken for empty, its queue changed
        behind this process's back (Redis restarted from an older state brings back tasks claimed
        since), so fill it again: within one scan interval, no task waits on an admission to come."""
        if self._known_empty(rs):
            del self._drained_at[rs]
            self.wake()

    def _known_empty(self, rs: str) -> bool:
        """The set's last claim came back short and this process queued nothing there since."""
        return self._drained_at.get(rs) == self._added.get(rs, 0)

    async def run(self) -> None:
        """Fill every set on each wake. A Redis outage pauses the loop (retried with backoff, logged
        once); it resumes by itself when Redis is back."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await until_done(self._fill_all, self.outage)

    async def _fill_all(self) -> None:
        for rs in self.registry.replica_sets():
            if not self.residency.held(rs):  # a held set's pool drains for a swap (issue 13)
                await self._fill(rs)

    async def _fill(self, rs: str) -> None:
        """Claim as many tasks as there are free slots in one step, then place them concurrently.

        Fewer claims than asked for means the queue was empty when the claim ran. Only this process
        puts tasks in a queue (:meth:`queued`), so until it does again the queue is still empty and
        the claim is skipped: a task's end no longer costs a claim that finds nothing. A task queued
        while the claim was in flight counts after the claim was sent, so it keeps the set fillable.
        A restarted scheduler knows nothing empty until its first claim; a queue that filled behind
        its back is seen by the next queue scan (:meth:`seen_waiting`)."""
        while candidates := self.registry.candidates(rs):
            if self._known_empty(rs):
                return
            added = self._added.get(rs, 0)
            limit = sum(c.slots_free for c in candidates)
            claims = await self.store.claim(rs, LEASE_MS, limit, self.settings.max_batch_wait_ms)
            if len(claims) < limit:
                self._drained_at[rs] = added
            if not claims:
                return
            self.queue_moved(rs, (claim.priority for claim in claims), -1)
            placed: list[tuple[Claim, Candidate, bool]] = []
            try:
                for claim in claims:
                    warm = await self._warm(claim.task_id)
                    best = self.registry.candidates(rs, warm)
                    if not best:  # a replica left while we claimed
                        await self._requeue(rs, claim)
                        continue
                    avoid = self._retried.get(claim.task_id)
                    target = next((c for c in best if c.replica.replica_id != avoid), best[0])
                    self.registry.occupy(target.replica.replica_id, target.pool.pool_id, claim.task_id)
                    placed.append((claim, target, target.replica.replica_id == warm))
            except BaseException:  # the claims keep their leases: the sweeper returns them
                for claim, target, _ in placed:
                    self.registry.release(target.replica.replica_id, claim.task_id)
                raise
            await asyncio.gather(*(self._dispatch(rs, claim, target, warm) for claim, target, warm in placed))
            if len(claims) < limit and len(placed) == len(claims):
                return

    async def _warm(self, task_id: str) -> str | None:
        """The replica holding this task's session KV: its last replica, same engine process."""
        last = await self.sessions.warm_replica(task_id)
        if last is None or self.registry.replica_pid(last[0]) != last[1]:
            return None
        return last[0]

    async def _dispatch(self, rs: str, claim: Claim, target: Candidate, warm: bool) -> None:
        """Place one claimed task."""
        task_id = claim.task_id
        try:
            record = await self.store.mark_running(
                task_id, Placement(target.manager.address, target.pool.pool_id, target.replica.replica_id)
            )
            if record is None:  # canceled (or expired) while it was being claimed
                self.registry.release(target.replica.replica_id, task_id)
                await self.store.release_lease(rs, task_id)
                return
            request = self._generate_request(rs, task_id, record, target, claim)
            request.kv_warm = warm
            budgets = await self.sessions.dispatched(
                task_id, target.replica.replica_id, target.replica.pid, target.pool.cost_per_1k_tokens
            )
        except BaseException:
            # Redis went away mid-dispatch: free the slot; the task's lease is still held, so the
            # sweeper puts it back in its queue (never marked running) or ends it typed.
            self.registry.release(target.replica.replica_id, task_id)
            raise
        request.budget_json = budget_json(budgets)
        self.residency.touch(target.pool.pool_id)
        self._inflight[task_id] = InFlight(rs, claim, target, time.monotonic())
        self.estimator.started(rs, task_id, request.max_tokens)
        await self._start(rs, claim, target, request, record)

    async def _start(
        self,
        rs: str,
        claim: Claim,
        target: Candidate,
        request: poolmgr_pb2.GenerateRequest,
        record: TaskRecord,
    ) -> None:
        """The Start call, in a span of the admitting request's trace (kept in the task record while
        the task waited in its queue)."""
        task_id = claim.task_id
        with tracing.span(
            "dispatch",
            SpanKind.CLIENT,
            record.traceparent,
            task_id=task_id,
            pool_id=request.pool_id,
            replica_id=request.replica_id,
            model=record.model_ref,
        ):
            try:  # the engine's span continues this trace
                result = await self._starts(target.manager).call(
                    poolmgr_pb2.StartCall(request=request, context=call_context())
                )
            except _StartFailed as exc:
                log.warning(
                    "start failed", extra={"event": "stream_error", "task_id": task_id, "code": exc.why}
                )
                await self._lost(task_id)
                return
            if not result.reply.accepted:
                self._forget(task_id)
                await self._refused(rs, claim)
                self.wake()
                return
            log.info(
                "task dispatched",
                extra={
                    "event": "dispatched",
                    "task_id": task_id,
                    "pool_id": request.pool_id,
                    "replica_id": request.replica_id,
                    "model_id": record.model_ref,
                    "kv_warmth": request.kv_warm,
                    "queue_time_ms": request.queue_time_ms,
                    "attempt": request.attempt,
                },
            )

    def _starts(self, manager: Manager) -> Starts:
        """The manager's start stream (:mod:`llorch.callstream`), kept with the manager's connection:
        opened on first use and again after it breaks (a manager back at another address is a new
        connection, and so gets a new one)."""
        if manager.starts is None:
            stream = cast(Any, manager.stub.StartStream)
            auth = auth_metadata(self.token)
            manager.starts = CallChannel(
                lambda: stream(metadata=auth),
                lambda calls: poolmgr_pb2.StartCalls(calls=calls),
                lambda message: message.results,
                _StartFailed,
            )
        return manager.starts

    async def aclose(self) -> None:
        for manager in self.registry.managers.values():
            if manager.starts is not None:
                await manager.starts.aclose()

    def _generate_request(
        self, rs: str, task_id: str, record: TaskRecord, target: Candidate, claim: Claim
    ) -> poolmgr_pb2.GenerateRequest:
        body = record.request
        profile = self.settings.sampler_profiles[target.pool.sampler_profile_version]
        admitted = record.created_ms
        return poolmgr_pb2.GenerateRequest(
            task_id=task_id,
            pool_id=target.pool.pool_id,
            replica_id=target.replica.replica_id,
            replica_set_id=rs,
            prompt=body.prompt,
            workload=body.workload,
            body_json=body.body,
            inputs=list(body.inputs),
            prompt_est=body.prompt_est,
            max_tokens=body.max_tokens,
            seed=body.seed,
            sampler=types_pb2.Sampler(
                temperature=profile.temperature,
                top_k=profile.top_k,
                top_p=profile.top_p,
                min_p=profile.min_p,
                repeat_penalty=profile.repeat_penalty,
            ),
            sampler_profile_version=target.pool.sampler_profile_version,
            determinism=body.determinism,
            priority=claim.priority,
            admitted_ms=admitted,
            queue_time_ms=max(0, now_ms() - admitted),
            deadline_at_ms=admitted + record.deadline_ms,
            session_id=record.session_id,
            attempt=1 if task_id in self._retried else 0,
        )

    def _forget(self, task_id: str) -> InFlight | None:
        """Stop counting a task against its slot."""
        flight = self._inflight.pop(task_id, None)
        if flight is not None:
            self.registry.release(flight.target.replica.replica_id, task_id)
            self.estimator.finished(flight.rs, task_id, 0, 0, ok=False)
        return flight

    async def finished(self, *reported: types_pb2.TaskFinished) -> None:
        """A pool manager reported tasks' ends: their terminal events are in the logs; free the slots.

        In-memory bookkeeping comes first; the store steps after it are retried briefly (the leases
        of one report are released in one round trip), and if Redis stays away a task's lease, still
        held, lets the sweeper finish the job (its terminal event already stands, so the sweeper only
        releases the lease)."""
        released: list[tuple[str, str]] = []
        for done in reported:
            flight = self._inflight.pop(done.task_id, None)
            if flight is None:  # dispatched before this scheduler started: settle from the record
                await until_done(partial(self._finished_unknown, done), self.outage, attempts=STORE_ATTEMPTS)
                continue
            self.registry.release(flight.target.replica.replica_id, done.task_id)
            self.residency.touch(flight.target.pool.pool_id)
            if done.retry and done.task_id not in self._retried:
                retry = partial(self._retry, flight, done.task_id)
                await until_done(retry, self.outage, attempts=STORE_ATTEMPTS)
                continue
            self._retried.pop(done.task_id, None)
            self.slo.record(flight.rs, done)
            self.estimator.finished(
                flight.rs, done.task_id, done.tokens_out, int(done.decode_ms), not done.code
            )
            self._count_ending(flight.target, done.code)
            self.throttles.settle(done.task_id, done.tokens_out)
            self.wake()
            await self.sessions.settle(done.task_id, done.tokens_out)
            released.append((flight.rs, done.task_id))
        if released:
            await until_done(
                lambda: self.store.release_leases(released), self.outage, attempts=STORE_ATTEMPTS
            )

    async def _finished_unknown(self, done: types_pb2.TaskFinished) -> None:
        record = await self.store.task(done.task_id)
        if record is None:
            return
        await self.sessions.settle_record(record, done.tokens_out)
        await self.store.release_lease(record.rs, done.task_id)
        self.wake()

    async def _retry(self, flight: InFlight, task_id: str) -> None:
        """The engine reset before the task's first token: place it once more, at the head of its
        class, preferring another replica (SPEC §5.6: WORKER_RESET may be retried once)."""
        self.estimator.finished(flight.rs, task_id, 0, 0, ok=False)
        self._retried[task_id] = flight.target.replica.replica_id
        log.info("task retried", extra={"event": "task_retry", "task_id": task_id})
        await self.store.requeued(task_id)
        await self._requeue(flight.rs, flight.claim)

    async def _lost(self, task_id: str) -> None:
        self._retried.pop(task_id, None)
        flight = self._forget(task_id)
        if flight is None:
            return
        pool = flight.target.pool
        await self._fail(
            task_id,
            Code.WORKER_RESET,
            "the pool manager running this task was lost",
            pool.engine,
            pool.pool_id,
        )
        await self.store.release_lease(flight.rs, task_id)
        self.wake()

    def reconcile(self, manager_id: str, running: set[str]) -> None:
        """Free the slots of tasks a manager no longer runs but whose end never reached us (a report
        lost with its stream). Their leases are left to lapse: the sweeper ends any that did not end."""
        now = time.monotonic()
        for task_id, flight in list(self._inflight.items()):
            if (
                flight.target.manager.manager_id == manager_id
                and task_id not in running
                and now - flight.dispatched_at > RECONCILE_AFTER_S
            ):
                self._forget(task_id)
                self.wake()

    async def manager_lost(self, manager_id: str) -> None:
        """A pool manager's stream broke: unless it is back within the grace period, its tasks end."""
        await asyncio.sleep(LOST_GRACE_S)
        manager = self.registry.managers.get(manager_id)
        if manager is not None and manager.connected:
            return
        for task_id, flight in list(self._inflight.items()):
            if flight.target.manager.manager_id == manager_id:
                await self._lost(task_id)

    def _count_ending(self, target: Candidate, code: str) -> None:
        """The pool manager's terminal code feeds tasks_canceled_total for watchdog and deadline endings."""
        reason = _CANCEL_REASONS.get(code)
        if reason is not None:
            pool = target.pool
            self.metrics.tasks_canceled.labels(
                pool.engine, pool.engine_version, pool.pool_id, target.replica.replica_id, reason
            ).inc()

    async def _refused(self, rs: str, claim: Claim) -> None:
        attempts = self._attempts.get(claim.task_id, 0) + 1
        if attempts >= self.settings.dispatch_attempts:
            self._attempts.pop(claim.task_id, None)
            await self._fail(
                claim.task_id, Code.REPLICA_EXHAUSTED, "every replica refused the task for capacity"
            )
            return
        self._attempts[claim.task_id] = attempts
        await self.store.requeued(claim.task_id)
        await self._requeue(rs, claim)

    async def _requeue(self, rs: str, claim: Claim) -> None:
        """A claimed task back at the head of its class, and a fill to place it again (the fill that
        claimed it may have stopped already: see :meth:`_fill`)."""
        await self.store.requeue_head(rs, claim)
        self.queue_moved(rs, (claim.priority,), 1)
        self.queued(rs)

    async def _fail(
        self, task_id: str, code: Code, message: str, engine: str = "", pool_id: str = ""
    ) -> None:
        payload = events.error(OrchestratorError(code, message), engine=engine, pool_id=pool_id)
        await self.store.terminate(task_id, TaskState.FAILED, payload, self.settings.retention_s)
        record = await self.store.task(task_id)
        if record is not None:
            await self.sessions.settle_record(record, record.tokens_out)

    async def lease_expired(self, rs: str, task_id: str) -> None:
        """The sweeper found the task's lease lapsed with no manager running it. Never dispatched
        (claimed by a scheduler that died or lost Redis): back to its queue. Else it ends typed."""
        record = await self.store.task(task_id)
        if record is not None and record.state == TaskState.QUEUED:
            await self.store.requeue_claimed(record)
            self.queue_moved(rs, (record.priority,), 1)
            log.info("claim returned", extra={"event": "claim_returned", "task_id": task_id})
            self.queued(rs)
            return
        await self._fail(task_id, Code.WORKER_RESET, "the pool manager running this task stopped responding")
        await self.store.release_lease(rs, task_id)
        self._forget(task_id)


class _StartFailed(Exception):
    """The start stream to a pool manager broke (or no answer came in time): the task is lost there."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why
