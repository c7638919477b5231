"""Admission: resolve the replica set, run the guardrails, create the task and enqueue it atomically.

The gateway has already checked the request's shape; this checks it against what is served, in SPEC
§5.1's order. `started` is always seq 0: the dispatcher's mark-running step refuses a task whose
`started` has not landed yet and puts it back at the head of its class.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from llorch.config import LlorchConfig
from llorch.errors import Code, OrchestratorError, invalid
from llorch.ids import default_seed, is_valid_id, new_task_id
from llorch.store import Priority, SessionBudgets, Store, now_ms
from llorch.throttle import TokenWindow
from llorch.v1 import scheduler_pb2

from .estimator import Estimator
from .metrics import SchedulerMetrics
from .queueing import QueueFront
from .queuewatch import QueueWatch
from .registry import PoolRegistry, SetInfo, set_of
from .sessions import Sessions

log = logging.getLogger(__name__)

_PENDING_TTL_S = 7 * 24 * 3600
"""Safety TTL of a record that has not ended yet; a terminal event shortens it to the retention."""


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
        cfg: LlorchConfig,
        store: Store,
        registry: PoolRegistry,
        estimator: Estimator,
        metrics: SchedulerMetrics,
        watch: QueueWatch,
        sessions: Sessions,
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.registry = registry
        self.estimator = estimator
        self.metrics = metrics
        self.watch = watch
        self.sessions = sessions
        self.front = QueueFront(cfg, store, estimator, metrics, sessions)
        self.windows = {t.name: TokenWindow(t.tokens_per_min) for t in cfg.api.tokens if t.tokens_per_min}
        served = {p.model for p in cfg.pools}
        self.served_models = sorted(m.id for m in cfg.catalog.models if m.id in served)

    async def admit(self, req: scheduler_pb2.AdmitRequest) -> Admitted:
        task_id = req.task_id or new_task_id()
        if not is_valid_id(task_id):
            raise invalid("task_id", "task_id must match ^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
        if req.task_id and await self.store.task_exists(task_id):  # a minted UUID4 cannot collide
            raise _task_exists(task_id)
        info = self._resolve(req)
        priority: Priority = "batch" if req.priority == "batch" else "interactive"
        max_tokens = req.max_tokens or self.cfg.scheduler.default_max_tokens
        deadline_ms = req.deadline_ms or self.cfg.scheduler.default_deadline_ms
        prompt = req.prompt if req.HasField("prompt") else (req.inputs[0] if req.inputs else "")
        self._guardrails(req, info, max_tokens, deadline_ms, prompt)
        seed = req.seed if req.HasField("seed") else default_seed(task_id)
        determinism = self._determinism(req, info)
        fields = {
            "state": "queued",
            "rs": info.rs,
            "priority": priority,
            "model_ref": req.model_ref,
            "session_id": req.session_id,
            "engine": info.engine,
            "created_ms": str(now_ms()),
            "deadline_ms": str(deadline_ms),
            "request": json.dumps(
                {"prompt": prompt, "max_tokens": max_tokens, "seed": seed, "determinism": determinism}
            ),
        }
        tokens = req.expected_tokens or max_tokens
        prompt_est = _prompt_est(prompt, req.inputs)
        budgets = await self.sessions.admit(req, task_id, info, prompt_est, max_tokens)
        window = self.windows.get(req.client)
        try:
            self.front.throttle(info, priority)
            self._reserve_tokens(window, task_id, info, prompt_est, max_tokens)
            self._check_deadline(info, priority, tokens, deadline_ms)
            admitted = await self._enqueue(task_id, fields, info, priority, tokens, deadline_ms)
        except OrchestratorError:
            if window is not None:
                window.release(task_id)
            await self.sessions.undo(task_id)
            raise
        return replace(admitted, budgets=budgets)

    def _reserve_tokens(
        self, window: TokenWindow | None, task_id: str, info: SetInfo, prompt_est: int, max_tokens: int
    ) -> None:
        """The caller's `tokens_per_min` (SPEC §2.5, §5.1 check 9)."""
        if window is None:
            return
        wait_ms = window.reserve(task_id, prompt_est, max_tokens)
        if wait_ms:
            sched = self.cfg.scheduler
            backoff = min(sched.backoff_max_ms, max(sched.backoff_min_ms, wait_ms))
            self.metrics.tasks_rejected.labels(info.engine, Code.ADMISSION_REJECT.value).inc()
            self.metrics.backpressure.labels(info.engine, "rate-limit").inc()
            raise OrchestratorError(
                Code.ADMISSION_REJECT,
                f"this API token may use {window.limit} tokens per minute; retry after {backoff} ms",
                engine=info.engine,
                policy_label="rate-limit",
                retry_after_ms=backoff,
            )

    def settle(self, task_id: str, tokens_out: int) -> None:
        """Correct a tokens_per_min reservation to what the task really produced."""
        for window in self.windows.values():
            window.settle(task_id, tokens_out)

    def _resolve(self, req: scheduler_pb2.AdmitRequest) -> SetInfo:
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
        if not ready:
            raise OrchestratorError(
                Code.POOL_UNREADY,
                f"no replica serving {req.model_ref} is Ready yet; retry shortly",
                retry_after_ms=1000,
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

    def _determinism(self, req: scheduler_pb2.AdmitRequest, info: SetInfo) -> str:
        """`strict` when the set can do it (not vllm, every replica one slot: OC-ADAPT-5010)."""
        capable = info.engine != "vllm" and info.single_slot
        if req.determinism == "strict" and not capable:
            raise invalid(
                "determinism", "this model's replicas cannot run strict determinism; use best_effort"
            )
        return req.determinism or ("strict" if capable else "best_effort")

    def _guardrails(
        self, req: scheduler_pb2.AdmitRequest, info: SetInfo, max_tokens: int, deadline_ms: int, prompt: str
    ) -> None:
        if req.ctx > info.ctx:
            raise invalid("ctx", f"ctx must be between 0 and {info.ctx} for this model")
        if max_tokens > info.max_tokens_limit:
            raise invalid("max_tokens", f"max_tokens must be between 1 and {info.max_tokens_limit}")
        effective_ctx = req.ctx or info.ctx
        prompt_est = _prompt_est(prompt, req.inputs)
        if prompt_est + max_tokens > effective_ctx:
            raise invalid(
                "max_tokens",
                f"prompt (~{prompt_est} tokens) + max_tokens ({max_tokens}) exceeds ctx {effective_ctx}; "
                "shorten the prompt or lower max_tokens",
            )
        if deadline_ms <= 0:
            raise OrchestratorError(Code.DEADLINE_UNMET, "deadline_ms must be > 0", predicted_start_ms=0)
        if deadline_ms > self.cfg.scheduler.max_deadline_ms:
            raise invalid("deadline_ms", f"deadline_ms must be at most {self.cfg.scheduler.max_deadline_ms}")

    async def _enqueue(
        self,
        task_id: str,
        fields: dict[str, str],
        info: SetInfo,
        priority: Priority,
        tokens: int,
        deadline_ms: int,
    ) -> Admitted:
        """Enqueue first (a full queue costs one round trip), then create the record with `started`.

        The dispatcher may claim the task before its record exists; mark_running then puts it back.
        """
        rs = info.rs
        slots_total, _ = self.registry.slots(rs)
        result = await self.front.enqueue(task_id, info, priority, now_ms() + deadline_ms, slots_total)
        position = result.position
        predicted = self.estimator.predicted_start_ms(rs, position, slots_total, tokens)
        on_time = self.estimator.on_time_probability(rs, predicted, tokens, deadline_ms)
        started = {
            "task_id": task_id,
            "queue_position": position,
            "predicted_start_ms": predicted,
            "on_time_probability": on_time,
            "priority": priority,
        }
        data = json.dumps(started, separators=(",", ":"))
        created = await self.store.create_task(task_id, fields, _PENDING_TTL_S, data)
        if not created:
            await self.store.dequeue(rs, task_id)
            raise _task_exists(task_id)
        if created == 1:  # 2: displaced by a concurrent admission already; its stream says so
            self.watch.admitted(task_id, rs, priority, tokens, deadline_ms, position)
        backoff = 0
        if result.depth >= self.cfg.queue.soft_watermark * self.front.limits(info).capacity:
            backoff = self.estimator.backoff_ms(rs, slots_total)
        log.info(
            "task admitted",
            extra={
                "event": "admission_accepted",
                "task_id": task_id,
                "queue_position": position,
                "predicted_start_ms": predicted,
                "engine": info.engine,
            },
        )
        return Admitted(task_id, rs, position, predicted, backoff, on_time)

    def _check_deadline(self, info: SetInfo, priority: Priority, tokens: int, deadline_ms: int) -> None:
        """SPEC §5.1 check 11: refuse a task whose predicted start already misses its deadline."""
        slots_total, _ = self.registry.slots(info.rs)
        ahead = self.watch.depth_ahead(info.rs, priority)
        predicted = self.estimator.predicted_start_ms(info.rs, ahead, slots_total, tokens)
        if predicted > deadline_ms:
            self.metrics.tasks_rejected.labels(info.engine, Code.DEADLINE_UNMET.value).inc()
            raise OrchestratorError(
                Code.DEADLINE_UNMET,
                f"the predicted start ({predicted} ms) is past deadline_ms ({deadline_ms}); "
                "raise the deadline or retry when the queue is shorter",
                predicted_start_ms=predicted,
            )


def _task_exists(task_id: str) -> OrchestratorError:
    return OrchestratorError(Code.TASK_EXISTS, f"task {task_id} is still known; choose another task_id")


def _prompt_est(prompt: str, inputs: Sequence[str]) -> int:
    """SPEC §2.2: ceil(UTF-8 bytes of the prompt and the other inputs / 4)."""
    return math.ceil((len(prompt.encode()) + sum(len(i.encode()) for i in inputs[1:])) / 4)
