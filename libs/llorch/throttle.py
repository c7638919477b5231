"""Throttles: a token bucket for requests per second (SPEC §2.5, §5.1)."""

from __future__ import annotations

import time
from dataclasses import dataclass


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
