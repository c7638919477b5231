"""GPU probes (fake across instances, NVML through a stub, none here) and the preload arithmetic."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llorch import gpu
from llorch.config import FakeGpu, TelemetryConfig
from llorch.gpu import MIB, FakeProbe, GpuDevice, GpuFault, NoGpuProbe, NvmlProbe, open_probe
from llorch_cli.gpus_cmd import gpus

GIB = 1 << 30
FAKE = TelemetryConfig(
    gpu_provider="fake",
    fake_gpus=[
        FakeGpu(index=1, name="Fake 8GB", total_mib=8192, free_mib=7680),
        FakeGpu(index=0, name="Fake 12GB", total_mib=12288, free_mib=12288),
    ],
)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[FakeProbe, FakeProbe]]:
    """Two fake probes on one state dir, as two pool managers on one box would have."""
    a, b = open_probe(FAKE, tmp_path), open_probe(FAKE, tmp_path)
    assert isinstance(a, FakeProbe) and isinstance(b, FakeProbe)
    yield a, b
    a.close()
    b.close()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert proc.wait() == 0  # reaped: the pid no longer exists
    return proc.pid


# ---- fake probe ---------------------------------------------------------------------------------------


def test_fake_inventory_follows_the_config(pair: tuple[FakeProbe, FakeProbe]) -> None:
    a, _ = pair
    assert (a.kind, a.reason) == ("fake", "")
    assert [(d.index, d.name) for d in a.devices()] == [(0, "Fake 12GB"), (1, "Fake 8GB")]
    one = a.device(1)
    assert one is not None
    assert (one.total_bytes, one.free_bytes, one.used_bytes) == (8192 * MIB, 7680 * MIB, 512 * MIB)
    assert one.utilization == 0.0
    assert a.device(2) is None
    assert len({d.uuid for d in a.devices()}) == 2


def test_a_reservation_in_one_probe_lowers_free_memory_in_the_other(
    pair: tuple[FakeProbe, FakeProbe],
) -> None:
    a, b = pair
    me = os.getpid()
    a.reserve("r-a", me, 0, 2 * GIB)
    a.reserve("r-a", me, 1, 1 * GIB)
    a.reserve("r-a", me, 0, 3 * GIB)  # replaces the owner's reservation on that device
    dev0 = b.device(0)
    assert dev0 is not None and dev0.free_bytes == 9 * GIB and dev0.used_bytes == 3 * GIB
    assert b.process_vram(me) == {0: 3 * GIB, 1: 1 * GIB}
    b.reserve("r-b", me, 1, 100 * GIB)  # more than there is: free stops at 0
    dev1 = a.device(1)
    assert dev1 is not None and (dev1.free_bytes, dev1.used_bytes) == (0, 8 * GIB)
    a.release("r-a")
    b.release("r-b")
    assert [d.free_bytes for d in b.devices()] == [12 * GIB, 7680 * MIB]
    assert a.process_vram(me) == {}


def test_reservations_of_dead_processes_are_dropped(pair: tuple[FakeProbe, FakeProbe]) -> None:
    a, b = pair
    a.reserve("alive", os.getpid(), 0, 1 * GIB)
    gone = dead_pid()
    a.reserve("gone", gone, 0, 4 * GIB)
    dev0 = b.device(0)
    assert dev0 is not None and dev0.free_bytes == 11 * GIB
    assert b.process_vram(gone) == {}
    owners = [r["owner"] for r in json.loads(a.state_path.read_text())["reservations"]]
    assert owners == ["alive"]


def test_reserve_refuses_unknown_devices_and_bad_values(pair: tuple[FakeProbe, FakeProbe]) -> None:
    a, _ = pair
    with pytest.raises(ValueError, match="no fake GPU 7"):
        a.reserve("r", os.getpid(), 7, 1)
    with pytest.raises(ValueError):
        a.reserve("r", os.getpid(), 0, -1)
    with pytest.raises(ValueError):
        a.reserve("r", 0, 0, 1)


def test_injected_utilization_is_seen_by_every_probe(pair: tuple[FakeProbe, FakeProbe]) -> None:
    a, b = pair
    a.set_utilization(1, 42.5)
    assert [d.utilization for d in b.devices()] == [0.0, 42.5]
    b.set_utilization(1, None)
    dev1 = a.device(1)
    assert dev1 is not None and dev1.utilization == 0.0
    with pytest.raises(ValueError):
        a.set_utilization(0, 101.0)


def test_an_injected_fault_is_delivered_once_to_each_probe(
    pair: tuple[FakeProbe, FakeProbe], tmp_path: Path
) -> None:
    a, b = pair
    assert b.faults() == []
    a.inject_fault(1, "xid", "Xid 79: GPU has fallen off the bus")
    a.inject_fault(0, "ecc", "1 new uncorrected ECC error")
    expected = [
        GpuFault(1, "xid", "Xid 79: GPU has fallen off the bus"),
        GpuFault(0, "ecc", "1 new uncorrected ECC error"),
    ]
    assert b.faults() == expected
    assert b.faults() == []
    assert a.faults() == expected
    later = open_probe(FAKE, tmp_path)  # opened after the faults: they are not news to it
    assert later.faults() == []
    b.inject_fault(0, "xid", "Xid 48")
    assert later.faults() == [GpuFault(0, "xid", "Xid 48")]
    with pytest.raises(ValueError):
        a.inject_fault(0, "oops", "x")  # type: ignore[arg-type]


def test_a_corrupt_state_file_reads_as_empty(tmp_path: Path) -> None:
    (tmp_path / gpu.FAKE_STATE_FILE).write_text("{not json")
    probe = open_probe(FAKE, tmp_path)
    assert [d.free_bytes for d in probe.devices()] == [12 * GIB, 7680 * MIB]
    probe.reserve("r", os.getpid(), 0, GIB)
    assert probe.process_vram(os.getpid()) == {0: GIB}


def test_fake_without_gpus_says_why(tmp_path: Path) -> None:
    probe = open_probe(TelemetryConfig(gpu_provider="fake"), tmp_path)
    assert probe.kind == "fake" and probe.devices() == [] and "fake_gpus is empty" in probe.reason


# ---- NVML ---------------------------------------------------------------------------------------------


def test_nvml_on_this_machine_never_raises(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    probe = open_probe(TelemetryConfig(), tmp_path)
    try:
        if probe.kind == "nvml":  # a GPU box: the inventory must be sane instead
            devices = probe.devices()
            assert devices and all(d.total_bytes == d.free_bytes + d.used_bytes for d in devices)
            assert [d.index for d in devices] == list(range(len(devices)))
            assert isinstance(probe.faults(), list)
        else:
            assert probe.kind == "none" and probe.reason.startswith("NVML")
            assert probe.devices() == [] and probe.device(0) is None and probe.faults() == []
    finally:
        probe.close()
        probe.close()
    assert capfd.readouterr().err == ""


def test_missing_pynvml_gives_a_no_gpu_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    probe = open_probe(TelemetryConfig(), tmp_path)
    assert isinstance(probe, NoGpuProbe) and probe.reason.startswith("NVML unavailable: ")


class StubNvmlError(Exception):
    NAMES = {3: "Not Supported", 10: "Timeout", 12: "NVML Shared Library Not Found", 15: "GPU is lost"}

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self.NAMES.get(self.value, "Unknown Error")


@dataclass
class StubProc:
    pid: int
    usedGpuMemory: int | None  # pynvml's field name


@dataclass
class StubEvent:
    device: int
    eventData: int  # pynvml's field name


@dataclass
class StubBox:
    """The state behind a stub ``pynvml``; handles are the device indices."""

    count: int = 2
    init_error: int | None = None
    lost: set[int] = field(default_factory=set)
    ecc: dict[int, int] = field(default_factory=lambda: {0: 5})  # device 1 has no ECC
    procs: dict[int, list[StubProc]] = field(default_factory=dict)
    events: list[StubEvent] = field(default_factory=list)
    shutdowns: int = 0

    def module(self) -> ModuleType:
        nv = ModuleType("pynvml")
        box = self

        def check(handle: int) -> int:
            if handle in box.lost:
                raise StubNvmlError(15)
            return handle

        def init() -> None:
            if box.init_error is not None:
                raise StubNvmlError(box.init_error)

        def ecc(handle: int, kind: int, counter: int) -> int:
            assert (kind, counter) == (1, 0)  # uncorrected, volatile
            if check(handle) not in box.ecc:
                raise StubNvmlError(3)
            return box.ecc[handle]

        def wait(events: object, timeout_ms: int) -> StubEvent:
            assert (events, timeout_ms) == ("set", 0)
            if not box.events:
                raise StubNvmlError(10)
            return box.events.pop(0)

        def shutdown() -> None:
            box.shutdowns += 1

        memory = {0: (24 * GIB, 20 * GIB), 1: (12 * GIB, 11 * GIB)}
        for name, value in {
            "NVMLError": StubNvmlError,
            "NVMLLibraryMismatchError": type("NVMLLibraryMismatchError", (Exception,), {}),
            "NVML_ERROR_TIMEOUT": 10,
            "NVML_MEMORY_ERROR_TYPE_UNCORRECTED": 1,
            "NVML_VOLATILE_ECC": 0,
            "nvmlEventTypeXidCriticalError": 8,
            "nvmlInit": init,
            "nvmlShutdown": shutdown,
            "nvmlDeviceGetCount": lambda: box.count,
            "nvmlDeviceGetHandleByIndex": lambda i: i,
            "nvmlDeviceGetIndex": check,
            "nvmlDeviceGetName": lambda h: f"Stub GPU {h}",
            "nvmlDeviceGetUUID": lambda h: f"GPU-stub-{h}",
            "nvmlDeviceGetMemoryInfo": lambda h: _Mem(*memory[check(h)]),
            "nvmlDeviceGetUtilizationRates": lambda h: _Util(30 + check(h)),
            "nvmlDeviceGetComputeRunningProcesses": lambda h: box.procs.get(check(h), []),
            "nvmlDeviceGetTotalEccErrors": ecc,
            "nvmlDeviceGetSupportedEventTypes": lambda h: 8 | 1 if h == 0 else 1,
            "nvmlDeviceRegisterEvents": lambda h, mask, events: None,
            "nvmlEventSetCreate": lambda: "set",
            "nvmlEventSetWait_v2": wait,
            "nvmlEventSetFree": lambda events: None,
        }.items():
            setattr(nv, name, value)
        return nv


@dataclass
class _Mem:
    total: int
    free: int


@dataclass
class _Util:
    gpu: int


def stub_probe(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, box: StubBox) -> gpu.GpuProbe:
    monkeypatch.setitem(sys.modules, "pynvml", box.module())
    return open_probe(TelemetryConfig(), tmp_path)


def test_nvml_reads_devices_processes_and_faults(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    box = StubBox(procs={0: [StubProc(4242, 3 * GIB), StubProc(7, GIB)], 1: [StubProc(4242, None)]})
    probe = stub_probe(monkeypatch, tmp_path, box)
    assert isinstance(probe, NvmlProbe) and (probe.kind, probe.reason) == ("nvml", "")
    assert probe.devices() == [
        GpuDevice(0, "Stub GPU 0", "GPU-stub-0", 24 * GIB, 20 * GIB, 4 * GIB, 30.0),
        GpuDevice(1, "Stub GPU 1", "GPU-stub-1", 12 * GIB, 11 * GIB, 1 * GIB, 31.0),
    ]
    assert probe.process_vram(4242) == {0: 3 * GIB}  # unknown usage (None) counts as nothing
    assert probe.faults() == []
    box.events.append(StubEvent(device=0, eventData=79))
    box.ecc[0] = 7
    assert probe.faults() == [
        GpuFault(0, "xid", "Xid 79"),
        GpuFault(0, "ecc", "2 new uncorrected ECC errors (volatile total 7)"),
    ]
    assert probe.faults() == []
    probe.close()
    probe.close()
    assert box.shutdowns == 1 and probe.devices() == [] and probe.faults() == []


def test_nvml_errors_never_escape(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    box = StubBox()
    probe = stub_probe(monkeypatch, tmp_path, box)
    box.lost.add(1)
    box.events.append(StubEvent(device=1, eventData=79))
    assert [d.index for d in probe.devices()] == [0]
    assert probe.device(1) is None and probe.process_vram(1) == {}
    assert probe.faults() == []  # the event's device cannot be resolved: logged, not raised
    assert any("GPU is lost" in getattr(r, "error", "") for r in caplog.records)
    probe.close()


@pytest.mark.parametrize(
    ("box", "reason"),
    [
        (StubBox(init_error=12), "NVML unavailable: NVML Shared Library Not Found"),
        (StubBox(count=0), "NVML found no GPUs"),
    ],
)
def test_nvml_without_gpus_gives_a_no_gpu_probe(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, box: StubBox, reason: str
) -> None:
    probe = stub_probe(monkeypatch, tmp_path, box)
    assert isinstance(probe, NoGpuProbe) and probe.reason == reason


# ---- preload arithmetic -------------------------------------------------------------------------------


def dev(index: int, free_mib: int, name: str = "G") -> GpuDevice:
    total = max(free_mib, 1) * MIB
    return GpuDevice(index, name, f"GPU-{index}", total, free_mib * MIB, total - free_mib * MIB, 0.0)


BOX = [dev(0, 12288, "Fake 12GB"), dev(1, 7680, "Fake 8GB")]


def test_vram_need_and_kv_estimate() -> None:
    assert gpu.vram_need_bytes(1000, 1.1, 24) == 1124  # 1.1 means 11/10, not 1.1000000000000000888
    assert gpu.vram_need_bytes(4 * GIB, 1.0, 0) == 4 * GIB
    assert gpu.kv_reserve_estimate(4096, 2, 98_362_432) == 4096 * 2 * 2 * 9917
    with pytest.raises(ValueError):
        gpu.vram_need_bytes(-1, 1.1, 0)
    with pytest.raises(ValueError):
        gpu.kv_reserve_estimate(0, 1, 1)


@given(
    st.integers(0, 1 << 40),
    st.floats(1.0, 4.0),
    st.floats(1.0, 4.0),
    st.integers(0, 1 << 34),
)
def test_vram_need_grows_with_the_factor(model: int, f1: float, f2: float, kv: int) -> None:
    low, high = sorted((f1, f2))
    assert model + kv <= gpu.vram_need_bytes(model, low, kv) <= gpu.vram_need_bytes(model, high, kv)


@given(st.integers(256, 1 << 20), st.integers(1, 64), st.integers(0, 1 << 40))
def test_kv_estimate_is_monotone(ctx: int, slots: int, model: int) -> None:
    base = gpu.kv_reserve_estimate(ctx, slots, model)
    assert base <= gpu.kv_reserve_estimate(ctx + 1, slots, model)
    assert base <= gpu.kv_reserve_estimate(ctx, slots + 1, model)
    assert base <= gpu.kv_reserve_estimate(ctx, slots, model + 1)


def test_check_vram_messages() -> None:
    headroom = 512 * MIB
    assert gpu.check_vram(BOX, 7168 * MIB, headroom, None) is None
    assert gpu.check_vram(BOX, 8192 * MIB, headroom, None) == (
        "GPU 1 (Fake 8GB): 7680 MiB free, needs 8192 MiB + 512 MiB headroom"
    )
    assert gpu.check_vram(BOX, 16384 * MIB, headroom, [3, 1]) == (
        "GPU 0 (Fake 12GB): 12288 MiB free, needs 12288 MiB (75.0% of 16384 MiB) + 512 MiB headroom"
    )
    assert gpu.check_vram(BOX, 10000 * MIB, headroom, [0.6, 0.4]) is None
    assert gpu.check_vram(BOX, 20000 * MIB, headroom, [0.6, 0.4]) == (
        "GPU 0 (Fake 12GB): 12288 MiB free, needs 12000 MiB (60.0% of 20000 MiB) + 512 MiB headroom; "
        "GPU 1 (Fake 8GB): 7680 MiB free, needs 8000 MiB (40.0% of 20000 MiB) + 512 MiB headroom"
    )
    # one byte short shows as a whole MiB more needed, never as "needs what is free"
    assert gpu.check_vram([dev(3, 1000)], 1000 * MIB + 1, 0, None) == (
        "GPU 3 (G): 1000 MiB free, needs 1001 MiB + 0 MiB headroom"
    )
    assert gpu.check_vram([dev(3, 1000)], 1000 * MIB, 0, None) is None
    assert gpu.check_vram([], 1, 0, None) == "no GPU to place the model on"
    with pytest.raises(ValueError):
        gpu.check_vram(BOX, 1, 0, [1.0])


devices_st = st.lists(st.integers(0, 65536), min_size=1, max_size=4).map(
    lambda frees: [dev(i, free) for i, free in enumerate(frees)]
)


def short_devices(reason: str | None) -> set[int]:
    return {int(m) for m in re.findall(r"GPU (\d+) \(", reason or "")}


@settings(max_examples=300)
@given(devices_st, st.integers(0, 1 << 37), st.integers(0, 4096), st.data())
def test_a_device_passes_iff_its_share_fits(
    devices: list[GpuDevice], need: int, headroom_mib: int, data: st.DataObject
) -> None:
    weights = data.draw(st.lists(st.integers(1, 100), min_size=len(devices), max_size=len(devices)))
    headroom = headroom_mib * MIB
    split = gpu.check_vram(devices, need, headroom, [float(w) for w in weights])
    whole = gpu.check_vram(devices, need, headroom, None)
    expected = {
        d.index
        for d, w in zip(devices, weights, strict=True)
        if d.free_bytes - headroom < need * Fraction(w, sum(weights))
    }
    assert short_devices(split) == expected
    assert short_devices(whole) == {d.index for d in devices if d.free_bytes - headroom < need}
    assert short_devices(split) <= short_devices(whole)  # a split never needs more than the whole


def test_check_ram() -> None:
    assert gpu.check_ram(4 * GIB, 0.25, GIB) is None
    assert gpu.check_ram(4 * GIB, 0.25, GIB - 1) == (
        "MemAvailable 1023 MiB, needs 1024 MiB (model 4096 MiB x ram_factor 0.25)"
    )
    assert gpu.check_ram(1000, 1.1, 1100) is None  # exact: 1000 x 1.1 is 1100, not 1100.0000000000002


@given(st.integers(0, 1 << 40), st.sampled_from([0.25, 0.5, 1.0, 1.2, 2.0]), st.integers(0, 1 << 41))
def test_check_ram_passes_iff_available_covers_the_need(model: int, factor: float, available: int) -> None:
    fits = available >= model * Fraction(repr(factor))
    assert (gpu.check_ram(model, factor, available) is None) == fits


def test_mem_available(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8000 kB\nMemFree:        1000 kB\nMemAvailable:   2048 kB\n")
    assert gpu.mem_available_bytes(meminfo) == 2048 * 1024
    meminfo.write_text("MemTotal:       8000 kB\n")
    with pytest.raises(OSError, match="no MemAvailable"):
        gpu.mem_available_bytes(meminfo)
    if Path("/proc/meminfo").exists():
        assert gpu.mem_available_bytes() > 0


def test_pick_auto_device() -> None:
    devices = [dev(0, 10000), dev(1, 12000), dev(2, 12000), dev(3, 4000)]
    assert gpu.pick_auto_device(devices, 11000 * MIB, 512 * MIB) == 1  # most free, tie → lowest index
    assert gpu.pick_auto_device(devices, 11500 * MIB, 512 * MIB) is None  # 11500 + 512 > 12000
    assert gpu.pick_auto_device(devices, 0, 0) == 1
    assert gpu.pick_auto_device([], 0, 0) is None


@given(devices_st, st.integers(0, 1 << 37), st.integers(0, 4096))
def test_the_auto_device_passes_and_has_the_most_free(
    devices: list[GpuDevice], need: int, headroom_mib: int
) -> None:
    headroom = headroom_mib * MIB
    chosen = gpu.pick_auto_device(devices, need, headroom)
    passing = [d for d in devices if d.free_bytes - headroom >= need]
    if not passing:
        assert chosen is None
        return
    best = max(d.free_bytes for d in passing)
    assert chosen == min(d.index for d in passing if d.free_bytes == best)


# ---- llorch gpus --------------------------------------------------------------------------------------


def test_gpus_prints_the_fake_inventory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "version: 1\n"
        "state_dir: ./state\n"
        "pools: [{id: m, engine: mock, model: m, devices: cpu}]\n"
        "telemetry: {gpu_provider: fake, fake_gpus: [{index: 0, name: F, total_mib: 1024, free_mib: 512}]}\n"
    )
    assert gpus(cfg) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {
        "kind": "fake",
        "reason": "",
        "devices": [
            {
                "index": 0,
                "name": "F",
                "uuid": "GPU-fake0000-0000-0000-0000-000000000000",
                "total_bytes": 1024 * MIB,
                "free_bytes": 512 * MIB,
                "used_bytes": 512 * MIB,
                "utilization": 0.0,
            }
        ],
    }


def test_gpus_without_config_uses_nvml(capsys: pytest.CaptureFixture[str]) -> None:
    assert gpus(None) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kind"] in ("nvml", "none") and isinstance(out["devices"], list)
    assert (out["kind"] == "none") == bool(out["reason"])


def test_gpus_with_a_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("version: 2\n")
    assert gpus(cfg) == 2
    assert capsys.readouterr().err
