"""Queue estimates (SPEC §5.2): an online model of each replica set's service.

Per set it keeps EWMAs (``scheduler.ewma_alpha``) of milliseconds per output token, with their
variance, starting from ``scheduler.prior_ms_per_token``. A task's service time is its tokens
(``expected_tokens`` or ``max_tokens``) times that rate. The tasks ahead of a queued task are
list-scheduled onto the set's slots: each busy slot frees when its running task's expected service has
elapsed, each task ahead takes the set's mean task service, and the start of this task is when its slot
frees. ``on_time_probability`` treats the service time as log-normal with the EWMA's coefficient of
variation. Batch aging is not modelled: an aged batch task's position is reported as if unaged.
How good the estimates are is measured by ``make bench`` (P6), not asserted by tests.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from llorch.throttle import BackoffClamp

HEAP_POSITIONS = 64
"""Below this queue position a start is found by simulating the list schedule, above it by bisection."""
MIN_CV = 0.15
"""Floor of the service time's coefficient of variation: never claim more certainty than this."""


@dataclass
class SetModel:
    ms_per_token: float
    var_ms_per_token: float = 0.0
    task_ms: float = 0.0
    samples: int = 0
    running: dict[str, tuple[float, float]] = field(default_factory=dict)  # task -> (started, expected ms)


@dataclass
class Estimator:
    alpha: float
    prior_ms_per_token: float
    clamp: BackoffClamp
    sets: dict[str, SetModel] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic

    def _model(self, rs: str) -> SetModel:
        model = self.sets.get(rs)
        if model is None:
            model = self.sets[rs] = SetModel(self.prior_ms_per_token)
        return model

    # -- learning ------------------------------------------------------------------------------------

    def started(self, rs: str, task_id: str, tokens: int) -> None:
        self._model(rs).running[task_id] = (self.clock(), self.service_ms(rs, tokens))

    def finished(self, rs: str, task_id: str, tokens_out: int, decode_ms: int, ok: bool) -> None:
        model = self._model(rs)
        model.running.pop(task_id, None)
        if not ok or tokens_out <= 0:
            return
        sample = decode_ms / tokens_out
        if model.samples == 0:
            model.ms_per_token, model.task_ms = sample, float(decode_ms)
        else:
            diff = sample - model.ms_per_token
            model.ms_per_token += self.alpha * diff
            model.var_ms_per_token = (1 - self.alpha) * (model.var_ms_per_token + self.alpha * diff * diff)
            model.task_ms += self.alpha * (decode_ms - model.task_ms)
        model.samples += 1

    # -- estimates -----------------------------------------------------------------------------------

    def service_ms(self, rs: str, tokens: int) -> float:
        return tokens * self._model(rs).ms_per_token

    def _mean_task_ms(self, rs: str, tokens_hint: int) -> float:
        model = self._model(rs)
        return model.task_ms if model.samples else self.service_ms(rs, tokens_hint)

    def _free_at(self, rs: str, slots_total: int) -> list[float]:
        """When each of the set's slots frees up (ms from now), in ascending order: idle slots (0) first,
        then running tasks' expected remainder."""
        model = self._model(rs)
        now = self.clock()
        busy = [max(0.0, expected - (now - started) * 1000) for started, expected in model.running.values()]
        free_at = sorted(busy)[: max(1, slots_total)]
        return [0.0] * (max(1, slots_total) - len(free_at)) + free_at

    def starts_ms(self, rs: str, ahead_and_self: int, slots_total: int, tokens_hint: int) -> list[int]:
        """Predicted start (ms from now) of the first ``ahead_and_self`` queued tasks, in queue order."""
        free_at = self._free_at(rs, slots_total)  # ascending, so already a heap
        mean = self._mean_task_ms(rs, tokens_hint)
        starts = []
        for _ in range(ahead_and_self):
            start = heapq.heappop(free_at)
            starts.append(int(start))
            heapq.heappush(free_at, start + mean)
        return starts

    def predicted_start_ms(self, rs: str, position: int, slots_total: int, tokens_hint: int) -> int:
        """The list schedule's start for one position (see :meth:`predicted_starts`)."""
        return self.predicted_starts(rs, position, 1, slots_total, tokens_hint)[0]

    def predicted_starts(
        self, rs: str, first: int, count: int, slots_total: int, tokens_hint: int
    ) -> list[int]:
        """The list schedule's start for positions ``first … first+count-1``: position p starts at the
        (p+1)-th smallest of {free_i + k * mean : k >= 0}. The slots' free times are read once for the
        whole window. Near the head of the queue (the common case: every admission asks for a window
        there) by popping a heap, O(position * log slots); deeper, by the slots' ranks while the position
        is in the first round, else by bisection to 0.5 ms inside a bracket one task wide,
        O(slots * log mean) rather than O(position)."""
        free_at = self._free_at(rs, slots_total)
        mean = max(1.0, self._mean_task_ms(rs, tokens_hint))
        positions = range(first, first + count)
        if len(free_at) == 1:  # one slot: the bisection's answer in closed form
            return [int(free_at[0] + position * mean) for position in positions]
        if first + count <= HEAP_POSITIONS:  # free_at is ascending, so already a heap
            starts = []
            for position in range(first + count):
                if position >= first:
                    starts.append(int(free_at[0]))
                heapq.heapreplace(free_at, free_at[0] + mean)
            return starts
        # A position within the first round (its start comes before any slot's second task: at or
        # under the earliest free time plus one mean) starts when the slot at that rank frees; at a
        # burst into many idle slots that is every admission, and it spares the bisection's scans.
        second = free_at[0] + mean  # free_at is in ascending order
        return [
            int(free_at[position])
            if position < len(free_at) and free_at[position] <= second
            else _bisect_start(free_at, mean, position + 1)
            for position in positions
        ]

    def on_time_probability(self, rs: str, start_ms: int, tokens: int, deadline_ms: int) -> float:
        """P(start + service ≤ deadline), service log-normal around tokens times the EWMA rate."""
        budget = deadline_ms - start_ms
        if budget <= 0:
            return 0.0
        model = self._model(rs)
        mean = max(1e-6, self.service_ms(rs, tokens))
        cv = max(MIN_CV, math.sqrt(model.var_ms_per_token) / max(1e-6, model.ms_per_token))
        sigma2 = math.log(1 + cv * cv)
        mu = math.log(mean) - sigma2 / 2
        z = (math.log(budget) - mu) / math.sqrt(sigma2)
        return round(0.5 * (1 + math.erf(z / math.sqrt(2))), 3)

    def backoff_ms(self, rs: str, slots_total: int) -> int:
        """When a place in the queue should free up: the next slot to free, clamped (SPEC §5.1)."""
        first = self.starts_ms(rs, 1, slots_total, 1)[0]
        if first == 0:
            first = int(self._mean_task_ms(rs, 1))
        return self.clamp(first)


def _bisect_start(free_at: list[float], mean: float, wanted: int) -> int:
    """When the ``wanted``-th task of the list schedule starts. Every slot has started
    ``ceil(wanted / slots)`` tasks by ``max(free_at) + (that - 1) * mean``, and none can have started
    that many before ``min(free_at) + (that - 1) * mean``: the answer lies between the two."""

    def started_by(t: float) -> int:
        return sum(int((t - f) // mean) + 1 for f in free_at if f <= t)

    rounds = -(-wanted // len(free_at)) - 1
    lo, hi = min(free_at) + rounds * mean, max(free_at) + rounds * mean
    while hi - lo > 0.5:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if started_by(mid) >= wanted else (mid, hi)
    return int(hi) if started_by(lo) < wanted else int(lo)
