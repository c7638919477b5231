"""Throttles: a token bucket for requests per second (SPEC §2.5, §5.1)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class TokenBucket:
    """Requests per second with a burst of max(1, 2 * rps) (SPEC §2.5)."""

    rps: float
    tokens: float = 0.0
    at: float = 0.0

    def __post_init__(self) -> None:
        self.tokens, self.at = self.burst, time.monotonic()

    @property
    def burst(self) -> float:
        return max(1.0, 2 * self.rps)

    def take(self) -> int:
        """0 if a request fits now, else the ms until one would."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rps)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0
        return int((1 - self.tokens) / self.rps * 1000) + 1


WINDOW_S = 60.0


@dataclass
class TokenWindow:
    """`tokens_per_min`: prompt_est + max_tokens reserved at admission over a 60 s sliding window,
    corrected to the real count (prompt_est + tokens_out) when the task ends (SPEC §2.5)."""

    limit: int
    entries: dict[str, tuple[float, int, int]] = field(default_factory=dict)  # task -> (at, tokens, prompt)

    def reserve(self, task_id: str, prompt_est: int, max_tokens: int) -> int:
        """0 if the reservation fits (and is made), else the ms until it would fit."""
        now = time.monotonic()
        for key in [k for k, (at, _, _) in self.entries.items() if now - at >= WINDOW_S]:
            del self.entries[key]
        need = prompt_est + max_tokens
        used = sum(tokens for _, tokens, _ in self.entries.values())
        if used + need <= self.limit:
            self.entries[task_id] = (now, need, prompt_est)
            return 0
        freed = 0
        for at, tokens, _ in sorted(self.entries.values()):
            freed += tokens
            if used - freed + need <= self.limit:
                return int((at + WINDOW_S - now) * 1000) + 1
        return int(WINDOW_S * 1000)

    def settle(self, task_id: str, tokens_out: int) -> None:
        entry = self.entries.get(task_id)
        if entry is not None:
            at, _, prompt_est = entry
            self.entries[task_id] = (at, prompt_est + tokens_out, prompt_est)

    def release(self, task_id: str) -> None:
        self.entries.pop(task_id, None)


@dataclass(frozen=True)
class BackoffClamp:
    """The one clamp of every advertised backoff (SPEC §5.1: scheduler.backoff_min_ms..backoff_max_ms)."""

    min_ms: int
    max_ms: int

    def __call__(self, wait_ms: float) -> int:
        return int(min(self.max_ms, max(self.min_ms, wait_ms)))
