"""Watching a running engine: until it turns healthy, then while it serves (SPEC §5.6).

:meth:`HealthWatcher.watch` returns why a Ready engine stopped serving: it exited, it logged a VRAM
OOM or driver fault, the GPU probe saw a fault on a masked device, it failed three health probes in a
row, or it answers /health but decodes nothing (checked when the executor's watchdog suspects it).
Telemetry (KV, VRAM, utilization) is refreshed every TELEMETRY_EVERY_S on the way.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from llorch import gpu
from llorch.adapters.base import EngineAdapter, Finished, GenerateRequest
from llorch.config import PoolConfig
from llorch.errors import OrchestratorError

from .faults import Failure, PoolError
from .metrics import PoolMetrics
from .process import EngineProcess
from .telemetry import Telemetry, collect, export

PROBE_INTERVAL_S: Final = 2.0
PROBE_FAILURES: Final = 3
LIVENESS_TIMEOUT_S: Final = 10.0
TELEMETRY_EVERY_S: Final = 6.0  # KV, VRAM and utilization gauges: fresh enough, and cheap under load
HEALTH_POLL_S: Final = 0.05


class HealthWatcher:
    def __init__(
        self,
        pool: PoolConfig,
        replica_id: str,
        devices: list[int] | None,
        probe: gpu.GpuProbe,
        metrics: PoolMetrics,
    ) -> None:
        self.pool = pool
        self.replica_id = replica_id
        self.devices = devices
        self.probe = probe
        self.metrics = metrics
        self.telemetry = Telemetry()
        self.suspected = asyncio.Event()

    async def wait_healthy(self, adapter: EngineAdapter, process: EngineProcess) -> bool:
        """Poll /health until ready, the engine exits, or `timeouts.start_ms` passes."""
        deadline = time.monotonic() + self.pool.timeouts.start_ms / 1000
        while time.monotonic() < deadline and not process.exited:
            if (await adapter.health()).ready:
                return True
            await asyncio.sleep(HEALTH_POLL_S)
        return False

    async def watch(
        self, adapter: EngineAdapter, process: EngineProcess, engine_version: str, oom_kills: int
    ) -> Failure:
        """Watch a Ready engine; return why it stopped serving."""
        assert process.proc is not None
        misses = 0
        await self.refresh_telemetry(adapter, process, engine_version)
        telemetry_at = time.monotonic() + TELEMETRY_EVERY_S
        wait_exit = asyncio.ensure_future(process.proc.wait())
        fault = asyncio.ensure_future(process.log_fault.wait())
        suspect = asyncio.ensure_future(self.suspected.wait())
        try:
            while True:
                await asyncio.wait(
                    {wait_exit, fault, suspect}, timeout=PROBE_INTERVAL_S, return_when="FIRST_COMPLETED"
                )
                if wait_exit.done() or fault.done():
                    return await process.exit_failure(oom_kills) or Failure(
                        PoolError.ENGINE_CRASHED, "engine exited"
                    )
                for seen in self.probe.faults():
                    if self.devices is not None and seen.device in self.devices:
                        return Failure(
                            PoolError.DRIVER_FAULT, f"GPU {seen.device}: {seen.kind} {seen.detail}"
                        )
                if suspect.done():
                    stuck = await self.liveness(adapter)
                    if stuck is not None:
                        return stuck
                    self.suspected.clear()
                    suspect = asyncio.ensure_future(self.suspected.wait())
                misses = 0 if (await adapter.health()).live else misses + 1
                if misses >= PROBE_FAILURES:
                    return Failure(
                        PoolError.ENGINE_UNHEALTHY, f"engine failed {PROBE_FAILURES} health probes in a row"
                    )
                if time.monotonic() >= telemetry_at:
                    telemetry_at = time.monotonic() + TELEMETRY_EVERY_S
                    await self.refresh_telemetry(adapter, process, engine_version)
        finally:
            for waiter in (wait_exit, fault, suspect):
                waiter.cancel()

    async def liveness(self, adapter: EngineAdapter) -> Failure | None:
        """An engine that answers /health must still produce a token: decode one, bounded."""
        request = GenerateRequest(task_id="liveness", prompt="Hello", max_tokens=1, seed=0)
        timeout_s = min(LIVENESS_TIMEOUT_S, self.pool.timeouts.idle_ms / 1000)
        try:
            async with asyncio.timeout(timeout_s):
                async for item in adapter.stream(request):
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

    async def refresh_telemetry(
        self, adapter: EngineAdapter, process: EngineProcess, engine_version: str
    ) -> None:
        self.telemetry = await collect(
            adapter, self.pool.engine, process.port, process.pid, self.devices, self.probe
        )
        export(
            self.metrics,
            (self.pool.engine, engine_version, self.pool.id, self.replica_id),
            self.telemetry,
        )
