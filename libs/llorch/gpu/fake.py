"""Simulated GPUs for tests and GPU-less boxes.

:class:`FakeProbe` simulates the ``fake_gpus`` of the config. Several pool-manager processes share one
simulated box through ``<state_dir>/fake-gpus.json``, so free memory drops as engines load anywhere.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from llorch.config import FakeGpu
from llorch.gpu.probe import MIB, FaultKind, GpuDevice, GpuFault, ProbeKind

log = logging.getLogger(__name__)

FAKE_STATE_FILE: Final = "fake-gpus.json"
_FAKE_FAULTS_KEPT: Final = 1024


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
