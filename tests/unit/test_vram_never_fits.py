"""Defect 5: a pool whose VRAM need exceeds its device's TOTAL memory is a configuration error. Its need
is not counted against the GPU when `devices: auto` pools are placed, and its preload check fails
permanently (the replica goes to Failed instead of retrying in Backoff). GPUs come from the fake
provider, sized like an H200."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from llorch import gpu
from llorch.config import FakeGpu, LlorchConfig
from llorch_poolmgr import preload
from llorch_poolmgr.faults import Failure, PoolError
from llorch_poolmgr.topology import place_auto, plan_managers

MIB = 1 << 20
H200_MIB = 143771


def _cfg(tmp_path: Path, pools: list[dict[str, Any]]) -> LlorchConfig:
    model = tmp_path / "m.gguf"
    with model.open("wb") as handle:
        handle.truncate(98 * MIB)  # the 98 MB model of the H200 report
    return LlorchConfig.model_validate(
        {
            "version": 1,
            "state_dir": str(tmp_path / "state"),
            "catalog": {"models": [{"id": "m", "path": str(model)}]},
            "pools": [{"engine": "llamacpp", "model": "m", "ctx": 2048, **p} for p in pools],
            "telemetry": {
                "gpu_provider": "fake",
                "fake_gpus": [{"index": 0, "name": "Fake H200", "total_mib": H200_MIB, "free_mib": H200_MIB}],
            },
        }
    )


def _vram(kv_mib: int) -> dict[str, Any]:
    return {"vram": {"factor": 1.0, "kv_reserve_mib": kv_mib, "headroom_mib": 512}}


def _probe(cfg: LlorchConfig) -> gpu.GpuProbe:
    return gpu.open_probe(cfg.telemetry, cfg.state_dir)


def test_an_impossible_pool_takes_nothing_from_auto_placement(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        [
            {"id": "impossible", "devices": [0], **_vram(200_000)},  # > 143771 MiB in all
            {"id": "auto", "devices": "auto", **_vram(1024)},
        ],
    )
    probe = _probe(cfg)
    try:
        devices = probe.devices()
        assert place_auto(cfg, devices) == {"auto": 0}
        plans = plan_managers(cfg, devices)
        assert [(p.name, p.pools) for p in plans] == [("gpu0", ["impossible", "auto"])]  # no CPU manager
    finally:
        probe.close()


def test_a_possible_fixed_pool_still_counts_against_auto_placement(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        [
            {"id": "big", "devices": [0], **_vram(140_000)},  # fits the empty card, leaves ~3.6 GiB
            {"id": "auto", "devices": "auto", **_vram(8 * 1024)},
        ],
    )
    probe = _probe(cfg)
    try:
        assert place_auto(cfg, probe.devices()) == {"auto": -1}
    finally:
        probe.close()


def test_preload_of_an_impossible_pool_fails_permanently_naming_device_and_mib(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, [{"id": "impossible", "devices": [0], **_vram(200_000)}])
    probe = _probe(cfg)
    try:
        failure = preload.check(
            cfg.pools[0], [0], Path(cfg.catalog.models[0].path), probe, mem_available=1 << 40
        )
    finally:
        probe.close()
    assert isinstance(failure, Failure) and failure.permanent
    assert failure.code == PoolError.INSUFFICIENT_VRAM
    assert "GPU 0 (Fake H200)" in failure.message and f"{H200_MIB} MiB in total" in failure.message
    assert "MiB" in failure.message and "never fit" in failure.message


def test_a_shortage_of_free_vram_stays_transient(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, [{"id": "p", "devices": [0], **_vram(100_000)}])
    busy = gpu.FakeProbe(
        [FakeGpu(index=0, name="Fake H200", total_mib=H200_MIB, free_mib=50_000)], cfg.state_dir
    )
    try:
        failure = preload.check(
            cfg.pools[0], [0], Path(cfg.catalog.models[0].path), busy, mem_available=1 << 40
        )
    finally:
        busy.close()
    assert isinstance(failure, Failure) and not failure.permanent
    assert failure.code == PoolError.INSUFFICIENT_VRAM and "MiB free" in failure.message
