"""GPU inventory, per-process VRAM and driver faults behind one probe, plus the preload arithmetic.

:func:`open_probe` picks the implementation from ``telemetry.gpu_provider`` (SPEC §7):

* :class:`NvmlProbe` reads NVIDIA's NVML through ``pynvml`` (package ``nvidia-ml-py``). Without the
  library or the driver, :func:`open_probe` returns a :class:`NoGpuProbe` whose ``reason`` says why.
* :class:`FakeProbe` simulates the ``fake_gpus`` of the config. Several pool-manager processes share
  one simulated box through ``<state_dir>/fake-gpus.json``, so free memory drops as engines load anywhere.
* :class:`NoGpuProbe` has no devices.

Indices are NVML indices (PCI bus order). Engines must be started with ``CUDA_DEVICE_ORDER=PCI_BUS_ID``
for ``CUDA_VISIBLE_DEVICES`` to mean the same GPUs.

The preload checks (SPEC §5.3, §5.6) are pure functions: :func:`vram_need_bytes`,
:func:`kv_reserve_estimate`, :func:`check_vram`, :func:`check_ram` and :func:`pick_auto_device`.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from types import ModuleType
from typing import Any, Final, Literal, Protocol, TypeVar

from llorch.config import FakeGpu, TelemetryConfig

log = logging.getLogger(__name__)

MIB: Final = 1 << 20
ProbeKind = Literal["nvml", "fake", "none"]
FaultKind = Literal["xid", "ecc"]
FAKE_STATE_FILE: Final = "fake-gpus.json"
_MAX_EVENTS_PER_POLL: Final = 256
_FAKE_FAULTS_KEPT: Final = 1024
_T = TypeVar("_T")
_NO_PROCS: Final[tuple[tuple[int, int], ...]] = ()


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
    if telemetry.gpu_provider == "fake":
        return FakeProbe(telemetry.fake_gpus, state_dir)
    return _open_nvml()


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


# ---- NVML ---------------------------------------------------------------------------------------------


def _open_nvml() -> GpuProbe:
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


# ---- fake ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Reservation:
    owner: str
    pid: int
    device: int
    bytes: int


@dataclass(frozen=True, slots=True)
class _InjectedFault:
    seq: int
    device: int
    kind: FaultKind
    detail: str


@dataclass(slots=True)
class _FakeState:
    """The content of ``fake-gpus.json``; malformed entries are dropped on load."""

    reservations: list[_Reservation] = field(default_factory=list)
    utilization: dict[str, float] = field(default_factory=dict)
    faults: list[_InjectedFault] = field(default_factory=list)
    fault_seq: int = 0

    @classmethod
    def parse(cls, text: str) -> _FakeState:
        state = cls()
        try:
            raw = json.loads(text) if text.strip() else {}
        except ValueError:
            log.warning("fake GPU state unreadable; starting empty", extra={"event": "gpu_probe_error"})
            return state
        if not isinstance(raw, dict):
            return state
        for r in _entries(raw, "reservations", owner=str, pid=int, device=int, bytes=int):
            state.reservations.append(_Reservation(r["owner"], r["pid"], r["device"], r["bytes"]))
        for f in _entries(raw, "faults", seq=int, device=int, kind=str, detail=str):
            if f["kind"] in ("xid", "ecc"):
                state.faults.append(_InjectedFault(f["seq"], f["device"], f["kind"], f["detail"]))
        utilization = raw.get("utilization")
        if isinstance(utilization, dict):
            for key, value in utilization.items():
                if isinstance(value, int | float):
                    state.utilization[str(key)] = float(value)
        seq = raw.get("fault_seq")
        state.fault_seq = seq if isinstance(seq, int) else 0
        return state

    def dump(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, indent=1) + "\n"


def _entries(raw: dict[str, Any], key: str, **types: type) -> list[dict[str, Any]]:
    """The dicts in ``raw[key]`` whose fields have the given types."""
    items = raw.get(key)
    return [
        e
        for e in (items if isinstance(items, list) else [])
        if isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in types.items())
    ]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # 0 and negatives would address process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


class FakeProbe:
    """The ``fake_gpus`` of the config, shared by every process that uses the same ``state_dir``.

    Reservations ``{owner, pid, device, bytes}`` live in ``<state_dir>/fake-gpus.json`` (written atomically,
    guarded by ``flock`` on ``fake-gpus.json.lock``); those of dead processes are dropped on every read.
    free = ``free_mib`` MiB - reserved (never below 0). Tests inject utilization and faults through the same
    file; each probe delivers each fault injected after it was opened exactly once. Raises OSError when
    ``state_dir`` cannot be written.
    """

    def __init__(self, gpus: Sequence[FakeGpu], state_dir: Path) -> None:
        self._gpus = {gpu.index: gpu for gpu in sorted(gpus, key=lambda g: g.index)}
        self._state_dir = state_dir
        self.state_path = state_dir / FAKE_STATE_FILE
        self._lock_path = state_dir / (FAKE_STATE_FILE + ".lock")
        with self._locked() as state:
            self._fault_cursor = state.fault_seq

    @property
    def kind(self) -> ProbeKind:
        return "fake"

    @property
    def reason(self) -> str:
        return "" if self._gpus else "gpu_provider is fake and telemetry.fake_gpus is empty"

    def devices(self) -> list[GpuDevice]:
        with self._locked() as state:
            return [self._device(gpu, state) for gpu in self._gpus.values()]

    def device(self, index: int) -> GpuDevice | None:
        gpu = self._gpus.get(index)
        if gpu is None:
            return None
        with self._locked() as state:
            return self._device(gpu, state)

    def process_vram(self, pid: int) -> dict[int, int]:
        used: dict[int, int] = {}
        with self._locked() as state:
            for r in state.reservations:
                if r.pid == pid and r.bytes > 0:
                    used[r.device] = used.get(r.device, 0) + r.bytes
        return used

    def faults(self) -> list[GpuFault]:
        with self._locked() as state:
            new = [f for f in state.faults if f.seq > self._fault_cursor]
            self._fault_cursor = state.fault_seq
        return [GpuFault(f.device, f.kind, f.detail) for f in new]

    def reserve(self, owner: str, pid: int, device: int, nbytes: int) -> None:
        self._check_device(device)
        if nbytes < 0 or pid <= 0:
            raise ValueError(f"reserve needs nbytes >= 0 and pid > 0, got {nbytes} and {pid}")
        with self._locked() as state:
            kept = [r for r in state.reservations if (r.owner, r.device) != (owner, device)]
            state.reservations = [*kept, _Reservation(owner, pid, device, nbytes)]

    def release(self, owner: str) -> None:
        with self._locked() as state:
            state.reservations = [r for r in state.reservations if r.owner != owner]

    def close(self) -> None:
        pass  # no descriptor is held between calls

    def set_utilization(self, device: int, percent: float | None) -> None:
        """Make ``device`` report ``percent`` (0..100) to every probe; None restores the default 0.0."""
        self._check_device(device)
        if percent is not None and not 0.0 <= percent <= 100.0:
            raise ValueError(f"utilization must be within 0..100, got {percent}")
        with self._locked() as state:
            if percent is None:
                state.utilization.pop(str(device), None)
            else:
                state.utilization[str(device)] = float(percent)

    def inject_fault(self, device: int, kind: FaultKind, detail: str) -> None:
        """Simulate a driver fault; every open probe on this state dir reports it once."""
        self._check_device(device)
        if kind not in ("xid", "ecc"):
            raise ValueError(f"fault kind must be 'xid' or 'ecc', got {kind!r}")
        with self._locked() as state:
            state.fault_seq += 1
            state.faults.append(_InjectedFault(state.fault_seq, device, kind, detail))
            del state.faults[:-_FAKE_FAULTS_KEPT]

    def _device(self, gpu: FakeGpu, state: _FakeState) -> GpuDevice:
        total = gpu.total_mib * MIB
        reserved = sum(r.bytes for r in state.reservations if r.device == gpu.index)
        free = max(0, gpu.free_mib * MIB - reserved)
        util = state.utilization.get(str(gpu.index), 0.0)
        uuid = f"GPU-fake0000-0000-0000-0000-{gpu.index:012d}"
        return GpuDevice(gpu.index, gpu.name, uuid, total, free, total - free, util)

    def _check_device(self, device: int) -> None:
        if device not in self._gpus:
            raise ValueError(f"no fake GPU {device} (configured: {sorted(self._gpus)})")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[_FakeState]:
        """The state under an exclusive lock, dead reservations dropped; written back if it changed."""
        self._state_dir.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a") as lock:  # flock locks this descriptor
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            try:
                text = self.state_path.read_text(encoding="utf-8")
            except FileNotFoundError:
                text = ""
            state = _FakeState.parse(text)
            before = state.dump()
            state.reservations = [r for r in state.reservations if _pid_alive(r.pid)]
            yield state
            after = state.dump()
            if after != before:
                tmp = self.state_path.with_name(f".{FAKE_STATE_FILE}.{os.getpid()}.tmp")
                tmp.write_text(after, encoding="utf-8")
                tmp.replace(self.state_path)


# ---- preload arithmetic -------------------------------------------------------------------------------


def _exact(x: float) -> Fraction:
    """A config float as the decimal its user wrote (1.1 is 11/10, not the nearest binary fraction)."""
    if not math.isfinite(x):
        raise ValueError(f"expected a finite number, got {x}")
    return Fraction(repr(x))


def _mib_up(nbytes: int | Fraction) -> int:
    return math.ceil(Fraction(nbytes) / MIB)


def vram_need_bytes(model_bytes: int, factor: float, kv_reserve_bytes: int) -> int:
    """VRAM one engine needs in all: ceil(model bytes * ``vram.factor``) + the KV reserve (SPEC §5.6)."""
    if model_bytes < 0 or kv_reserve_bytes < 0 or factor <= 0:
        raise ValueError("vram_need_bytes needs model_bytes >= 0, factor > 0 and kv_reserve_bytes >= 0")
    return math.ceil(model_bytes * _exact(factor)) + kv_reserve_bytes


def kv_reserve_estimate(ctx: int, slots: int, model_bytes: int) -> int:
    """KV-cache bytes for ``ctx`` tokens in each of ``slots`` slots when ``vram.kv_reserve_mib`` is null.

    A deliberately simple heuristic: 2·√(model bytes) bytes per token. f16 KV grows with layer count, which
    grows about as the square root of the weights, so this lands near the real figure for current
    grouped-query models (≈19 KiB/token for a 0.1 GB file, 8B at 4.9 GB ≈ 137 KiB against 128 KiB, 14B at
    9 GB ≈ 185 KiB against 192 KiB, 70B at 40 GB ≈ 390 KiB against 320 KiB). It under-estimates old
    full-attention models; that shows up as ``VRAM_OOM``, after which the next preload asks 10% more.
    """
    if ctx < 1 or slots < 1 or model_bytes < 0:
        raise ValueError("kv_reserve_estimate needs ctx >= 1, slots >= 1 and model_bytes >= 0")
    return ctx * slots * 2 * math.isqrt(model_bytes)


def check_vram(
    devices: Sequence[GpuDevice], need: int, headroom_bytes: int, shares: Sequence[float] | None
) -> str | None:
    """Why ``need`` bytes do not fit on ``devices`` (SPEC §5.3, §5.6), or None when they do.

    Without ``shares`` each device must hold the whole ``need``; with a tensor split device d holds
    ``need * shares[d] / sum(shares)``. A device passes iff free - headroom >= its need (exact arithmetic).
    The reason names every short device with free and need in MiB (free rounded down, need up).
    """
    if shares is not None and len(shares) != len(devices):
        raise ValueError(f"{len(shares)} tensor_split shares for {len(devices)} devices")
    if not devices:
        return "no GPU to place the model on"
    exact = [_exact(s) for s in shares] if shares is not None else None
    total = sum(exact, Fraction(0)) if exact is not None else Fraction(1)
    if total <= 0:
        raise ValueError("tensor_split shares must be positive")
    short = []
    for i, dev in enumerate(devices):
        share = exact[i] / total if exact is not None else Fraction(1)
        dev_need = need * share
        if dev.free_bytes - headroom_bytes >= dev_need:
            continue
        of = f" ({float(share):.1%} of {_mib_up(need)} MiB)" if exact is not None else ""
        short.append(
            f"GPU {dev.index} ({dev.name}): {dev.free_bytes // MIB} MiB free, needs {_mib_up(dev_need)} MiB"
            f"{of} + {_mib_up(headroom_bytes)} MiB headroom"
        )
    return "; ".join(short) or None


def check_ram(model_bytes: int, ram_factor: float, mem_available: int) -> str | None:
    """Why host RAM is short for the model (MemAvailable < model bytes * ``ram_factor``), or None."""
    need = model_bytes * _exact(ram_factor)
    if mem_available >= need:
        return None
    return (
        f"MemAvailable {mem_available // MIB} MiB, needs {_mib_up(need)} MiB "
        f"(model {_mib_up(model_bytes)} MiB x ram_factor {ram_factor})"
    )


def mem_available_bytes(meminfo: Path = Path("/proc/meminfo")) -> int:
    """``MemAvailable`` from ``/proc/meminfo``, in bytes; OSError when it cannot be read."""
    for line in meminfo.read_text(encoding="ascii").splitlines():
        name, _, rest = line.partition(":")
        if name == "MemAvailable":
            value, _, unit = rest.strip().partition(" ")
            return int(value) * (1024 if unit.strip() == "kB" else 1)
    raise OSError(f"no MemAvailable in {meminfo}")


def pick_auto_device(devices: Sequence[GpuDevice], need: int, headroom_bytes: int) -> int | None:
    """``devices: auto``: the GPU with the most free VRAM that passes the VRAM check; ties → lowest index."""
    fits = [dev for dev in devices if check_vram([dev], need, headroom_bytes, None) is None]
    if not fits:
        return None
    return min(fits, key=lambda dev: (-dev.free_bytes, dev.index)).index
