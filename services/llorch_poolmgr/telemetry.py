"""A replica's telemetry: KV use from the engine, VRAM and utilization from the GPU probe.

The mock engine reports its own VRAM and utilization (its `--vram-used-bytes`, `--vram-total-bytes`
and `--gpu-util` knobs, SPEC §8) at `GET /mock/telemetry`; for it those figures stand in for NVML's.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import aiohttp

from llorch import gpu
from llorch.adapters.base import EngineAdapter
from llorch.errors import OrchestratorError

from .metrics import PoolMetrics


@dataclass
class Telemetry:
    """What the last probe saw; None where the engine or the GPU does not say."""

    kv_cache_usage_ratio: float | None = None
    vram_used_bytes: dict[str, int] = field(default_factory=dict)  # device label -> bytes
    vram_total_bytes: dict[str, int] = field(default_factory=dict)
    gpu_utilization: dict[str, float] = field(default_factory=dict)
    gpus: dict[str, gpu.GpuDevice] = field(default_factory=dict)  # the probe's view of the masked GPUs


def _labels(devices: list[int] | None) -> list[str]:
    return ["cpu"] if devices is None else [str(d) for d in devices]


async def collect(
    adapter: EngineAdapter,
    engine: str,
    port: int,
    pid: int,
    devices: list[int] | None,
    probe: gpu.GpuProbe,
) -> Telemetry:
    seen = Telemetry()
    with contextlib.suppress(OrchestratorError):
        seen.kv_cache_usage_ratio = (await adapter.kv_info()).usage_ratio
    if devices is not None:
        used = probe.process_vram(pid)
        for index in devices:
            dev = probe.device(index)
            if dev is not None:
                seen.gpus[str(index)] = dev
                seen.vram_used_bytes[str(index)] = used.get(index, 0)
                seen.vram_total_bytes[str(index)] = dev.total_bytes
                if dev.utilization is not None:
                    seen.gpu_utilization[str(index)] = dev.utilization
    if engine == "mock":  # its own report stands in for the process's use and the utilization
        await _mock(seen, port, _labels(devices))
    return seen


async def _mock(seen: Telemetry, port: int, devices: list[str]) -> None:
    url = f"http://127.0.0.1:{port}/mock/telemetry"
    try:
        async with aiohttp.ClientSession() as http, http.get(url, timeout=aiohttp.ClientTimeout(2)) as resp:
            body = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return
    for device in devices:
        seen.vram_used_bytes[device] = int(body.get("vram_used_bytes") or 0)
        if device not in seen.gpus:
            seen.vram_total_bytes[device] = int(body.get("vram_total_bytes") or 0)
        seen.gpu_utilization[device] = float(body.get("gpu_util") or 0.0)


def export(metrics: PoolMetrics, labels: tuple[str, str, str, str], seen: Telemetry) -> None:
    """Set the replica's gauges (labels: engine, engine_version, pool_id, replica_id) and the per-GPU
    gauges of its devices."""
    if seen.kv_cache_usage_ratio is not None:
        metrics.kv_usage.labels(*labels).set(seen.kv_cache_usage_ratio)
    for device, nbytes in seen.vram_used_bytes.items():
        metrics.vram_used.labels(*labels, device).set(nbytes)
    for device, util in seen.gpu_utilization.items():
        metrics.gpu_utilization.labels(*labels, device).set(util)
    pool_id = labels[2]
    for device, dev in seen.gpus.items():
        metrics.gpu_vram_total.labels(pool_id, device).set(dev.total_bytes)
        metrics.gpu_vram_used.labels(pool_id, device).set(dev.used_bytes)
        if dev.utilization is not None:
            metrics.gpu_device_utilization.labels(pool_id, device).set(dev.utilization)
