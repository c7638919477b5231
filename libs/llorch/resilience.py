"""Long-lived loops that outlive their dependencies' faults (a Redis restart, a dropped connection).

:func:`until_done` retries one step with jittered exponential backoff until it succeeds, and an
:class:`Outage` logs a dependency's outage once when it starts and once when it ends, however many
attempts fail in between.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeVar

from redis.exceptions import RedisError
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    stop_never,
    wait_exponential_jitter,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

STORE_ERRORS: tuple[type[BaseException], ...] = (RedisError, ConnectionError, OSError)
"""What a lost or restarting Redis raises through redis-py."""

BACKOFF_INITIAL_S = 0.05
BACKOFF_MAX_S = 2.0

RESTART_INITIAL_S: Final = 0.5
RESTART_MAX_S: Final = 15.0
STABLE_S: Final = 60.0
GIVE_UP_EXITS: Final = 5
GIVE_UP_WINDOW_S: Final = 60.0


@dataclass(frozen=True)
class RestartPolicy:
    """How a supervisor restarts a child process that exits (``llorch up``'s services, the gateway's
    workers): after ``initial_s``, doubling per consecutive failure up to ``max_s``; a run of at least
    ``stable_s`` resets the count; ``give_up_exits`` exits within ``window_s`` mean giving up."""

    initial_s: float = RESTART_INITIAL_S
    max_s: float = RESTART_MAX_S
    stable_s: float = STABLE_S
    give_up_exits: int = GIVE_UP_EXITS
    window_s: float = GIVE_UP_WINDOW_S

    def delay_s(self, attempt: int) -> float:
        """The wait before restart number ``attempt`` (1-based) of a run of failures."""
        return float(min(self.max_s, self.initial_s * 2 ** max(0, attempt - 1)))


class Outage:
    """One warning when ``what`` starts failing, one info line with the duration when it recovers."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.down_since: float | None = None

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def failed(self, exc: BaseException | None) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning(
                "dependency lost",
                extra={"event": "outage_started", "what": self.what, "error": type(exc).__name__},
            )

    def recovered(self) -> None:
        if self.down_since is not None:
            down_ms = int((time.monotonic() - self.down_since) * 1000)
            self.down_since = None
            log.info(
                "dependency back", extra={"event": "outage_ended", "what": self.what, "down_ms": down_ms}
            )


async def until_done(
    step: Callable[[], Awaitable[T]],
    outage: Outage,
    errors: tuple[type[BaseException], ...] = STORE_ERRORS,
    attempts: int | None = None,
) -> T:
    """Run ``step`` until it succeeds (or ``attempts`` ran out: the last error is raised).

    The waits between attempts are 50 ms doubling to 2 s, each with up to 50 ms of jitter. The
    first attempt runs bare: every event-log flush and every dispatcher fill comes through here, and
    almost all of them succeed at once, so tenacity's per-call machinery is built only after a
    failure (it then runs the remaining attempts, its waits starting one doubling on)."""
    try:
        result = await step()
    except errors as exc:
        if attempts is not None and attempts <= 1:
            raise
        outage.failed(exc)
        await asyncio.sleep(BACKOFF_INITIAL_S + random.uniform(0, BACKOFF_INITIAL_S))
    else:
        outage.recovered()
        return result

    def before_sleep(state: RetryCallState) -> None:
        outage.failed(state.outcome.exception() if state.outcome else None)

    retrying = AsyncRetrying(
        retry=retry_if_exception_type(errors),
        wait=wait_exponential_jitter(
            multiplier=2 * BACKOFF_INITIAL_S, max=BACKOFF_MAX_S, jitter=BACKOFF_INITIAL_S
        ),
        stop=stop_never if attempts is None else stop_after_attempt(attempts - 1),
        before_sleep=before_sleep,
        reraise=True,
    )

    async def attempt() -> T:  # a coroutine function, so tenacity awaits what ``step`` returns
        return await step()

    result = await retrying(attempt)
    outage.recovered()
    return result
