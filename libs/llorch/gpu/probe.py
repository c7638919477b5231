"""The GPU probe seam: inventory, per-process VRAM and driver faults, whatever the GPUs are.

:func:`open_probe` picks the implementation from ``telemetry.gpu_provider`` (SPEC §7):

* :class:`~llorch.gpu.nvml.NvmlProbe` reads NVIDIA's NVML (see :mod:`llorch.gpu.nvml`).
* :class:`~llorch.gpu.fake.FakeProbe` simulates the ``fake_gpus`` of the config (see :mod:`llorch.gpu.fake`).
* :class:`NoGpuProbe` has no devices.

Indices are NVML indices (PCI bus order). Engines must be started with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
for ``CUDA_VISIBLE_DEVICES`` to mean the same GPUs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol

from llorch.config import TelemetryConfig

MIB: Final = 1 << 20
ProbeKind = Literal["nvml", "fake", "none"]
FaultKind = Literal["xid", "ecc"]


@dataclass(frozen=True, slots=True)
class GpuDevice:
    """One GPU as seen now. ``used_bytes`` is always ``total_bytes - free_bytes``."""

    index: int
    name: str
    uuid: str
    total_bytes: int
    free_bytes: int
    used_bytes: int
    utilization: float | None  # percent 0..100; None where the device does not report it


@dataclass(frozen=True, slots=True)
class GpuFault:
    """A driver-level fault on one device: an Xid event or new uncorrected ECC errors."""

    device: int
    kind: FaultKind
    detail: str


class GpuProbe(Protocol):
    """What pool managers need from the GPUs (a seam: NVML, fake, none)."""

    @property
    def kind(self) -> ProbeKind: ...

    @property
    def reason(self) -> str:
        """Why there are no GPUs; empty when there are."""
        ...

    def devices(self) -> list[GpuDevice]:
        """All devices, by index. A device that cannot be read right now is left out."""
        ...

    def device(self, index: int) -> GpuDevice | None: ...

    def process_vram(self, pid: int) -> dict[int, int]:
        """Device index → bytes that process ``pid`` holds there (devices where it holds none are absent)."""
        ...

    def faults(self) -> list[GpuFault]:
        """Faults seen since the previous call; never blocks."""
        ...

    def reserve(self, owner: str, pid: int, device: int, nbytes: int) -> None:
        """Record that ``owner`` (process ``pid``) holds ``nbytes`` on ``device``; replaces its previous
        reservation there. Real GPUs account for themselves, so only the fake probe keeps it."""
        ...

    def release(self, owner: str) -> None:
        """Drop every reservation of ``owner``."""
        ...

    def close(self) -> None:
        """Release the probe's resources; idempotent."""
        ...


def open_probe(telemetry: TelemetryConfig, state_dir: Path) -> GpuProbe:
    """The probe for ``telemetry.gpu_provider``. Never raises for a missing NVML library or driver."""
    # imported here: both implementations import this module
    from llorch.gpu.fake import FakeProbe
    from llorch.gpu.nvml import open_nvml

    if telemetry.gpu_provider == "fake":
        return FakeProbe(telemetry.fake_gpus, state_dir)
    return open_nvml()


# ---- none ---------------------------------------------------------------------------------------------


class NoGpuProbe:
    """No GPUs; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        self._reason = reason

    @property
    def kind(self) -> ProbeKind:
        return "none"

    @property
    def reason(self) -> str:
        return self._reason

    def devices(self) -> list[GpuDevice]:
        return []

    def device(self, index: int) -> GpuDevice | None:
        return None

    def process_vram(self, pid: int) -> dict[int, int]:
        return {}

    def faults(self) -> list[GpuFault]:
        return []

    def reserve(self, owner: str, pid: int, device: int, nbytes: int) -> None:
        pass

    def release(self, owner: str) -> None:
        pass

    def close(self) -> None:
        pass
