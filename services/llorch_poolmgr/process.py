"""An engine child process: spawn, the log pump, why it exited, stop.

The child gets a free loopback port, `CUDA_VISIBLE_DEVICES` = the mask (empty for CPU pools), its
output in a rotated log under `<state_dir>/logs/<replica_id>.log` (the last lines are also kept in
memory to explain an exit), and PR_SET_PDEATHSIG so it dies with its pool manager even on SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Final

from llorch import orphans
from llorch.adapters.base import EngineAdapter
from llorch.adapters.launch import engine_command, make_adapter
from llorch.config import PoolConfig
from llorch.ports import free_port

from .faults import Failure, classify_exit, match_log, oom_kill_count

log = logging.getLogger(__name__)

PUMP_DRAIN_S: Final = 2.0
STOP_TIMEOUT_S: Final = 10.0
_TAIL_LINES: Final = 40


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


class EngineProcess:
    """One replica's engine child, one life at a time: :meth:`start`, then :meth:`stop`.

    ``watch_log`` says whether an output line that names a VRAM OOM or driver fault should set
    :attr:`log_fault` now (the replica sets it while Ready)."""

    def __init__(
        self,
        pool: PoolConfig,
        replica_id: str,
        model_path: Path,
        devices: list[int] | None,
        state_dir: Path,
        watch_log: Callable[[], bool],
    ) -> None:
        self.pool = pool
        self.replica_id = replica_id
        self.model_path = model_path
        self.devices = devices
        self.logs_dir = state_dir / "logs"
        self.slots_dir = state_dir / "slots" / replica_id
        self.watch_log = watch_log
        self.port = 0
        self.pid = 0
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self.log_fault = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
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

    async def start(self) -> EngineAdapter:
        """Spawn the engine; returns the adapter that talks to it."""
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
        self.tail.clear()
        self.log_fault.clear()
        self.proc = await asyncio.create_subprocess_exec(
            *launch.argv,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            env={**os.environ, **engine_env(self.pool, self.devices)},
            preexec_fn=orphans.preexec(),
            start_new_session=True,  # Ctrl-C reaches the manager, which stops its engines in order
        )
        self.pid = self.proc.pid
        log.info(
            "engine started",
            extra={
                "event": "engine_start",
                "replica_id": self.replica_id,
                "pid": self.pid,
                "port": self.port,
            },
        )
        self._pump = asyncio.create_task(self._pump_output(self.proc))
        return make_adapter(self.pool, launch)

    @property
    def exited(self) -> bool:
        return self.proc is None or self.proc.returncode is not None

    async def exit_failure(self, oom_kills: int) -> Failure | None:
        """Why the engine died (or what it logged) if it did; None while it runs quietly."""
        proc = self.proc
        if proc is not None and proc.returncode is not None:
            if self._pump is not None:  # its last lines explain the exit: read them to the end first
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._pump), PUMP_DRAIN_S)
            return classify_exit(proc.returncode, list(self.tail), oom_kill_count() > oom_kills)
        return match_log(list(self.tail))

    async def _pump_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self._engine_log.info(text)
            self.tail.append(text)
            if self.watch_log() and match_log([text]) is not None:
                self.log_fault.set()

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; a no-op when it is not running."""
        proc, self.proc = self.proc, None
        self.pid = self.port = 0  # `live` in health means an engine process runs
        if proc is None or proc.returncode is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
