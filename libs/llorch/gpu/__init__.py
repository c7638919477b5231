"""GPU inventory, per-process VRAM and driver faults behind one probe, plus the preload arithmetic.

:func:`open_probe` picks the probe from ``telemetry.gpu_provider`` (SPEC §7). The seam and the no-GPU
probe live in :mod:`~llorch.gpu.probe`, the implementations in :mod:`~llorch.gpu.nvml` and
:mod:`~llorch.gpu.fake`, the preload checks (SPEC §5.3, §5.6) in :mod:`~llorch.gpu.sizing`.
"""

from llorch.gpu.fake import FAKE_STATE_FILE, FakeProbe
from llorch.gpu.nvml import NvmlProbe
from llorch.gpu.probe import (
    MIB,
    FaultKind,
    GpuDevice,
    GpuFault,
    GpuProbe,
    NoGpuProbe,
    ProbeKind,
    open_probe,
)
from llorch.gpu.sizing import (
    check_ram,
    check_vram,
    check_vram_total,
    kv_reserve_estimate,
    kv_reserve_from_facts,
    mem_available_bytes,
    mem_total_bytes,
    pick_auto_device,
    vram_need_bytes,
)

__all__ = [
    "FAKE_STATE_FILE",
    "MIB",
    "FakeProbe",
    "FaultKind",
    "GpuDevice",
    "GpuFault",
    "GpuProbe",
    "NoGpuProbe",
    "NvmlProbe",
    "ProbeKind",
    "check_ram",
    "check_vram",
    "check_vram_total",
    "kv_reserve_estimate",
    "kv_reserve_from_facts",
    "mem_available_bytes",
    "mem_total_bytes",
    "open_probe",
    "pick_auto_device",
    "vram_need_bytes",
]
