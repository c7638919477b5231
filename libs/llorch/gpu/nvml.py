"""GPUs through NVIDIA's NVML.

:class:`NvmlProbe` reads NVML through ``pynvml`` (package ``nvidia-ml-py``). Without the library or the
driver, :func:`~llorch.gpu.probe.open_probe` returns a :class:`~llorch.gpu.probe.NoGpuProbe` whose
``reason`` says why.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from types import ModuleType
from typing import Final, TypeVar

from llorch.gpu.probe import GpuDevice, GpuFault, GpuProbe, NoGpuProbe, ProbeKind

log = logging.getLogger(__name__)

_MAX_EVENTS_PER_POLL: Final = 256
_T = TypeVar("_T")
_NO_PROCS: Final[tuple[tuple[int, int], ...]] = ()


def open_nvml() -> GpuProbe:
    """An :class:`NvmlProbe` over every GPU NVML sees, or a :class:`NoGpuProbe` saying why there is none."""
    try:
        import pynvml
    except ImportError as exc:
        return NoGpuProbe(f"NVML unavailable: {exc}")
    errors = (pynvml.NVMLError, pynvml.NVMLLibraryMismatchError, OSError)
    try:
        pynvml.nvmlInit()
    except errors as exc:
        return NoGpuProbe(f"NVML unavailable: {exc}")
    try:
        handles: list[object] = [
            pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(int(pynvml.nvmlDeviceGetCount()))
        ]
    except errors as exc:
        with contextlib.suppress(*errors):
            pynvml.nvmlShutdown()
        return NoGpuProbe(f"NVML unavailable: {exc}")
    if not handles:
        with contextlib.suppress(*errors):
            pynvml.nvmlShutdown()
        return NoGpuProbe("NVML found no GPUs")
    return NvmlProbe(pynvml, handles)


class NvmlProbe:
    """GPUs through NVML. Built by :func:`open_probe` after ``nvmlInit`` succeeded.

    Faults come from an event set registered for Xid critical errors and from the volatile count of
    uncorrected ECC errors, compared with the count at the previous poll. No ``NVMLError`` escapes: a
    call that fails is logged once per message and its answer is left out.
    """

    def __init__(self, nvml: ModuleType, handles: list[object]) -> None:
        self._nv = nvml
        self._errors: tuple[type[BaseException], ...] = (nvml.NVMLError, nvml.NVMLLibraryMismatchError)
        self._handles = handles
        self._warned: set[str] = set()
        self._closed = False
        self._names = [self._call("", _nvml_name, self._nv, h) for h in handles]
        self._uuids = [self._call("", _nvml_uuid, self._nv, h) for h in handles]
        self._ecc_seen: dict[int, int] = {}  # index -> volatile uncorrected count; absent: unsupported
        for index in range(len(handles)):
            count = self._ecc_count(index)
            if count is not None:
                self._ecc_seen[index] = count
        self._events: object | None = self._register_xid_events()

    @property
    def kind(self) -> ProbeKind:
        return "nvml"

    @property
    def reason(self) -> str:
        return ""

    def devices(self) -> list[GpuDevice]:
        found = (self.device(index) for index in range(len(self._handles)))
        return [dev for dev in found if dev is not None]

    def device(self, index: int) -> GpuDevice | None:
        if self._closed or not 0 <= index < len(self._handles):
            return None
        handle = self._handles[index]
        memory = self._call(None, _nvml_memory, self._nv, handle)
        if memory is None:
            return None
        total, free = memory
        # quiet: utilization is NOT_SUPPORTED on some boards
        util = self._call(None, _nvml_utilization, self._nv, handle, quiet=True)
        return GpuDevice(index, self._names[index], self._uuids[index], total, free, total - free, util)

    def process_vram(self, pid: int) -> dict[int, int]:
        used: dict[int, int] = {}
        for index, handle in enumerate([] if self._closed else self._handles):
            held = sum(b for p, b in self._call(_NO_PROCS, _nvml_processes, self._nv, handle) if p == pid)
            if held:
                used[index] = held
        return used

    def faults(self) -> list[GpuFault]:
        if self._closed:
            return []
        return self._xid_faults() + self._ecc_faults()

    def reserve(self, owner: str, pid: int, device: int, nbytes: int) -> None:
        pass  # real free memory moves by itself

    def release(self, owner: str) -> None:
        pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        events, self._events = self._events, None
        if events is not None:
            self._call(None, self._nv.nvmlEventSetFree, events)
        self._call(None, self._nv.nvmlShutdown)

    def _call(self, default: _T, fn: Callable[..., _T], *args: object, quiet: bool = False) -> _T:
        """``fn(*args)``, or ``default`` when NVML fails (logged once per message unless ``quiet``)."""
        try:
            return fn(*args)
        except self._errors as exc:
            if not quiet:
                self._warn(exc)
            return default

    def _warn(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if message not in self._warned:
            self._warned.add(message)
            log.warning("NVML call failed", extra={"event": "gpu_probe_error", "error": message})

    def _register_xid_events(self) -> object | None:
        events: object | None = self._call(None, self._nv.nvmlEventSetCreate)
        if events is None:
            return None
        registered = [self._call(False, _nvml_register_xid, self._nv, h, events) for h in self._handles]
        if any(registered):
            return events
        self._call(None, self._nv.nvmlEventSetFree, events)
        return None

    def _xid_faults(self) -> list[GpuFault]:
        nv, found = self._nv, []
        for _ in range(_MAX_EVENTS_PER_POLL if self._events is not None else 0):
            try:
                data = nv.nvmlEventSetWait_v2(self._events, 0)  # 0 ms: only what is already there
            except self._errors as exc:
                if getattr(exc, "value", None) != nv.NVML_ERROR_TIMEOUT:  # timeout: nothing more
                    self._warn(exc)
                break
            index = self._call(-1, _nvml_index, self._nv, data.device)
            if index >= 0:
                found.append(GpuFault(index, "xid", f"Xid {int(data.eventData)}"))
        return found

    def _ecc_faults(self) -> list[GpuFault]:
        found = []
        for index, seen in sorted(self._ecc_seen.items()):
            count = self._ecc_count(index)
            if count is None:
                continue
            self._ecc_seen[index] = count  # a lower count means the driver reset its volatile counter
            if count > seen:
                detail = f"{count - seen} new uncorrected ECC errors (volatile total {count})"
                found.append(GpuFault(index, "ecc", detail))
        return found

    def _ecc_count(self, index: int) -> int | None:
        # quiet: NOT_SUPPORTED on GPUs without ECC or with it disabled
        return self._call(None, _nvml_uncorrected_ecc, self._nv, self._handles[index], quiet=True)


# The pynvml calls, typed, for NvmlProbe._call.


def _nvml_name(nv: ModuleType, handle: object) -> str:
    return str(nv.nvmlDeviceGetName(handle))


def _nvml_uuid(nv: ModuleType, handle: object) -> str:
    return str(nv.nvmlDeviceGetUUID(handle))


def _nvml_memory(nv: ModuleType, handle: object) -> tuple[int, int]:
    info = nv.nvmlDeviceGetMemoryInfo(handle)
    return int(info.total), int(info.free)


def _nvml_utilization(nv: ModuleType, handle: object) -> float:
    return float(nv.nvmlDeviceGetUtilizationRates(handle).gpu)


def _nvml_processes(nv: ModuleType, handle: object) -> tuple[tuple[int, int], ...]:
    """(pid, bytes) of the compute processes on the device; bytes is 0 where NVML cannot tell."""
    return tuple(
        (int(p.pid), int(p.usedGpuMemory or 0)) for p in nv.nvmlDeviceGetComputeRunningProcesses(handle)
    )


def _nvml_uncorrected_ecc(nv: ModuleType, handle: object) -> int:
    kind, counter = nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC
    return int(nv.nvmlDeviceGetTotalEccErrors(handle, kind, counter))


def _nvml_register_xid(nv: ModuleType, handle: object, events: object) -> bool:
    xid = int(nv.nvmlEventTypeXidCriticalError)
    if not int(nv.nvmlDeviceGetSupportedEventTypes(handle)) & xid:
        return False
    nv.nvmlDeviceRegisterEvents(handle, xid, events)
    return True


def _nvml_index(nv: ModuleType, handle: object) -> int:
    return int(nv.nvmlDeviceGetIndex(handle))
