"""What a pool would hold on its devices once loaded, and what those devices hold in all (issue 13).

The scheduler's VRAM ledger decides which on-demand pools to load and which to evict, before anything
loads, so every PoolState carries the pool's predicted need per device (the preload estimate of one
replica, split over its devices as the VRAM check splits it, x replicas) and each of its devices'
total memory and name. The GPU inventory is read once at start (NVML or the fake probe: totals do not
change); the "cpu" device's total is `residency.cpu_memory_mib`, else the host's MemTotal. A pool's
footprint is measured once (and again when a reload changes its model), never per report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llorch import gpu
from llorch.config import PoolConfig, ResidencyConfig
from llorch.gguf_meta import facts_of

from .preload import MIB, model_bytes, replica_need

log = logging.getLogger(__name__)

CPU = "cpu"


@dataclass(frozen=True, slots=True)
class Footprint:
    """By device label ("0", "1", ... or "cpu"): the whole pool's predicted need, and each device's
    total memory and name (absent where the probe does not know the device)."""

    need_bytes: dict[str, int] = field(default_factory=dict)
    total_bytes: dict[str, int] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)


def cpu_total_bytes(residency: ResidencyConfig) -> int:
    """The "cpu" device's budget: `residency.cpu_memory_mib`, else MemTotal (0 when unreadable)."""
    if residency.cpu_memory_mib is not None:
        return residency.cpu_memory_mib * MIB
    try:
        return gpu.mem_total_bytes()
    except OSError:
        log.warning("cannot read MemTotal", extra={"event": "meminfo_unreadable"})
        return 0


class Sizer:
    """Measures pools' footprints against the devices seen at start."""

    def __init__(self, inventory: Sequence[gpu.GpuDevice], cpu_bytes: int) -> None:
        self.gpus = {dev.index: dev for dev in inventory}
        self.cpu_bytes = cpu_bytes

    def devices(self, labels: Sequence[str]) -> Footprint:
        """The totals and names of ``labels``, with no need: a pool that cannot load."""
        totals: dict[str, int] = {}
        names: dict[str, str] = {}
        for label in labels:
            if label == CPU:
                totals[label], names[label] = self.cpu_bytes, CPU
            elif label.isdigit() and (dev := self.gpus.get(int(label))) is not None:
                totals[label], names[label] = dev.total_bytes, dev.name
        return Footprint({}, totals, names)

    async def measure(self, pool: PoolConfig, devices: list[int] | None, path: Path) -> Footprint:
        """The footprint of ``pool``'s replicas on ``devices`` (None: the CPU) with the model at ``path``.
        The GGUF facts come from :func:`facts_of` (parsed off the event loop, then cached), the KV
        reserve from them where they give the attention shape, as the replicas' preload check does."""
        labels = [CPU] if devices is None else [str(d) for d in devices]
        known = self.devices(labels)
        try:
            size = model_bytes(path)
        except OSError:
            return known  # the replicas' preload check reports MODEL_NOT_FOUND
        facts = await facts_of(path) if devices is not None else None
        totals = {index: dev.total_bytes for index, dev in self.gpus.items()}
        one = replica_need(pool, devices, size, totals, facts)
        need = {label: nbytes * pool.replicas for label, nbytes in one.items()}
        return Footprint(need, known.total_bytes, known.names)
