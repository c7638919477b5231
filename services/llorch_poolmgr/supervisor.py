"""Engine supervision: the state machine of one replica, from preload to Ready and back after a failure.

A replica's life (SPEC §5.6): `Stopped` (preload: false or residency: on-demand, until resume) →
`Preloading` (the VRAM and RAM checks, then the launch) → `SelfTest` → `Ready`. Any failure — a short
check, an engine that never turns healthy, a failed self-test, an exit, three missed health probes, a
stuck engine, a driver fault — records `last_error`, counts `engine_restarts_total{reason}` and leads
to `Backoff`. Restarts are a tenacity retry loop: the wait is `initial_backoff_ms` x 2^(n-1), capped at
`max_backoff_ms`, ±20 % jitter, where n counts the failures inside the breaker window (so a replica
that ran well for a while starts again from the initial backoff). `breaker_failures` failures within
`breaker_window_s` open the circuit: the replica stays `Unavailable` until resume. A configuration
error that no retry can fix (a VRAM need beyond the devices' total memory) goes to `Failed` at once,
which also waits for resume.

The engine child itself is :class:`~.process.EngineProcess`; watching it (health, liveness,
telemetry) is :class:`~.watcher.HealthWatcher`. This module only decides the states.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path
from typing import Final

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from llorch import gpu
from llorch.adapters.base import EngineAdapter
from llorch.config import PoolConfig
from llorch.gguf_meta import ModelFacts, facts_of

from . import preload
from .breaker import Breaker
from .faults import Failure, PoolError, oom_kill_count
from .metrics import PoolMetrics
from .process import EngineProcess, resolve_binary
from .selftest import SelfTestFailed, run_selftest
from .telemetry import Telemetry
from .watcher import HealthWatcher

__all__ = ["Replica", "ReplicaState", "resolve_binary"]

log = logging.getLogger(__name__)

VRAM_OOM_BUMP: Final = 1.1


class ReplicaState(StrEnum):
    """A replica's state; the values are the wire strings of PoolState/ReplicaState.state."""

    STOPPED = "Stopped"
    PRELOADING = "Preloading"
    SELFTEST = "SelfTest"
    READY = "Ready"
    BACKOFF = "Backoff"
    UNAVAILABLE = "Unavailable"  # circuit open
    FAILED = "Failed"  # a configuration error: retrying cannot help


_WAITS_FOR_RESUME: Final = frozenset({ReplicaState.STOPPED, ReplicaState.UNAVAILABLE, ReplicaState.FAILED})


def _kv_bytes_per_token(model_path: Path, facts: ModelFacts | None = None) -> int:
    """KV bytes one cached token holds: exact (f16) from the GGUF `facts` when they give the attention
    shape, else estimated from the model's size (SPEC §5.4's fallback)."""
    exact = facts.kv_bytes_per_token() if facts is not None else None
    if exact is not None:
        return exact
    try:
        return gpu.kv_reserve_estimate(1, 1, preload.model_bytes(model_path))
    except OSError:
        return 0


def _as_preload(failure: Failure | None) -> Failure | None:
    """An exit during preload is a preload failure, unless the engine named a more precise cause."""
    if failure is not None and failure.code == PoolError.ENGINE_CRASHED:
        return Failure(PoolError.PRELOAD_FAILED, failure.message)
    return failure


