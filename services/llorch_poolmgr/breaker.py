"""The circuit breaker of an engine's restarts (SPEC §5.6, OC-POOL-3011)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class Breaker:
    """`failures` failures within `window_s` open the circuit; resume closes it."""

    def __init__(self, failures: int, window_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = failures
        self.window_s = window_s
        self.clock = clock
        self._times: deque[float] = deque()

    def record(self) -> None:
        self._times.append(self.clock())

    def recent(self) -> int:
        cutoff = self.clock() - self.window_s
        while self._times and self._times[0] < cutoff:
            self._times.popleft()
        return len(self._times)

    @property
    def open(self) -> bool:
        return self.recent() >= self.limit

    def reset(self) -> None:
        self._times.clear()
