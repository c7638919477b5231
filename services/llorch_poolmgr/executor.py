"""Run dispatched tasks through their replica's adapter and append the events to the task's log.

Every event is built by :mod:`llorch.events` and goes through the pool manager's :class:`EventLog`
(batched across tasks). When an append is refused (a cancel's terminal event stood first) the engine
stream is closed at once, which frees the slot.

A task is reported finished (and leaves ``running``, whose ids the scheduler's lease sweeper spares,
and ``leases``, which the renewal loop extends) only once its log is written: while Redis is away its
events wait in the event log, and a task still streaming after :data:`~.eventlog.APPEND_GIVE_UP_S`
of outage is cut off with WORKER_RESET, written when the store is back.

The watchdog (:mod:`.watchdog`) cuts off runs past their limits. Shutdown (:meth:`Executor.drain`):
Start is refused from then on, running tasks get a grace period to finish, and the rest end with
WORKER_RESET saying the pool manager shut down.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from opentelemetry.trace import SpanKind

from llorch import events, tracing
from llorch.adapters.base import Finished, GenerateRequest, Sampler, Token
from llorch.errors import Code, OrchestratorError
from llorch.resilience import STORE_ERRORS
from llorch.store import TaskState, now_ms
from llorch.v1 import poolmgr_pb2, types_pb2

from .eventlog import EventLog, TaskWriter
from .metrics import PoolMetrics
from .supervisor import Replica, ReplicaState
from .watchdog import DECODE_METRICS_EVERY_S, Progress, Watchdog

log = logging.getLogger(__name__)

DRAIN_GRACE_S: Final = 8.0
"""On shutdown, how long running tasks may go on before they are ended with WORKER_RESET. With
DRAIN_WRITE_S and the final report's wait (service.FINAL_REPORT_S) a drain takes at most 13 s: within
the 15 s `llorch up` gives a child after SIGTERM, and no task waits for the scheduler's lost-manager timer."""
DRAIN_WRITE_S: Final = 3.0
"""Then how long the cut-off tasks get to write their terminal event (Redis may be away)."""

SHUTDOWN = "the pool manager shut down before the task finished"


@dataclass
class Outcome:
    code: str
    tokens_out: int
    decode_ms: int
    first_token_ms: int = 0
    retry: bool = False


