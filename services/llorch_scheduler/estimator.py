"""Queue estimates: a small online model per replica set (SPEC §5.2).

Service time per task = tokens * EWMA(ms per output token), with the config prior until the set has
finished a task. The tasks ahead are list-scheduled onto the set's slots. A richer model (variance,
log-normal on-time probability) belongs to the admission issue; this one is deliberately plain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SetRates:
    ms_per_token: float
    samples: int = 0


@dataclass
class Estimator:
    alpha: float
    prior_ms_per_token: float
    backoff_min_ms: int
    backoff_max_ms: int
    rates: dict[str, SetRates] = field(default_factory=dict)

    def _rate(self, rs: str) -> SetRates:
        return self.rates.setdefault(rs, SetRates(self.prior_ms_per_token))

    def observe(self, rs: str, tokens_out: int, decode_ms: int) -> None:
        if tokens_out <= 0:
            return
        rate = self._rate(rs)
        sample = decode_ms / tokens_out
        rate.ms_per_token = (
            sample if rate.samples == 0 else self.alpha * sample + (1 - self.alpha) * rate.ms_per_token
        )
        rate.samples += 1

    def service_ms(self, rs: str, tokens: int) -> float:
        return tokens * self._rate(rs).ms_per_token

    def predicted_start_ms(
        self, rs: str, position: int, slots_total: int, slots_free: int, tokens: int
    ) -> int:
        """0 when a slot is free for this position; else whole service rounds ahead of it."""
        if position < slots_free:
            return 0
        rounds = (position - slots_free) // max(1, slots_total) + 1
        return int(rounds * self.service_ms(rs, tokens))

    def on_time_probability(self, predicted_start_ms: int, service_ms: float, deadline_ms: int) -> float:
        """P(start + service ≤ deadline) under a ±50 % spread around the point estimate."""
        finish = predicted_start_ms + service_ms
        if finish <= 0:
            return 1.0
        ratio = deadline_ms / finish
        probability = 0.5 * (1 + math.erf(math.log(max(ratio, 1e-9)) / (0.5 * math.sqrt(2))))
        return round(min(1.0, max(0.0, probability)), 3)

    def backoff_ms(self, rs: str, slots_total: int, queued: int, tokens: int) -> int:
        """When a queue place should free up: one service round per slot-full of queued tasks."""
        rounds = queued / max(1, slots_total)
        estimate = int(max(1.0, rounds) * self.service_ms(rs, tokens) / max(1, slots_total))
        return min(self.backoff_max_ms, max(self.backoff_min_ms, estimate))
