"""Engine supervision: launch one engine child per replica, wait for health, restart with backoff.

The child gets a free loopback port, `CUDA_VISIBLE_DEVICES` = the pool's mask (empty for CPU pools),
its output in a rotated log under `<state_dir>/logs/<replica_id>.log`, and PR_SET_PDEATHSIG so it
dies with its pool manager even on SIGKILL. Preload checks, self-tests and the circuit breaker belong
to the pool-manager issue; this keeps a replica Ready or restarting.
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
from collections.abc import Callable
from pathlib import Path

from llorch.adapters.base import EngineAdapter
from llorch.adapters.llamacpp import LlamaCppAdapter
from llorch.config import PoolConfig

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 2.0
PROBE_FAILURES = 3
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _free_port() -> int:
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


def engine_command(pool: PoolConfig, binary: str, model_path: Path, port: int) -> list[str]:
    """llama-server's command line (the mock engine accepts the same flags)."""
    argv = [
        binary,
        "-m",
        str(model_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-c",
        str(pool.ctx * pool.slots),
        "--parallel",
        str(pool.slots),
        "--metrics",
        "--no-webui",
        "--alias",
        pool.id,
    ]
    if pool.slots == 1:
        argv.append("--no-cont-batching")
    if isinstance(pool.devices, list):
        argv += ["-ngl", "999"]
    return argv + list(pool.engine_args)


def engine_env(pool: PoolConfig) -> dict[str, str]:
    env = dict(pool.engine_env)
    if isinstance(pool.devices, list):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in pool.devices)
    elif pool.devices == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


class Replica:
    """One engine process of a pool, kept alive; `state` is Starting | Ready | Backoff | Stopped."""

    def __init__(
        self, pool: PoolConfig, index: int, model_path: Path, logs_dir: Path, on_change: Callable[[], None]
    ) -> None:
        self.pool = pool
        self.replica_id = f"{pool.id}-r{index}"
        self.model_path = model_path
        self.logs_dir = logs_dir
        self.on_change = on_change
        self.state = "Starting"
        self.port = 0
        self.pid = 0
        self.engine_version = ""
        self.slots_total = pool.slots
        self.restarts = 0
        self.last_error: tuple[str, str, int] | None = None
        self.running: set[str] = set()
        self.adapter: EngineAdapter | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._engine_log = self._make_log()

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

    def _set_state(self, state: str, error: tuple[str, str] | None = None) -> None:
        if error is not None:
            self.last_error = (error[0], error[1], int(time.time() * 1000))
        if state != self.state:
            log.info(
                "replica state change",
                extra={
                    "event": "pool_state_change",
                    "pool_id": self.pool.id,
                    "replica_id": self.replica_id,
                    "state": state,
                    "reason": error[1] if error else None,
                },
            )
        self.state = state
        self.on_change()

    async def run(self) -> None:
        """Start, watch and restart the engine until cancelled."""
        failures = 0
        try:
            while True:
                reason = await self._run_once()
                failures += 1
                self.restarts += 1
                self._set_state("Backoff", ("WORKER_RESET", reason))
                await asyncio.sleep(self._backoff_s(failures))
        finally:
            await self._stop_process()
            self.state = "Stopped"

    def _backoff_s(self, failures: int) -> float:
        restart = self.pool.restart
        base = min(restart.max_backoff_ms, restart.initial_backoff_ms * 2 ** (failures - 1))
        return float(base) * random.uniform(0.8, 1.2) / 1000

    async def _run_once(self) -> str:
        self.port = _free_port()
        binary = resolve_binary(self.pool.effective_engine_bin)
        argv = engine_command(self.pool, binary, self.model_path, self.port)
        self._proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, **engine_env(self.pool)},
            preexec_fn=_die_with_parent,
            start_new_session=True,  # Ctrl-C reaches the manager, which stops its engines in order
        )
        self.pid = self._proc.pid
        log.info(
            "engine started",
            extra={
                "event": "engine_start",
                "replica_id": self.replica_id,
                "pid": self.pid,
                "port": self.port,
            },
        )
        self.adapter = LlamaCppAdapter(f"http://127.0.0.1:{self.port}")
        pump = asyncio.create_task(self._pump_output(self._proc))
        try:
            if not await self._wait_ready():
                return "engine did not become healthy within timeouts.start_ms"
            self._set_state("Ready")
            return await self._watch()
        finally:
            pump.cancel()
            await self._stop_process()
            adapter, self.adapter = self.adapter, None
            if adapter is not None:
                await adapter.aclose()

    async def _wait_ready(self) -> bool:
        assert self.adapter is not None and self._proc is not None
        deadline = time.monotonic() + self.pool.timeouts.start_ms / 1000
        while time.monotonic() < deadline and self._proc.returncode is None:
            health = await self.adapter.health()
            if health.ready:
                props = await self.adapter.props()
                self.engine_version = props.engine_version
                self.slots_total = props.slots_total or self.pool.slots
                return True
            await asyncio.sleep(0.05)
        return False

    async def _watch(self) -> str:
        """Return why the engine stopped serving: it exited, or stopped answering health probes."""
        assert self.adapter is not None and self._proc is not None
        misses = 0
        wait_exit = asyncio.ensure_future(self._proc.wait())
        try:
            while True:
                done, _ = await asyncio.wait({wait_exit}, timeout=PROBE_INTERVAL_S)
                if done:
                    return f"engine exited with code {self._proc.returncode}"
                misses = 0 if (await self.adapter.health()).live else misses + 1
                if misses >= PROBE_FAILURES:
                    return f"engine failed {PROBE_FAILURES} health probes in a row"
        finally:
            wait_exit.cancel()

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            self._engine_log.info(line.decode(errors="replace").rstrip())

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
