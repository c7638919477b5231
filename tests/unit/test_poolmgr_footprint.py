"""What a pool reports it would hold once loaded (issue 13): the preload estimate split over its devices
as the VRAM check splits it, x replicas, RAM for a CPU pool; each device's total and name from the
probe's inventory, and the "cpu" device's from `residency.cpu_memory_mib` or MemTotal."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from llorch import gpu
from llorch.config import PoolConfig, ResidencyConfig
from llorch.gguf_meta import ModelFacts
from llorch_poolmgr import footprint
from llorch_poolmgr.footprint import Footprint, Sizer, cpu_total_bytes

MIB = 1 << 20
GIB = 1 << 30
INVENTORY = [
    gpu.GpuDevice(0, "Fake 24GB", "GPU-0", 24 * GIB, 20 * GIB, 4 * GIB, 0.0),
    gpu.GpuDevice(1, "Fake 12GB", "GPU-1", 12 * GIB, 12 * GIB, 0, 0.0),
]


def _pool(**keys: Any) -> PoolConfig:
    return PoolConfig.model_validate({"id": "p", "engine": "llamacpp", "model": "m", **keys})


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"\0" * 3 * MIB)
    return path


@pytest.fixture(autouse=True)
def no_facts(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The GGUF reader (a worker process, a cache file) replaced: no facts unless a test gives some."""
    asked: list[Path] = []

    async def facts_of(path: Path) -> ModelFacts | None:
        asked.append(path)
        return None

    monkeypatch.setattr(footprint, "facts_of", facts_of)
    return asked


async def test_one_gpu_pool_needs_model_times_factor_plus_kv_per_replica(model: Path) -> None:
    pool = _pool(devices=[1], replicas=2, vram={"factor": 1.5, "kv_reserve_mib": 100})
    measured = await Sizer(INVENTORY, 0).measure(pool, [1], model)
    one = math.ceil(3 * MIB * 1.5) + 100 * MIB
    assert measured == Footprint({"1": 2 * one}, {"1": 12 * GIB}, {"1": "Fake 12GB"})


async def test_the_need_is_split_as_the_vram_check_splits_it(model: Path) -> None:
    vram = {"factor": 1.0, "kv_reserve_mib": 1}
    split = _pool(devices=[0, 1], tensor_split=[3.0, 1.0], vram=vram)
    need = 3 * MIB + 1 * MIB
    measured = await Sizer(INVENTORY, 0).measure(split, [0, 1], model)
    assert measured.need_bytes == {"0": need * 3 // 4, "1": need // 4}
    assert measured.total_bytes == {"0": 24 * GIB, "1": 12 * GIB}
    assert measured.names == {"0": "Fake 24GB", "1": "Fake 12GB"}
    # Without tensor_split the check asks each device for the whole need; so does the footprint.
    whole = await Sizer(INVENTORY, 0).measure(_pool(devices=[0, 1], vram=vram), [0, 1], model)
    assert whole.need_bytes == {"0": need, "1": need}


async def test_the_kv_reserve_comes_from_the_gguf_facts_when_they_say(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    facts = ModelFacts("llama", 1, None, 4096, 2, (4, 4), 64, 64)

    async def facts_of(path: Path) -> ModelFacts:
        return facts

    monkeypatch.setattr(footprint, "facts_of", facts_of)
    pool = _pool(devices=[0], ctx=1024, slots=2, vram={"factor": 1.0})
    measured = await Sizer(INVENTORY, 0).measure(pool, [0], model)
    kv = gpu.kv_reserve_from_facts(1024, 2, facts)
    assert kv is not None and measured.need_bytes == {"0": 3 * MIB + kv}


async def test_a_vllm_pool_takes_its_utilization_of_each_device(model: Path) -> None:
    pool = _pool(engine="vllm", devices=[0], engine_args=["--gpu-memory-utilization", "0.5"])
    assert (await Sizer(INVENTORY, 0).measure(pool, [0], model)).need_bytes == {"0": 12 * GIB}


async def test_a_cpu_pool_needs_ram_on_the_cpu_device(model: Path, no_facts: list[Path]) -> None:
    pool = _pool(engine="mock", devices="cpu", replicas=3)
    measured = await Sizer(INVENTORY, 64 * GIB).measure(pool, None, model)
    assert measured == Footprint({"cpu": 3 * math.ceil(3 * MIB * 1.2)}, {"cpu": 64 * GIB}, {"cpu": "cpu"})
    assert no_facts == []  # RAM needs no KV figure: the model is not parsed
    ram_factor = _pool(engine="mock", devices="cpu", ram_factor=2.0)
    assert (await Sizer(INVENTORY, 0).measure(ram_factor, None, model)).need_bytes == {"cpu": 6 * MIB}


async def test_a_missing_model_or_an_unknown_device_reports_what_is_known(tmp_path: Path) -> None:
    pool = _pool(devices=[0, 7])
    measured = await Sizer(INVENTORY, 0).measure(pool, [0, 7], tmp_path / "gone.gguf")
    assert measured == Footprint({}, {"0": 24 * GIB}, {"0": "Fake 24GB"})
    assert Sizer(INVENTORY, 5).devices(["auto", "cpu"]) == Footprint({}, {"cpu": 5}, {"cpu": "cpu"})


def test_the_cpu_total_is_the_configured_budget_else_memtotal(tmp_path: Path) -> None:
    assert cpu_total_bytes(ResidencyConfig(cpu_memory_mib=2048)) == 2048 * MIB
    assert cpu_total_bytes(ResidencyConfig()) == gpu.mem_total_bytes() > 0
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       16384 kB\nMemFree:  1 kB\nMemAvailable:   8192 kB\n")
    assert (gpu.mem_total_bytes(meminfo), gpu.mem_available_bytes(meminfo)) == (16384 * 1024, 8192 * 1024)
    meminfo.write_text("MemFree:  1 kB\n")
    with pytest.raises(OSError, match="no MemTotal"):
        gpu.mem_total_bytes(meminfo)
