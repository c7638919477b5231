"""The supervisor of `llorch up`: start the children in order, restart a dead one with backoff, give up
when one keeps dying, stop them in reverse order.

Policy (:class:`llorch.resilience.RestartPolicy`, shared with the gateway's workers):
- A child that exits while the stack runs is restarted after ``RESTART_INITIAL_S`` (0.5 s), doubling per
  consecutive failure up to ``RESTART_MAX_S`` (15 s). A child that ran ``STABLE_S`` (60 s) or longer before
  it exited counts as a first failure again.
- When one child has exited ``GIVE_UP_EXITS`` (5) times within ``GIVE_UP_WINDOW_S`` (60 s), the supervisor
  gives up: it says which child and its last exit code, stops the stack and `llorch up` exits 1.
- A child that cannot even be spawned (a missing binary, Redis that never answers) counts as an exit.

Each restart is one JSON log line (event ``child_restart``: child, exit_code, attempt, delay_ms) and one
increment of ``llorch_service_restarts_total{service}``. Every child runs in its own process group (so
Ctrl-C reaches only `llorch up`, which then stops them in order) with a parent-death signal (so none
outlives a SIGKILLed `llorch up`); its group is swept with SIGKILL when it exits or is stopped.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from prometheus_client import CollectorRegistry, Counter

from llorch import orphans
from llorch.resilience import RestartPolicy

from .embedded_redis import EmbeddedRedis

DEFAULT_RESTART: Final = RestartPolicy()

log = logging.getLogger(__name__)

STOP_GRACE_S: Final = 15.0
REDIS_READY_S: Final = 10.0


class SupervisorMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.restarts = Counter(
            "llorch_service_restarts_total",
            "restarts of a `llorch up` child by the supervisor",
            ["service"],
            registry=registry,
        )


class Child(Protocol):
    name: str
    stops_last: bool  # a dependency of the others (Redis): stopped once they have exited
    stop_grace_s: float  # how long it may take to exit after SIGTERM before its group is SIGKILLed

    def spawn(self) -> int:
        """Start it; return its pid. Raises OSError or ChildStartError."""
        ...

    def poll(self) -> int | None: ...

    def terminate(self) -> None: ...

    def wait(self, timeout_s: float) -> bool: ...

    def kill(self) -> None:
        """SIGKILL its whole process group and reap it."""
        ...


class ChildStartError(Exception):
    pass


class ServiceChild:
    """`python -m llorch_cli.main <args>`: a gateway, scheduler or pool manager."""

    stops_last = False

    def __init__(
        self, name: str, args: Sequence[str], env: dict[str, str], stop_grace_s: float = STOP_GRACE_S
    ) -> None:
        self.name = name
        self.argv = [sys.executable, "-m", "llorch_cli.main", *args]
        self.env = env
        self.stop_grace_s = stop_grace_s
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> int:
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env,
            start_new_session=True,
            preexec_fn=orphans.preexec(signal.SIGTERM),  # noqa: PLW1509 - prctl only
        )
        return self.proc.pid

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float) -> bool:
        if self.proc is None:
            return True
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


class RedisChild:
    """The embedded Redis: restarted on the same port and data directory, so clients reconnect."""

    name = "redis"
    stops_last = True
    stop_grace_s = STOP_GRACE_S

    def __init__(self, server: EmbeddedRedis) -> None:
        self.server = server

    def spawn(self) -> int:
        pid = self.server.spawn()
        if not self.server.wait_ready(REDIS_READY_S):
            raise ChildStartError(f"Redis did not answer; see {self.server.dir / 'server.log'}")
        return pid

    def poll(self) -> int | None:
        return self.server.poll()

    def terminate(self) -> None:
        if self.server.proc is not None and self.server.proc.poll() is None:
            self.server.proc.terminate()

    def wait(self, timeout_s: float) -> bool:
        if self.server.proc is None:
            return True
        try:
            self.server.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        self.server.kill()


@dataclass
class _Slot:
    child: Child
    started_at: float = 0.0
    attempt: int = 0  # consecutive failures
    restart_at: float | None = None  # set while the child is down and waiting for its restart
    exits: collections.deque[float] = field(default_factory=collections.deque)


class GaveUp(Exception):
    """A child kept dying; the message says which and how."""


class Supervisor:
    """Synchronous: `step()` is called from the main loop of `llorch up` (the one thread that forks)."""

    def __init__(
        self,
        children: Sequence[Child],
        metrics: SupervisorMetrics,
        policy: RestartPolicy = DEFAULT_RESTART,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = [_Slot(c) for c in children]
        self.metrics = metrics
        self.policy = policy
        self.clock = clock
        self.stopping = False
        for child in children:
            metrics.restarts.labels(child.name)

    def start(self) -> None:
        """Start every child in order; Redis (first) is waited for, the rest are not."""
        for slot in self.slots:
            self._spawn(slot)
            if slot.restart_at is not None:
                raise GaveUp(f"{slot.child.name} did not start; see the log lines above")

    def step(self) -> None:
        """Notice exits, schedule and run restarts. Raises GaveUp."""
        now = self.clock()
        for slot in self.slots:
            if self.stopping:
                return
            if slot.restart_at is None:
                code = slot.child.poll()
                if code is not None:
                    self._exited(slot, code, now)
            elif now >= slot.restart_at:
                self.metrics.restarts.labels(slot.child.name).inc()
                self._spawn(slot)

    def stop(self) -> None:
        """Stop the children in reverse order, Redis after the rest: SIGTERM a tier, wait for each up to
        its grace (counted from the tier's SIGTERM), SIGKILL a straggler's group."""
        self.stopping = True
        ordered = list(reversed(self.slots))
        for tier in (
            [s for s in ordered if not s.child.stops_last],
            [s for s in ordered if s.child.stops_last],
        ):
            for slot in tier:
                slot.child.terminate()
            signalled = time.monotonic()
            for slot in tier:
                left = signalled + slot.child.stop_grace_s - time.monotonic()
                if not slot.child.wait(max(0.0, left)):
                    log.warning(
                        "child did not stop in time; killing it",
                        extra={"event": "child_kill", "child": slot.child.name},
                    )
                slot.child.kill()  # also sweeps whatever it left in its process group

    def _spawn(self, slot: _Slot) -> None:
        slot.restart_at = None
        try:
            pid = slot.child.spawn()
        except (OSError, ChildStartError) as exc:
            log.error(
                "child failed to start",
                extra={"event": "child_start_failed", "child": slot.child.name, "error": str(exc)},
            )
            slot.child.kill()
            self._exited(slot, None, self.clock())
            return
        slot.started_at = self.clock()
        log.info("child started", extra={"event": "child_started", "child": slot.child.name, "pid": pid})

    def _exited(self, slot: _Slot, code: int | None, now: float) -> None:
        slot.child.kill()  # reap, and sweep its process group
        if now - slot.started_at >= self.policy.stable_s:
            slot.attempt = 0
        slot.attempt += 1
        slot.exits.append(now)
        while slot.exits and now - slot.exits[0] > self.policy.window_s:
            slot.exits.popleft()
        if len(slot.exits) >= self.policy.give_up_exits:
            raise GaveUp(
                f"giving up: {slot.child.name} exited {len(slot.exits)} times within "
                f"{self.policy.window_s:g} s (last exit code {code}); stopping the stack"
            )
        delay = self.policy.delay_s(slot.attempt)
        slot.restart_at = now + delay
        log.warning(
            "child exited; restarting",
            extra={
                "event": "child_restart",
                "child": slot.child.name,
                "exit_code": code,
                "attempt": slot.attempt,
                "delay_ms": int(delay * 1000),
            },
        )
