"""Admission's rate limits (SPEC §2.5, §5.1 checks 7 and 9), one home for both, with one backoff clamp:

- `rate_limit_rps` per replica set and class, summed over the set's member pools (a token bucket);
- `tokens_per_min` per API token: prompt_est + max_tokens reserved at admission over a sliding
  minute, corrected to what the task really produced when it ends.

Either refusal is 429 ADMISSION_REJECT with `policy_label: rate-limit` and the clamped wait.
"""

from __future__ import annotations

from collections.abc import Sequence

from llorch.config import ApiToken, PoolConfig
from llorch.errors import Code, OrchestratorError
from llorch.store import Priority
from llorch.throttle import BackoffClamp, TokenBucket, TokenWindow

from .metrics import SchedulerMetrics
from .registry import SetInfo


class Throttles:
    def __init__(
        self,
        pools: Sequence[PoolConfig],
        tokens: Sequence[ApiToken],
        clamp: BackoffClamp,
        metrics: SchedulerMetrics,
    ) -> None:
        self.clamp = clamp
        self.metrics = metrics
        self._pools = {p.id: p for p in pools}
        self._buckets: dict[tuple[str, Priority], TokenBucket] = {}
        self._windows = {t.name: TokenWindow(t.tokens_per_min) for t in tokens if t.tokens_per_min}

    def check_rate(self, info: SetInfo, priority: Priority) -> None:
        """The set's per-class requests per second."""
        members = [self._pools[p] for p in info.pool_ids if p in self._pools]
        rps = sum(getattr(p.admission, priority).rate_limit_rps or 0.0 for p in members)
        if rps <= 0:
            return
        wait_ms = self._buckets.setdefault((info.rs, priority), TokenBucket(rps)).take()
        if wait_ms:
            raise self._refuse(info, wait_ms, f"{priority} tasks for this model are limited to {rps:g}/s")

    def reserve_tokens(
        self, client: str, task_id: str, info: SetInfo, prompt_est: int, max_tokens: int
    ) -> None:
        """The caller's tokens per minute; a reservation made here is released or settled later."""
        window = self._windows.get(client)
        if window is None:
            return
        wait_ms = window.reserve(task_id, prompt_est, max_tokens)
        if wait_ms:
            raise self._refuse(info, wait_ms, f"this API token may use {window.limit} tokens per minute")

    def release(self, task_id: str) -> None:
        """The admission failed after its reservation: give the tokens back."""
        for window in self._windows.values():
            window.release(task_id)

    def settle(self, task_id: str, tokens_out: int) -> None:
        """Correct a reservation to what the task really produced."""
        for window in self._windows.values():
            window.settle(task_id, tokens_out)

    def _refuse(self, info: SetInfo, wait_ms: int, what: str) -> OrchestratorError:
        backoff = self.clamp(wait_ms)
        self.metrics.tasks_rejected.labels(info.engine, Code.ADMISSION_REJECT.value).inc()
        self.metrics.backpressure.labels(info.engine, "rate-limit").inc()
        return OrchestratorError(
            Code.ADMISSION_REJECT,
            f"{what}; retry after {backoff} ms",
            engine=info.engine,
            policy_label="rate-limit",
            retry_after_ms=backoff,
        )
