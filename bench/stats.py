"""Percentiles and the summaries the report prints; no numpy needed for a few hundred thousand samples."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (``q`` in 0..100) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass(frozen=True, slots=True)
class Dist:
    """p50/p99/max of a sample in milliseconds."""

    n: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, values_ms: Sequence[float]) -> Dist:
        ordered = sorted(values_ms)
        top = ordered[-1] if ordered else float("nan")
        return cls(len(ordered), percentile(ordered, 50), percentile(ordered, 99), top)

    def as_json(self) -> dict[str, float | int]:
        return {"n": self.n, "p50_ms": r3(self.p50_ms), "p99_ms": r3(self.p99_ms), "max_ms": r3(self.max_ms)}


@dataclass(frozen=True, slots=True)
class Spread:
    """A figure pooled over all rounds, with the min/max of the per-round figures."""

    value: float
    low: float
    high: float

    @classmethod
    def of(cls, pooled: float, per_round: Sequence[float]) -> Spread:
        return cls(pooled, min(per_round, default=pooled), max(per_round, default=pooled))

    def as_json(self, digits: int = 3) -> dict[str, float]:
        return {
            "value": round(self.value, digits),
            "min": round(self.low, digits),
            "max": round(self.high, digits),
        }


def added(stack: Dist, direct: Dist) -> tuple[float, float]:
    """What the stack adds at p50 and p99."""
    return stack.p50_ms - direct.p50_ms, stack.p99_ms - direct.p99_ms


def r3(value: float) -> float:
    return round(value, 3)