class EngineFailed(Exception):
    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class ConfigFailed(Exception):
    """A failure no restart can fix: the replica goes to Failed."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


class Replica:
    """One engine process of a pool, as a state machine over :class:`ReplicaState`."""

    def __init__(
        self,
        pool: PoolConfig,
        index: int,
        model_path: Path,
        devices: list[int] | None,
        state_dir: Path,
        probe: gpu.GpuProbe,
        metrics: PoolMetrics,
        on_change: Callable[[], None],
        generation: int = 0,
    ) -> None:
        """``generation``: 0 for the replicas the manager starts with, n after the n-th reload (its
        replica ids get ``-g<n>``, so old and new engines can run side by side)."""
        self.pool = pool
        self.index = index
        self.replica_id = f"{pool.id}-r{index}" + (f"-g{generation}" if generation else "")
        self.model_path = model_path
        self.devices = devices
        self.probe = probe
        self.metrics = metrics
        self.on_change = on_change
        # An on-demand pool starts unloaded: the scheduler loads it (Resume) when its queue needs it. A
        # reload's successor loads at once, since the reload waits for it to be Ready.
        loads = (pool.preload and not pool.on_demand) or generation > 0
        self.state = ReplicaState.PRELOADING if loads else ReplicaState.STOPPED
        self.engine_version = ""
        self.slots_total = pool.slots
        self.restarts = 0
        self.last_error: tuple[str, str, int] | None = None
        self.running: set[str] = set()
        self.draining = False  # the operator drained its pool: no new task until resume
        self.adapter: EngineAdapter | None = None
        self.breaker = Breaker(pool.restart.breaker_failures, pool.restart.breaker_window_s)
        self.vram_bump = 1.0
        self.kv_bytes_per_token = _kv_bytes_per_token(model_path)
        self.process = EngineProcess(
            pool, self.replica_id, model_path, devices, state_dir, lambda: self.state == ReplicaState.READY
        )
        self.watcher = HealthWatcher(pool, self.replica_id, devices, probe, metrics)
        self._resume = asyncio.Event()

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def telemetry(self) -> Telemetry:
        return self.watcher.telemetry

    @property
    def circuit(self) -> str:
        return "open" if self.state == ReplicaState.UNAVAILABLE else "closed"

    @property
    def device_labels(self) -> list[str]:
        return ["cpu"] if self.devices is None else [str(d) for d in self.devices]

    def _set_state(self, state: ReplicaState, error: Failure | None = None) -> None:
        if error is not None:
            self.last_error = (error.code.value, error.message, int(time.time() * 1000))
        if state != self.state:
            log.info(
                "replica state change",
                extra={
                    "event": "pool_state_change",
                    "pool_id": self.pool.id,
                    "replica_id": self.replica_id,
                    "state": state.value,
                    "code": error.code.value if error else None,
                    "reason": error.message if error else None,
                },
            )
        self.state = state
        self.on_change()

    def resume(self) -> None:
        """Start a Stopped or Failed replica, or close an open circuit (SPEC §5.6); a no-op otherwise."""
        self._resume.set()

    def suspect(self) -> None:
        """The watchdog timed a task out here: check that the engine still decodes at all."""
        self.watcher.suspected.set()

    async def run(self) -> None:
        """Preload, serve and restart until cancelled; wait for resume while Stopped, Unavailable or
        Failed."""
        try:
            while True:
                if self.state in _WAITS_FOR_RESUME:
                    self._resume.clear()
                    await self._resume.wait()
                    self.breaker.reset()
                    self._set_state(ReplicaState.PRELOADING)
                try:
                    async for attempt in AsyncRetrying(
                        wait=self._backoff_s,
                        retry=retry_if_exception_type(EngineFailed),
                        stop=lambda _state: self.breaker.open,
                        reraise=True,
                    ):
                        with attempt:
                            await self._serve_typed()
                except EngineFailed as exc:
                    self._open_circuit(exc.failure)
                except ConfigFailed as exc:
                    self._config_failed(exc.failure)
        finally:
            await self.process.stop()
            self.probe.release(self.replica_id)
            self.state = ReplicaState.STOPPED

    def _backoff_s(self, _state: RetryCallState) -> float:
        restart = self.pool.restart
        n = max(1, self.breaker.recent())
        base = min(restart.max_backoff_ms, restart.initial_backoff_ms * 2 ** (n - 1))
        return float(base) * random.uniform(0.8, 1.2) / 1000

    def _open_circuit(self, failure: Failure) -> None:
        restart = self.pool.restart
        message = (
            f"{restart.breaker_failures} failures within {restart.breaker_window_s} s; "
            f"last: {failure.code.value}: {failure.message}. POST /v1/pools/{self.pool.id}/resume to retry"
        )
        log.error(
            "circuit open",
            extra={"event": "circuit_open", "pool_id": self.pool.id, "replica_id": self.replica_id},
        )
        self._set_state(ReplicaState.UNAVAILABLE, Failure(PoolError.CIRCUIT_OPEN, message))

    def _config_failed(self, failure: Failure) -> None:
        log.error(
            "replica cannot start: configuration error",
            extra={
                "event": "pool_config_error",
                "pool_id": self.pool.id,
                "replica_id": self.replica_id,
                "code": failure.code.value,
                "reason": failure.message,
            },
        )
        self._set_state(ReplicaState.FAILED, failure)

    def _failed(self, failure: Failure) -> EngineFailed:
        """Record a failure; the caller raises what this returns."""
        self.breaker.record()
        self.restarts += 1
        self.metrics.engine_restarts.labels(self.pool.id, failure.kind).inc()
        if failure.code == PoolError.VRAM_OOM:
            self.vram_bump *= VRAM_OOM_BUMP
        if failure.code == PoolError.DRIVER_FAULT:
            for device in self.device_labels:
                self.metrics.driver_resets.labels(self.pool.id, device).inc()
            log.error(
                "driver fault",
                extra={"event": "driver_reset", "pool_id": self.pool.id, "replica_id": self.replica_id},
            )
        log.warning(
            "engine failed",
            extra={
                "event": "engine_restart",
                "pool_id": self.pool.id,
                "replica_id": self.replica_id,
                "code": failure.code.value,
                "reason": failure.message,
            },
        )
        self._set_state(ReplicaState.BACKOFF, failure)
        return EngineFailed(failure)

    def _preload_outcome(self, outcome: str) -> None:
        self.metrics.preload_outcomes.labels(self.pool.id, outcome).inc()
        log.info(
            "preload outcome",
            extra={
                "event": "preload_outcome",
                "pool_id": self.pool.id,
                "replica_id": self.replica_id,
                "outcome": outcome,
            },
        )

    async def _serve_typed(self) -> None:
        """:meth:`_serve`, with an unexpected exception (a bug, an OS error) turned into a typed failure:
        it is logged with its traceback, counts against the breaker and restarts the engine like a crash,
        instead of ending the replica's run loop with the pool stuck in its last state."""
        try:
            await self._serve()
        except (EngineFailed, ConfigFailed):
            raise
        except Exception as exc:
            log.exception(
                "unexpected error in the replica's supervision",
                extra={"event": "replica_error", "pool_id": self.pool.id, "replica_id": self.replica_id},
            )
            message = f"unexpected pool manager error: {type(exc).__name__}: {exc}"
            raise self._failed(Failure(PoolError.ENGINE_UNHEALTHY, message)) from exc

    async def _serve(self) -> None:
        """One life of the engine: checks, launch, self-test, Ready, watch. Always ends by raising."""
        self._set_state(ReplicaState.PRELOADING)
        # Parsed once per file version, in a worker process (seconds on a big vocabulary), then cached.
        facts = await facts_of(self.model_path)
        self.kv_bytes_per_token = _kv_bytes_per_token(self.model_path, facts)
        plan = preload.check(
            self.pool, self.devices, self.model_path, self.probe, self.vram_bump, facts=facts
        )
        if isinstance(plan, Failure):
            self._preload_outcome(plan.code.value.lower())
            if plan.permanent:
                raise ConfigFailed(plan)
            raise self._failed(plan)
        oom_kills = oom_kill_count()
        process = self.process
        try:
            self.watcher.suspected.clear()
            adapter = self.adapter = await process.start()
            for device, nbytes in plan.per_device.items():
                self.probe.reserve(self.replica_id, process.pid, device, nbytes)
            if not await self.watcher.wait_healthy(adapter, process):
                failure = _as_preload(await process.exit_failure(oom_kills)) or Failure(
                    PoolError.PRELOAD_FAILED, "the engine did not become healthy within timeouts.start_ms"
                )
                self._preload_outcome(failure.code.value.lower())
                raise self._failed(failure)
            self._set_state(ReplicaState.SELFTEST)
            try:
                props = await run_selftest(adapter, self.pool.timeouts.selftest_ms / 1000)
            except SelfTestFailed as exc:
                self._preload_outcome("selftest_failed")
                named = await process.exit_failure(oom_kills)
                cause = named if named and named.code != PoolError.ENGINE_CRASHED else None
                raise self._failed(cause or Failure(PoolError.SELFTEST_FAILED, str(exc))) from exc
            before = self._outcomes_ok()
            self._preload_outcome("ok")
            if self._outcomes_ok() <= before:  # step 4's second half: our own metrics update
                raise self._failed(Failure(PoolError.SELFTEST_FAILED, "pool manager metrics did not update"))
            self.engine_version = props.engine_version
            self.slots_total = props.slots_total or self.pool.slots
            self._set_state(ReplicaState.READY)
            raise self._failed(await self.watcher.watch(adapter, process, self.engine_version, oom_kills))
        finally:
            await process.stop()
            self.probe.release(self.replica_id)
            adapter_, self.adapter = self.adapter, None
            if adapter_ is not None:
                await adapter_.aclose()

    def _outcomes_ok(self) -> float:
        value = self.metrics.registry.get_sample_value(
            "preload_outcomes_total", {"pool_id": self.pool.id, "outcome": "ok"}
        )
        return value or 0.0
