"""Engine supervision: one engine child per replica, from preload to Ready, and back after a failure.

A replica's life (SPEC §5.6): `Stopped` (preload: false, until resume) → `Preloading` (the VRAM and
RAM checks, then the launch) → `SelfTest` → `Ready`. Any failure — a short check, an engine that
never turns healthy, a failed self-test, an exit, three missed health probes, a stuck engine, a
driver fault — records `last_error`, counts `engine_restarts_total{reason}` and leads to `Backoff`.
Restarts are a tenacity retry loop: the wait is `initial_backoff_ms` x 2^(n-1), capped at
`max_backoff_ms`, ±20 % jitter, where n counts the failures inside the breaker window (so a replica
that ran well for a while starts again from the initial backoff). `breaker_failures` failures within
`breaker_window_s` open the circuit: the replica stays `Unavailable` until resume.

The child gets a free loopback port, `CUDA_VISIBLE_DEVICES` = the mask (empty for CPU pools), its
output in a rotated log under `<state_dir>/logs/<replica_id>.log` (the last lines are also kept in
memory to explain an exit), and PR_SET_PDEATHSIG so it dies with its pool manager even on SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import logging.handlers
import os
import random
import shutil
import signal
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from llorch import gpu
from llorch.adapters.base import EngineAdapter, Finished, GenerateRequest
from llorch.adapters.launch import engine_command, make_adapter
from llorch.config import PoolConfig
from llorch.errors import OrchestratorError

from . import preload
from .breaker import Breaker
from .faults import Failure, PoolError, classify_exit, match_log, oom_kill_count
from .metrics import PoolMetrics
from .selftest import SelfTestFailed, run_selftest
from .telemetry import Telemetry, collect, export

log = logging.getLogger(__name__)

PROBE_INTERVAL_S: Final = 2.0
PROBE_FAILURES: Final = 3
LIVENESS_TIMEOUT_S: Final = 10.0
PUMP_DRAIN_S: Final = 2.0
TELEMETRY_EVERY_S: Final = 6.0  # KV, VRAM and utilization gauges: fresh enough, and cheap under load
VRAM_OOM_BUMP: Final = 1.1
_PR_SET_PDEATHSIG: Final = 1
_TAIL_LINES: Final = 40


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def resolve_binary(name: str) -> str:
    """A bare name is looked up on PATH, then beside this interpreter (the venv's bin)."""
    if "/" in name:
        return name
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        raise FileNotFoundError(f"engine binary {name!r} not found on PATH; set pools[].engine_bin")
    return found


def engine_env(pool: PoolConfig, devices: list[int] | None) -> dict[str, str]:
    env = dict(pool.engine_env)
    env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's numbering = NVML's, so the mask means what it says
    env["CUDA_VISIBLE_DEVICES"] = "" if devices is None else ",".join(str(d) for d in devices)
    return env


def _kv_bytes_per_token(model_path: Path) -> int:
    """KV bytes one cached token holds, estimated from the model's size (SPEC §5.4's fallback)."""
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


class Replica:
    """One engine process of a pool. `state`: Stopped | Preloading | SelfTest | Ready | Backoff |
    Unavailable."""

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
    ) -> None:
        self.pool = pool
        self.replica_id = f"{pool.id}-r{index}"
        self.model_path = model_path
        self.devices = devices
        self.logs_dir = state_dir / "logs"
        self.slots_dir = state_dir / "slots" / self.replica_id
        self.probe = probe
        self.metrics = metrics
        self.on_change = on_change
        self.state = "Preloading" if pool.preload else "Stopped"
        self.port = 0
        self.pid = 0
        self.engine_version = ""
        self.slots_total = pool.slots
        self.restarts = 0
        self.last_error: tuple[str, str, int] | None = None
        self.running: set[str] = set()
        self.adapter: EngineAdapter | None = None
        self.telemetry = Telemetry()
        self.breaker = Breaker(pool.restart.breaker_failures, pool.restart.breaker_window_s)
        self.vram_bump = 1.0
        self.kv_bytes_per_token = _kv_bytes_per_token(model_path)
        self._proc: asyncio.subprocess.Process | None = None
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._log_fault = asyncio.Event()
        self._suspect = asyncio.Event()
        self._resume = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._engine_log = self._make_log()

    @property
    def circuit(self) -> str:
        return "open" if self.state == "Unavailable" else "closed"

    @property
    def device_labels(self) -> list[str]:
        return ["cpu"] if self.devices is None else [str(d) for d in self.devices]

    def _make_log(self) -> logging.Logger:
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        logger = logging.getLogger(f"engine.{self.replica_id}")
        logger.propagate = False
        logger.handlers.clear()
        logger.addHandler(
            logging.handlers.RotatingFileHandler(
                self.logs_dir / f"{self.replica_id}.log", maxBytes=10 << 20, backupCount=3
            )
        )
        logger.setLevel(logging.INFO)
        return logger

    def _set_state(self, state: str, error: Failure | None = None) -> None:
        if error is not None:
            self.last_error = (error.code.value, error.message, int(time.time() * 1000))
        if state != self.state:
            log.info(
                "replica state change",
                extra={
                    "event": "pool_state_change",
                    "pool_id": self.pool.id,
                    "replica_id": self.replica_id,
                    "state": state,
                    "code": error.code.value if error else None,
                    "reason": error.message if error else None,
                },
            )
        self.state = state
        self.on_change()

    def resume(self) -> None:
        """Start a Stopped replica, or close an open circuit (SPEC §5.6); a no-op otherwise."""
        self._resume.set()

    def suspect(self) -> None:
        """The watchdog timed a task out here: check that the engine still decodes at all."""
        self._suspect.set()

    async def run(self) -> None:
        """Preload, serve and restart until cancelled; wait for resume while Stopped or Unavailable."""
        try:
            while True:
                if self.state in ("Stopped", "Unavailable"):
                    self._resume.clear()
                    await self._resume.wait()
                    self.breaker.reset()
                    self._set_state("Preloading")
                try:
                    async for attempt in AsyncRetrying(
                        wait=self._backoff_s,
                        retry=retry_if_exception_type(EngineFailed),
                        stop=lambda _state: self.breaker.open,
                        reraise=True,
                    ):
                        with attempt:
                            await self._serve()
                except EngineFailed as exc:
                    self._open_circuit(exc.failure)
        finally:
            await self._stop_process()
            self.probe.release(self.replica_id)
            self.state = "Stopped"

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
        self._set_state("Unavailable", Failure(PoolError.CIRCUIT_OPEN, message))

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
        self._set_state("Backoff", failure)
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

    async def _serve(self) -> None:
        """One life of the engine: checks, launch, self-test, Ready, watch. Always ends by raising."""
        self._set_state("Preloading")
        plan = preload.check(self.pool, self.devices, self.model_path, self.probe, self.vram_bump)
        if isinstance(plan, Failure):
            self._preload_outcome(plan.code.value.lower())
            raise self._failed(plan)
        oom_kills = oom_kill_count()
        try:
            await self._launch(plan)
            if not await self._wait_healthy():
                failure = _as_preload(await self._exit_failure(oom_kills)) or Failure(
                    PoolError.PRELOAD_FAILED, "the engine did not become healthy within timeouts.start_ms"
                )
                self._preload_outcome(failure.code.value.lower())
                raise self._failed(failure)
            self._set_state("SelfTest")
            assert self.adapter is not None
            try:
                props = await run_selftest(self.adapter, self.pool.timeouts.selftest_ms / 1000)
            except SelfTestFailed as exc:
                self._preload_outcome("selftest_failed")
                named = await self._exit_failure(oom_kills)
                cause = named if named and named.code != PoolError.ENGINE_CRASHED else None
                raise self._failed(cause or Failure(PoolError.SELFTEST_FAILED, str(exc))) from exc
            before = self._outcomes_ok()
            self._preload_outcome("ok")
            if self._outcomes_ok() <= before:  # step 4's second half: our own metrics update
                raise self._failed(Failure(PoolError.SELFTEST_FAILED, "pool manager metrics did not update"))
            self.engine_version = props.engine_version
            self.slots_total = props.slots_total or self.pool.slots
            self._set_state("Ready")
            raise self._failed(await self._watch(oom_kills))
        finally:
            await self._stop_process()
            self.pid = self.port = 0  # `live` in health means an engine process runs
            self.probe.release(self.replica_id)
            adapter, self.adapter = self.adapter, None
            if adapter is not None:
                await adapter.aclose()

    def _outcomes_ok(self) -> float:
        value = self.metrics.registry.get_sample_value(
            "preload_outcomes_total", {"pool_id": self.pool.id, "outcome": "ok"}
        )
        return value or 0.0

    async def _launch(self, plan: preload.Plan) -> None:
        self.port = free_port()
        self.slots_dir.mkdir(parents=True, exist_ok=True)
        launch = engine_command(
            self.pool,
            resolve_binary(self.pool.effective_engine_bin),
            self.model_path,
            self.port,
            free_port,
            gpus=self.devices,
            slots_dir=self.slots_dir,
        )
        self._tail.clear()
        self._log_fault.clear()
        self._suspect.clear()
        self._proc = await asyncio.create_subprocess_exec(
            *launch.argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, **engine_env(self.pool, self.devices)},
            preexec_fn=_die_with_parent,
            start_new_session=True,  # Ctrl-C reaches the manager, which stops its engines in order
        )
        self.pid = self._proc.pid
        for device, nbytes in plan.per_device.items():
            self.probe.reserve(self.replica_id, self.pid, device, nbytes)
        log.info(
            "engine started",
            extra={
                "event": "engine_start",
                "replica_id": self.replica_id,
                "pid": self.pid,
                "port": self.port,
            },
        )
        self.adapter = make_adapter(self.pool, launch)
        self._pump = asyncio.create_task(self._pump_output(self._proc))

    async def _exit_failure(self, oom_kills: int) -> Failure | None:
        """Why the engine died (or what it logged) if it did; None while it runs quietly."""
        proc = self._proc
        if proc is not None and proc.returncode is not None:
            if self._pump is not None:  # its last lines explain the exit: read them to the end first
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._pump), PUMP_DRAIN_S)
            return classify_exit(proc.returncode, list(self._tail), oom_kill_count() > oom_kills)
        return match_log(list(self._tail))

    async def _wait_healthy(self) -> bool:
        assert self.adapter is not None and self._proc is not None
        deadline = time.monotonic() + self.pool.timeouts.start_ms / 1000
        while time.monotonic() < deadline and self._proc.returncode is None:
            if (await self.adapter.health()).ready:
                return True
            await asyncio.sleep(0.05)
        return False

    async def _watch(self, oom_kills: int) -> Failure:
        """Watch a Ready engine; return why it stopped serving."""
        assert self.adapter is not None and self._proc is not None
        misses = 0
        await self._refresh_telemetry()
        telemetry_at = time.monotonic() + TELEMETRY_EVERY_S
        wait_exit = asyncio.ensure_future(self._proc.wait())
        fault = asyncio.ensure_future(self._log_fault.wait())
        suspect = asyncio.ensure_future(self._suspect.wait())
        try:
            while True:
                await asyncio.wait(
                    {wait_exit, fault, suspect}, timeout=PROBE_INTERVAL_S, return_when="FIRST_COMPLETED"
                )
                if wait_exit.done() or fault.done():
                    return await self._exit_failure(oom_kills) or Failure(
                        PoolError.ENGINE_CRASHED, "engine exited"
                    )
                for seen in self.probe.faults():
                    if self.devices is not None and seen.device in self.devices:
                        return Failure(
                            PoolError.DRIVER_FAULT, f"GPU {seen.device}: {seen.kind} {seen.detail}"
                        )
                if suspect.done():
                    stuck = await self._liveness()
                    if stuck is not None:
                        return stuck
                    self._suspect.clear()
                    suspect = asyncio.ensure_future(self._suspect.wait())
                misses = 0 if (await self.adapter.health()).live else misses + 1
                if misses >= PROBE_FAILURES:
                    return Failure(
                        PoolError.ENGINE_UNHEALTHY, f"engine failed {PROBE_FAILURES} health probes in a row"
                    )
                if time.monotonic() >= telemetry_at:
                    telemetry_at = time.monotonic() + TELEMETRY_EVERY_S
                    await self._refresh_telemetry()
        finally:
            for waiter in (wait_exit, fault, suspect):
                waiter.cancel()

    async def _liveness(self) -> Failure | None:
        """An engine that answers /health must still produce a token: decode one, bounded."""
        assert self.adapter is not None
        request = GenerateRequest(task_id="liveness", prompt="Hello", max_tokens=1, seed=0)
        timeout_s = min(LIVENESS_TIMEOUT_S, self.pool.timeouts.idle_ms / 1000)
        try:
            async with asyncio.timeout(timeout_s):
                async for item in self.adapter.stream(request):
                    if isinstance(item, Finished):
                        return None
        except TimeoutError:
            pass
        except OrchestratorError as exc:
            return Failure(PoolError.ENGINE_STUCK, f"liveness decode failed: {exc.code.value}: {exc.message}")
        return Failure(
            PoolError.ENGINE_STUCK,
            f"the engine answers /health but produced no token within {timeout_s:g} s",
        )

    async def _refresh_telemetry(self) -> None:
        assert self.adapter is not None
        self.telemetry = await collect(
            self.adapter, self.pool.engine, self.port, self.pid, self.devices, self.probe
        )
        export(
            self.metrics,
            (self.pool.engine, self.engine_version, self.pool.id, self.replica_id),
            self.telemetry,
        )

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self._engine_log.info(text)
            self._tail.append(text)
            if self.state == "Ready" and match_log([text]) is not None:
                self._log_fault.set()

    async def _stop_process(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
