"""Admission: resolve the replica set, run the guardrails, create the task and enqueue it atomically.

The gateway has already checked the request's shape; this checks it against what is served, in SPEC
§5.1's order. The record, its `started` event (seq 0) and the queue entry are one store step, so a
crash leaves either nothing or a complete queued task.

The queue position is known only inside that step, so `started` is offered for a window of three
positions around the one this process expects (its last view of the queue); under concurrent
admissions and dispatches the real position lands in it, and one outside takes the nearest frame's
prediction, which the next queued `metrics` frame corrects.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from llorch import events, tracing
from llorch.config import SchedulerConfig
from llorch.errors import Code, OrchestratorError, invalid
from llorch.ids import default_seed, is_valid_id, new_task_id
from llorch.lifecycle import COMING_STATES
from llorch.store import AdmitStatus, NewTask, SessionBudgets, Store, TaskRequest, now_ms
from llorch.v1 import types_pb2

from .estimator import Estimator
from .metrics import SchedulerMetrics
from .queueing import QueueFront
from .queuewatch import QueueWatch
from .registry import PoolRegistry, SetInfo, set_of
from .residency import never_fits
from .sessions import Sessions
from .submission import Submission
from .throttles import Throttles

log = logging.getLogger(__name__)

_PENDING_TTL_S = 7 * 24 * 3600
"""Safety TTL of a record that has not ended yet; a terminal event shortens it to the retention."""
STARTED_WINDOW = 3
"""How many queue positions, from one before the expected one, admission offers a `started` for."""


@dataclass(frozen=True, slots=True)
class Admitted:
    task_id: str
    rs: str
    queue_position: int
    predicted_start_ms: int
    backoff_ms: int
    on_time_probability: float
    budgets: SessionBudgets | None = None


class Admission:
    def __init__(
        self,
        limits: SchedulerConfig,
        soft_watermark: float,
        served_models: Sequence[str],
        store: Store,
        registry: PoolRegistry,
        estimator: Estimator,
        metrics: SchedulerMetrics,
        watch: QueueWatch,
        sessions: Sessions,
        front: QueueFront,
        throttles: Throttles,
        lifecycle: Callable[[str], str | None] = lambda _model: None,
        load_eta: Callable[[str], int | None] = lambda _rs: None,
    ) -> None:
        """``limits``: the scheduler's defaults and bounds (max tokens, deadlines); ``served_models``:
        the catalog models some pool serves (named in INVALID_PARAMS for an unknown model_ref);
        ``lifecycle``: a model's catalog state (None: not in the catalog); ``load_eta``: the remaining
        load time of a set whose on-demand model is not loaded (None when loaded), added to predictions."""
        self.limits = limits
        self.soft_watermark = soft_watermark
        self.served_models = sorted(served_models)
        self.store = store
        self.registry = registry
        self.estimator = estimator
        self.metrics = metrics
        self.watch = watch
        self.sessions = sessions
        self.front = front
        self.throttles = throttles
        self.lifecycle = lifecycle
        self.load_eta = load_eta

    async def admit(self, req: Submission) -> Admitted:
        task_id = req.task_id or new_task_id()
        if not is_valid_id(task_id):
            raise invalid("task_id", "task_id must match ^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
        await self._check_lifecycle(req)
        info = self._resolve(req)
        priority = req.priority
        # An embedding generates nothing: one token stands for it in budgets and throttles.
        embedding = req.workload == "embedding"
        max_tokens = 1 if embedding else req.max_tokens or self.limits.default_max_tokens
        deadline_ms = req.deadline_ms or self.limits.default_deadline_ms
        prompt = req.text
        self._guardrails(req, info, max_tokens, deadline_ms, prompt)
        seed = default_seed(task_id) if req.seed is None else req.seed
        prompt_est = _prompt_est(prompt, req.inputs)
        task = NewTask(
            task_id=task_id,
            rs=info.rs,
            priority=priority,
            model_ref=req.model_ref,
            session_id=req.session_id,
            engine=info.engine,
            deadline_ms=deadline_ms,
            request=TaskRequest(
                "" if req.workload == "chat" else prompt,
                max_tokens,
                seed,
                self._determinism(req, info),
                kv_cold=req.kv_hint == "cold",
                prompt_est=prompt_est,
                workload=req.workload,
                body=req.body,
                inputs=req.inputs if embedding else (),
            ),
            traceparent=tracing.current_traceparent(),  # Admit's span: the dispatch continues its trace
        )
        tokens = req.expected_tokens or max_tokens
        budgets = await self.sessions.admit(req, task_id, info, prompt_est, max_tokens)
        try:
            self.throttles.check_rate(info, priority)
            self.throttles.reserve_tokens(req.client, task_id, info, prompt_est, max_tokens)
            # Once per admission: each reads the registry; the window's predictions are computed once.
            slots_total, eta = self._slots_total(info.rs), self.load_eta(info.rs)
            ahead = self.watch.depth_ahead(info.rs, priority)
            first = max(0, ahead - 1)
            window = self._predictions(info.rs, first, STARTED_WINDOW, slots_total, tokens, eta)
            self._check_deadline(info, window[ahead - first], deadline_ms)
            admitted = await self._enqueue(
                task, info, tokens, (first, window), slots_total, eta, minted=not req.task_id
            )
        except OrchestratorError:
            self.throttles.release(task_id)
            await self.sessions.undo(task_id)
            raise
        return replace(admitted, budgets=budgets)

    async def _check_lifecycle(self, req: Submission) -> None:
        """SPEC §5.7: Draft → 403 MODEL_NOT_ACTIVE; Deprecated → 403 MODEL_DEPRECATED unless the task
        continues an existing session; Retired → 503 POOL_UNAVAILABLE. Checked before the set is
        resolved, so a retired model's answer says why rather than that its pools are drained."""
        state = self.lifecycle(req.model_ref)
        if state == "Draft":
            raise OrchestratorError(
                Code.MODEL_NOT_ACTIVE, f"model {req.model_ref} is a Draft; activate it first", state=state
            )
        if state == "Retired":
            raise OrchestratorError(Code.POOL_UNAVAILABLE, f"model {req.model_ref} is retired", state=state)
        if state == "Deprecated":
            existing = bool(req.session_id) and await self.store.session(req.session_id) is not None
            if not existing:
                raise OrchestratorError(
                    Code.MODEL_DEPRECATED,
                    f"model {req.model_ref} is deprecated: existing sessions go on, new ones cannot start",
                    state=state,
                )

    def _resolve(self, req: Submission) -> SetInfo:
        members = self.registry.pools_for_model(req.model_ref)
        if not members:
            if req.model_ref in self.served_models:
                raise OrchestratorError(
                    Code.POOL_UNREADY,
                    f"no pool serving {req.model_ref} has started yet; retry shortly",
                    retry_after_ms=1000,
                )
            raise invalid(
                "model_ref",
                f"model_ref {req.model_ref!r} is not served; use one of served_models",
                served_models=list(self.served_models),
            )
        ready = [(m, p) for m, p in members if self.registry.is_ready(m, p)]
        if not ready:  # an on-demand model is admitted and queued while it is not loaded (issue 13)
            ready = [(m, p) for m, p in members if self.registry.is_loadable(m, p)]
            _refuse_never_fits(req.model_ref, [p for _, p in ready])
        if not ready:
            coming = [p for m, p in members if not m.connected or p.state in COMING_STATES]
            if not coming:  # every member is stopped, drained or circuit-open: only an operator helps
                raise OrchestratorError(
                    Code.POOL_UNAVAILABLE,
                    f"every pool serving {req.model_ref} is stopped, drained or circuit-open; "
                    "resume one (POST /v1/pools/{id}/resume)",
                    pool_id=min(p.pool_id for _, p in members),
                )
            raise OrchestratorError(
                Code.POOL_UNREADY,
                f"no replica serving {req.model_ref} is Ready yet; retry shortly",
                retry_after_ms=1000,
                pool_id=min(p.pool_id for p in coming),
            )
        if req.sampler_profile_version:
            ready = [(m, p) for m, p in ready if p.sampler_profile_version == req.sampler_profile_version]
            if not ready:
                raise invalid(
                    "sampler_profile_version",
                    f"sampler_profile_version {req.sampler_profile_version!r} is not served for this model",
                )
        rs = min(set_of(p) for _, p in ready)
        info = self.registry.set_info(rs)
        assert info is not None  # a Ready member exists, so the set does
        if req.engine and req.engine != info.engine:
            raise invalid(
                "engine", f"model {req.model_ref} is served by engine {info.engine!r}, not {req.engine!r}"
            )
        if (req.workload or "completion") not in info.workloads:
            raise invalid(
                "workload",
                f"workload {req.workload!r} is not served for this model; it serves {sorted(info.workloads)}",
            )
        return info

    def _determinism(self, req: Submission, info: SetInfo) -> str:
        """`strict` when the set can do it (not vllm, every replica one slot: OC-ADAPT-5010)."""
        capable = info.engine != "vllm" and info.single_slot
        if req.determinism == "strict" and not capable:
            raise invalid(
                "determinism", "this model's replicas cannot run strict determinism; use best_effort"
            )
        return req.determinism or ("strict" if capable else "best_effort")

    def _guardrails(
        self, req: Submission, info: SetInfo, max_tokens: int, deadline_ms: int, prompt: str
    ) -> None:
        if req.ctx > info.ctx:
            raise invalid("ctx", f"ctx must be between 0 and {info.ctx} for this model")
        if max_tokens > info.max_tokens_limit:
            raise invalid("max_tokens", f"max_tokens must be between 1 and {info.max_tokens_limit}")
        effective_ctx = req.ctx or info.ctx
        if req.workload == "embedding":  # each input is embedded on its own
            prompt_est = max(_prompt_est(text, ()) for text in req.inputs or (prompt,))
        else:
            prompt_est = _prompt_est(prompt, req.inputs)
        if prompt_est + max_tokens > effective_ctx:
            raise invalid(
                "max_tokens",
                f"prompt (~{prompt_est} tokens) + max_tokens ({max_tokens}) exceeds ctx {effective_ctx}; "
                "shorten the prompt or lower max_tokens",
                context_length=effective_ctx,
                prompt_tokens=prompt_est,
            )
        if deadline_ms <= 0:
            raise OrchestratorError(Code.DEADLINE_UNMET, "deadline_ms must be > 0", predicted_start_ms=0)
        if deadline_ms > self.limits.max_deadline_ms:
            raise invalid("deadline_ms", f"deadline_ms must be at most {self.limits.max_deadline_ms}")

    async def _enqueue(
        self,
        task: NewTask,
        info: SetInfo,
        tokens: int,
        window: tuple[int, list[int]],
        slots_total: int,
        eta: int | None,
        minted: bool,
    ) -> Admitted:
        """``window``: the first position offered a `started` and the predicted starts from there;
        ``eta``: the set's remaining load time (None: loaded), already in every prediction."""
        rs, priority, deadline_ms = info.rs, task.priority, task.deadline_ms
        first, starts = window
        offered = [
            (start, self.estimator.on_time_probability(rs, start, tokens, deadline_ms)) for start in starts
        ]
        started = [
            events.started(task.task_id, position, predicted, on_time, priority, eta is not None)
            for position, (predicted, on_time) in enumerate(offered, start=first)
        ]
        limits = self.front.limits(info)
        result = await self.store.admit(
            task,
            limits,
            now_ms() + deadline_ms,
            (first, started),
            _PENDING_TTL_S,
            self.front.retention_s,
            minted_id=minted,
        )
        if result.evicted:
            await self.front.evict(info, result.evicted, slots_total)
        if result.status == AdmitStatus.EXISTS:
            raise _task_exists(task.task_id)
        if result.status == AdmitStatus.FULL:
            raise self.front.full(info, limits, result, slots_total)
        self.front.enqueued(info, priority)
        position = result.position
        in_window = first <= position < first + len(starts)
        if in_window:
            predicted, on_time = offered[position - first]
        else:
            predicted = self._predictions(rs, position, 1, slots_total, tokens, eta)[0]
            on_time = self.estimator.on_time_probability(rs, predicted, tokens, deadline_ms)
        # -1: `started` carried a neighbour's prediction, so the next scan sends this position's frame.
        self.watch.admitted(
            task.task_id,
            rs,
            priority,
            tokens,
            deadline_ms,
            position if in_window else -1,
            (result.depth_interactive, result.depth_batch),
        )
        backoff = 0
        if result.depth >= self.soft_watermark * limits.capacity:
            backoff = self.estimator.backoff_ms(rs, slots_total)
        log.info(
            "task admitted",
            extra={
                "event": "admission_accepted",
                "task_id": task.task_id,
                "queue_position": position,
                "predicted_start_ms": predicted,
                "engine": info.engine,
            },
        )
        return Admitted(task.task_id, rs, position, predicted, backoff, on_time)

    async def finish_eviction(self, rs: str, victim: str) -> None:
        """End a drop-lru victim whose evicting admission died before it could (the sweeper's call)."""
        info = self.registry.set_info(rs)
        if info is not None:  # else the set's pools are not back yet: the next sweep retries
            await self.front.evict(info, victim, self.registry.slots(rs)[0])

    def _slots_total(self, rs: str) -> int:
        """The set's Ready slots; while its on-demand model loads, the slots it will have."""
        total, _ = self.registry.slots(rs)
        return total or self.registry.configured_slots(rs)

    def _predictions(
        self, rs: str, first: int, count: int, slots_total: int, tokens: int, eta: int | None
    ) -> list[int]:
        starts = self.estimator.predicted_starts(rs, first, count, slots_total, tokens)
        return [start + (eta or 0) for start in starts]

    def _check_deadline(self, info: SetInfo, predicted: int, deadline_ms: int) -> None:
        """SPEC §5.1 check 11: refuse a task whose predicted start already misses its deadline."""
        if predicted > deadline_ms:
            self.metrics.tasks_rejected.labels(info.engine, Code.DEADLINE_UNMET.value).inc()
            raise OrchestratorError(
                Code.DEADLINE_UNMET,
                f"the predicted start ({predicted} ms) is past deadline_ms ({deadline_ms}); "
                "raise the deadline or retry when the queue is shorter",
                predicted_start_ms=predicted,
            )


def _refuse_never_fits(model_ref: str, pools: Sequence[types_pb2.PoolState]) -> None:
    """An on-demand model too big for every device it may load on: a clear 400, never a task queued
    forever (issue 13)."""
    if not pools:
        return
    reasons = [never_fits(dict(p.need_bytes), dict(p.device_total_bytes), p.headroom_bytes) for p in pools]
    if all(reasons):
        raise invalid(
            "model_ref",
            f"model {model_ref} cannot load on any GPU: {reasons[0]}",
            vram_need_bytes=max(max(p.need_bytes.values(), default=0) for p in pools),
            device_total_bytes=max(max(p.device_total_bytes.values(), default=0) for p in pools),
        )


def _task_exists(task_id: str) -> OrchestratorError:
    return OrchestratorError(Code.TASK_EXISTS, f"task {task_id} is still known; choose another task_id")


def _prompt_est(prompt: str, inputs: Sequence[str]) -> int:
    """SPEC §2.2: ceil(UTF-8 bytes of the prompt and the other inputs / 4)."""
    return math.ceil((len(prompt.encode()) + sum(len(i.encode()) for i in inputs[1:])) / 4)