class Executor:
    def __init__(self, events: EventLog, replicas: dict[str, Replica], metrics: PoolMetrics) -> None:
        self.events = events
        self.replicas = replicas
        self.metrics = metrics
        self.running: dict[str, asyncio.Task[Outcome]] = {}
        self.finished: list[types_pb2.TaskFinished] = []  # drained into the next report
        self.watchdog = Watchdog(self.running, replicas, events, self._refresh_queue_depths)
        self.queue_depths: dict[str, int] = {}  # replica set -> queued tasks, for decode metrics
        self.leases: dict[str, str] = {}  # task_id -> replica set id
        self.draining = False

    def try_start(self, request: poolmgr_pb2.GenerateRequest) -> asyncio.Task[Outcome] | None:
        replica = self.replicas.get(request.replica_id)
        if (
            self.draining
            or replica is None
            or replica.draining
            or replica.state != ReplicaState.READY
            or len(replica.running) >= replica.slots_total
        ):
            return None
        replica.running.add(request.task_id)
        task = asyncio.create_task(self._run(request, replica))
        self.running[request.task_id] = task
        self.leases[request.task_id] = request.replica_set_id

        def done(task: asyncio.Task[Outcome]) -> None:
            replica.running.discard(request.task_id)
            self.running.pop(request.task_id, None)
            self.watchdog.progress.pop(request.task_id, None)
            self.leases.pop(request.task_id, None)
            replica.on_change()
            if task.cancelled():  # aborted before it began: the cancel wrote the terminal event
                outcome = Outcome(Code.CANCELED.value, 0, 0)
            elif task.exception() is not None:  # a bug: left unreported, its lease lapses and the
                log.error("task run failed", exc_info=task.exception())  # sweeper ends it, typed
                return
            else:
                outcome = task.result()
            finished = types_pb2.TaskFinished(
                task_id=request.task_id,
                code=outcome.code,
                tokens_out=outcome.tokens_out,
                decode_ms=outcome.decode_ms,
                first_token_ms=outcome.first_token_ms,
                retry=outcome.retry,
            )
            self.finished.append(finished)

        task.add_done_callback(done)
        # No report for a start: the scheduler placed the task and counts the slot itself; the end is
        # reported (it frees the slot), and the heartbeat carries slots_busy to the views meanwhile.
        return task

    async def _refresh_queue_depths(self) -> None:
        for rs in set(self.leases.values()):
            with contextlib.suppress(*STORE_ERRORS):
                self.queue_depths[rs] = sum(await self.events.store.queue_depths(rs))

    def abort(self, task_id: str) -> bool:
        task = self.running.get(task_id)
        if task is None:
            return False
        progress = self.watchdog.progress.get(task_id)
        if progress is None or (progress.streaming and progress.expired is None):
            task.cancel()  # the scheduler wrote the terminal event; a run past its stream just ends
        return True

    async def drain(self, grace_s: float = DRAIN_GRACE_S, write_s: float = DRAIN_WRITE_S) -> int:
        """Shutdown: refuse new tasks, let running ones finish within ``grace_s``, then end the rest
        with WORKER_RESET (the pool manager shut down) and wait up to ``write_s`` for their logs.
        Returns how many were cut off."""
        self.draining = True
        if self.running:
            log.info("draining running tasks", extra={"event": "drain_started", "tasks": len(self.running)})
            await asyncio.wait(list(self.running.values()), timeout=grace_s)
        cut = [
            t
            for t in list(self.running)
            if self.watchdog.cut(t, OrchestratorError(Code.WORKER_RESET, SHUTDOWN))
        ]
        if self.running:
            await asyncio.wait(list(self.running.values()), timeout=write_s)
        if cut or self.running:
            log.warning(
                "drain cut tasks off",
                extra={"event": "drain_ended", "tasks": len(cut), "unwritten": len(self.running)},
            )
        return len(cut)

    async def _run(self, req: poolmgr_pb2.GenerateRequest, replica: Replica) -> Outcome:
        pool = replica.pool
        labels = (pool.engine, replica.engine_version, pool.id, replica.replica_id)
        self.events.store.locate(req.task_id, req.replica_set_id)  # its events need no lookup
        writer = self.events.writer(req.task_id)
        writer.add(
            events.EventName.METRICS,
            events.dispatch(
                pool_id=pool.id,
                replica_id=replica.replica_id,
                engine=pool.engine,
                engine_version=replica.engine_version,
                kv_warmth=req.kv_warm,
                queue_time_ms=req.queue_time_ms,
                seed=req.seed,
                determinism=req.determinism,
                sampler_profile_version=req.sampler_profile_version,
            ),
        )
        self.metrics.tasks_started.labels(*labels, req.priority).inc()
        started = time.monotonic()
        now = asyncio.get_running_loop().time()
        progress = Progress(
            idle_s=pool.timeouts.idle_ms / 1000,
            wall_at=now + pool.timeouts.wall_ms / 1000,
            deadline_at=now + max(0, req.deadline_at_ms - now_ms()) / 1000,
            last_event_at=now,
            started_at=now,
            replica_id=replica.replica_id,
            budget=json.loads(req.budget_json) if req.budget_json else None,
        )
        self.watchdog.progress[req.task_id] = progress
        code = ""
        try:
            with _engine_span(req, replica, progress):
                code = await self._stream(req, replica, writer, started, progress)
                if code:
                    tracing.mark_failed(code)
        except asyncio.CancelledError:
            if progress.expired is None:
                code = Code.CANCELED.value  # Abort: the scheduler already wrote the terminal event
            else:
                code = progress.expired.code.value
                self._error(writer, replica, progress.expired, progress.tokens)
        finally:
            progress.streaming = False
            await writer.close()  # reported finished only once the log is written
            if progress.tokens:
                self.metrics.tokens_out.labels(*labels).inc(progress.tokens)
        if code and code != Code.CANCELED.value and not progress.retry:
            self.metrics.tasks_failed.labels(pool.engine, pool.id, code).inc()
        decode_ms = int((time.monotonic() - started) * 1000)
        return Outcome(code, progress.tokens, decode_ms, progress.first_token_ms, progress.retry)

    async def _stream(
        self,
        req: poolmgr_pb2.GenerateRequest,
        replica: Replica,
        writer: TaskWriter,
        started: float,
        progress: Progress,
    ) -> str:
        """Relay the engine stream into the log; returns the terminal code ('' for `end`)."""
        adapter = replica.adapter
        loop = asyncio.get_running_loop()
        if adapter is None:
            exc = OrchestratorError(Code.WORKER_RESET, "the engine restarted before the task began")
            return self._failed(req, writer, replica, exc, progress)
        if req.workload == "embedding":
            return await self._embed(req, replica, writer, started, progress)
        request = self._request(req)
        stream = adapter.chat(request) if req.workload == "chat" else adapter.stream(request)
        clock, token, add_token = loop.time, events.token, writer.add_token  # bound once: per token
        try:
            async for item in stream:
                progress.last_event_at = now = clock()
                if isinstance(item, Token):
                    i = progress.tokens
                    add_token(token(item.text, i, item.tool_calls), i + 1)
                    progress.tokens = i + 1
                    if i == 0:
                        progress.first_token_ms = self._first_token(req, replica, writer)
                    if i == 0 or now - progress.metrics_at >= DECODE_METRICS_EVERY_S:
                        writer.add(events.EventName.METRICS, self._decode_metrics(req, progress, now))
                    if writer.rejected:
                        return Code.CANCELED.value
                elif isinstance(item, Finished):
                    self._end(req, replica, writer, item, progress, started)
                    return ""
            raise OrchestratorError(Code.WORKER_RESET, "the engine stream ended without a final chunk")
        except OrchestratorError as exc:
            return self._failed(req, writer, replica, exc, progress)
        finally:
            await stream.aclose()  # closes the engine connection at once when we stop early

    async def _embed(
        self,
        req: poolmgr_pb2.GenerateRequest,
        replica: Replica,
        writer: TaskWriter,
        started: float,
        progress: Progress,
    ) -> str:
        """An embedding: one engine call, its vectors in the `end` event."""
        assert replica.adapter is not None
        try:
            embedded = await replica.adapter.embed(list(req.inputs))
        except OrchestratorError as exc:
            return self._failed(req, writer, replica, exc, progress)
        progress.last_event_at = asyncio.get_running_loop().time()
        finished = Finished("stop", embedded.tokens_in, 0)
        self._end(req, replica, writer, finished, progress, started, embedded.vectors)
        return ""

    def _failed(
        self,
        req: poolmgr_pb2.GenerateRequest,
        writer: TaskWriter,
        replica: Replica,
        exc: OrchestratorError,
        progress: Progress,
    ) -> str:
        """End the task with the error, except a first-attempt WORKER_RESET before any token: that one
        goes back to the scheduler, which places it once more (on another replica when it can)."""
        if exc.code == Code.WORKER_RESET and progress.tokens == 0 and req.attempt == 0:
            progress.retry = True
        else:
            self._error(writer, replica, exc, progress.tokens)
        return exc.code.value

    @staticmethod
    def _request(req: poolmgr_pb2.GenerateRequest) -> GenerateRequest:
        s = req.sampler
        body = json.loads(req.body_json) if req.body_json else {}
        return GenerateRequest(
            task_id=req.task_id,
            prompt=req.prompt,
            max_tokens=req.max_tokens,
            seed=req.seed,
            sampler=Sampler(s.temperature, s.top_k, s.top_p, s.min_p, s.repeat_penalty),
            # The engine's prompt cache is what keeps a session warm; strict tasks never use it (SPEC §8).
            cache_prompt=req.determinism != "strict",
            chat=body if req.workload == "chat" else None,
            overrides=body if req.workload != "chat" else {},
        )

    def _first_token(self, req: poolmgr_pb2.GenerateRequest, replica: Replica, writer: TaskWriter) -> int:
        """Record the first token; returns admission → first token in ms."""
        pool = replica.pool
        first_token_ms = max(0, now_ms() - req.admitted_ms)
        self.metrics.first_token.labels(pool.engine, replica.engine_version, pool.id, req.priority).observe(
            first_token_ms
        )
        log.info(
            "first token",
            extra={
                "event": "first_token",
                "task_id": req.task_id,
                "pool_id": pool.id,
                "replica_id": replica.replica_id,
                "engine": pool.engine,
                "first_token_ms": first_token_ms,
                "queue_time_ms": req.queue_time_ms,
            },
        )
        return first_token_ms

    def _decode_metrics(self, req: poolmgr_pb2.GenerateRequest, progress: Progress, now: float) -> str:
        """The decode `metrics` payload: the set's queue depth (refreshed every second by the
        watchdog loop) and the chance to finish by the deadline, projecting the rate seen so far."""
        progress.metrics_at = now
        left_s = progress.deadline_at - now
        if progress.tokens == 0 or left_s <= 0:
            on_time = 1.0 if left_s > 0 else 0.0
        else:
            per_token_s = (now - progress.started_at) / progress.tokens
            need_s = max(0, req.max_tokens - progress.tokens) * per_token_s
            on_time = 1.0 if need_s <= left_s else round(left_s / need_s, 3)
        return events.decode(
            queue_depth=self.queue_depths.get(req.replica_set_id, 0),
            on_time_probability=on_time,
            kv_warmth=req.kv_warm,
            tokens_out_so_far=progress.tokens,
            budgets=progress.budget,  # the session's remaining budgets (reservation already taken)
        )

    def _end(
        self,
        req: poolmgr_pb2.GenerateRequest,
        replica: Replica,
        writer: TaskWriter,
        fin: Finished,
        progress: Progress,
        started: float,
        embeddings: list[list[float]] | None = None,
    ) -> None:
        tokens, first_token_ms = progress.tokens, progress.first_token_ms
        # An engine that reports no prompt count (usage left out) gets admission's estimate.
        tokens_in = fin.tokens_in or req.prompt_est
        pool = replica.pool
        decode_ms = int((time.monotonic() - started) * 1000)
        if tokens == 0:
            writer.add(events.EventName.METRICS, self._decode_metrics(req, progress, progress.last_event_at))
        writer.add(
            events.EventName.END,
            events.end(
                tokens_out=tokens,
                decode_ms=decode_ms,
                tokens_in=tokens_in,
                queue_time_ms=req.queue_time_ms,
                first_token_ms=first_token_ms,
                finish_reason=fin.finish_reason,
                pool_id=pool.id,
                replica_id=replica.replica_id,
                embeddings=embeddings,
            ),
            TaskState.SUCCEEDED,
        )
        labels = (pool.engine, replica.engine_version, pool.id)
        self.metrics.tokens_in.labels(*labels, replica.replica_id).inc(tokens_in)
        self.metrics.decode.labels(*labels, req.priority).observe(decode_ms)

    @staticmethod
    def _error(writer: TaskWriter, replica: Replica, exc: OrchestratorError, tokens: int) -> None:
        data = events.error(
            exc, tokens, engine=replica.pool.engine, pool_id=replica.pool.id, replica_id=replica.replica_id
        )
        writer.add(events.EventName.ERROR, data, TaskState.FAILED)


@contextlib.contextmanager
def _engine_span(req: poolmgr_pb2.GenerateRequest, replica: Replica, progress: Progress) -> Iterator[None]:
    """The engine call's span: current while the adapter talks to the engine, so its request carries
    this span's traceparent; the tokens streamed are set when it ends."""
    pool = replica.pool
    with tracing.span(
        "engine",
        SpanKind.CLIENT,
        task_id=req.task_id,
        pool_id=pool.id,
        replica_id=replica.replica_id,
        model=pool.model,
        engine=pool.engine,
        workload=req.workload,
    ):
        try:
            yield
        finally:
            tracing.annotate(tokens_out=progress.tokens)
