"""Pool-manager topology, `devices: auto` placement, preload checks and replica ranking."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from llorch import gpu
from llorch.config import FakeGpu, LlorchConfig
from llorch_poolmgr import preload
from llorch_poolmgr.faults import PoolError
from llorch_poolmgr.topology import UNPLACED, manager_args, place_auto, plan_managers, resolve_devices
from llorch_scheduler.placement import Option, choose, rank

GIB = 1 << 30
MIB = 1 << 20


def _dev(index: int, free_gib: float, total_gib: float = 24) -> gpu.GpuDevice:
    total, free = int(total_gib * GIB), int(free_gib * GIB)
    return gpu.GpuDevice(index, f"GPU{index}", f"uuid-{index}", total, free, total - free, None)


def _cfg(tmp_path: Path, pools: list[dict[str, Any]], model_bytes: int = MIB) -> LlorchConfig:
    model = tmp_path / "m.gguf"
    with model.open("wb") as handle:
        handle.truncate(model_bytes)
    return LlorchConfig.model_validate(
        {
            "version": 1,
            "state_dir": str(tmp_path / "state"),
            "catalog": {"models": [{"id": "m", "path": str(model)}]},
            "pools": [{"engine": "llamacpp", "model": "m", "ctx": 2048, **p} for p in pools],
        }
    )


def _kv(mib: int) -> dict[str, Any]:
    return {"vram": {"factor": 1.0, "kv_reserve_mib": mib, "headroom_mib": 512}}


def test_one_manager_per_mask_then_cpu(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        [
            {"id": "cpu-a", "devices": "cpu", "allow_cpu": True},
            {"id": "g1", "devices": [1]},
            {"id": "g0", "devices": [0]},
            {"id": "split", "devices": [0, 1], "tensor_split": [2, 1]},
            {"id": "g0b", "devices": [0]},
        ],
    )
    plans = plan_managers(cfg, [_dev(0, 24), _dev(1, 12, 12)])
    assert [(p.index, p.name, p.pools) for p in plans] == [
        (0, "gpu0", ["g0", "g0b"]),
        (1, "gpu0-1", ["split"]),
        (2, "gpu1", ["g1"]),
        (3, "cpu", ["cpu-a"]),
    ]
    assert manager_args(plans[1]) == ["pool-manager", "--index", "1", "--pools", "split"]


def test_auto_goes_to_the_gpu_with_most_free_vram_after_fixed_pools(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        [
            {"id": "fixed0", "devices": [0], **_kv(16 * 1024)},  # leaves ~8 GiB on GPU 0
            {"id": "auto-a", "devices": "auto", **_kv(6 * 1024)},  # GPU 1 (12 GiB) has more free
            {"id": "auto-b", "devices": "auto", **_kv(6 * 1024)},  # GPU 1 now ~6 GiB, GPU 0 ~8 GiB
            {"id": "auto-huge", "devices": "auto", **_kv(64 * 1024)},  # fits nowhere
        ],
    )
    chosen = place_auto(cfg, [_dev(0, 24), _dev(1, 12, 12)])
    assert chosen == {"auto-a": 1, "auto-b": 0, "auto-huge": UNPLACED}
    plans = plan_managers(cfg, [_dev(0, 24), _dev(1, 12, 12)])
    assert {p.name: p.assign for p in plans} == {
        "gpu0": {"auto-b": 0},
        "gpu1": {"auto-a": 1},
        "cpu": {"auto-huge": -1},
    }
    assert resolve_devices(cfg, cfg.pools[3], {"auto-huge": UNPLACED}, []) == (
        "devices: auto found no GPU with enough free VRAM for this pool"
    )
    assert resolve_devices(cfg, cfg.pools[1], {}, [_dev(0, 24), _dev(1, 12, 12)]) == [1]


def test_auto_without_gpus_runs_a_mock_on_the_cpu(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, [{"id": "auto-mock", "devices": "auto", "engine": "mock"}])
    assert resolve_devices(cfg, cfg.pools[0], {}, []) is None


def _fake(tmp_path: Path, mib: int) -> gpu.GpuProbe:
    return gpu.FakeProbe([FakeGpu(index=0, name="Fake", total_mib=mib, free_mib=mib)], tmp_path / "fake")


def test_preload_refuses_short_vram_and_plans_the_reservation(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, [{"id": "p", "devices": [0], **_kv(2048)}], model_bytes=512 * MIB)
    pool, path = cfg.pools[0], Path(cfg.catalog.models[0].path)
    short = preload.check(pool, [0], path, _fake(tmp_path, 2048), mem_available=64 * GIB)
    assert isinstance(short, preload.Failure) and short.code == PoolError.INSUFFICIENT_VRAM
    assert "GPU 0" in short.message
    plan = preload.check(pool, [0], path, _fake(tmp_path, 8192), mem_available=64 * GIB)
    assert plan == preload.Plan({0: 2560 * MIB})
    bumped = preload.check(pool, [0], path, _fake(tmp_path, 8192), bump=1.1, mem_available=64 * GIB)
    assert isinstance(bumped, preload.Plan) and bumped.per_device[0] > 2560 * MIB


def test_preload_refuses_short_ram_and_missing_devices(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, [{"id": "p", "devices": [3]}], model_bytes=64 * MIB)
    pool, path = cfg.pools[0], Path(cfg.catalog.models[0].path)
    ram = preload.check(pool, [3], path, _fake(tmp_path, 8192), mem_available=MIB)
    assert isinstance(ram, preload.Failure) and ram.code == PoolError.INSUFFICIENT_RAM
    gone = preload.check(
        pool, [3], path, gpu.NoGpuProbe("NVML unavailable: no driver"), mem_available=64 * GIB
    )
    assert isinstance(gone, preload.Failure) and gone.code == PoolError.INSUFFICIENT_VRAM
    assert "GPU 3 not found" in gone.message and "no driver" in gone.message


def test_vllm_needs_its_memory_utilization_of_the_device(tmp_path: Path) -> None:
    cfg = _cfg(
        tmp_path,
        [{"id": "v", "engine": "vllm", "devices": [0], "engine_args": ["--gpu-memory-utilization", "0.5"]}],
    )
    plan = preload.check(
        cfg.pools[0], [0], Path(cfg.catalog.models[0].path), _fake(tmp_path, 8192), mem_available=64 * GIB
    )
    assert plan == preload.Plan({0: 4096 * MIB})


def test_ranking_order_affinity_slots_vram_ids() -> None:
    options = [
        Option("p-b", "p-b-r0", 2, 5 * GIB),
        Option("p-a", "p-a-r1", 2, 5 * GIB),
        Option("p-a", "p-a-r0", 2, 5 * GIB),
        Option("p-c", "p-c-r0", 2, 9 * GIB),
        Option("p-d", "p-d-r0", 3, 0),
        Option("p-e", "p-e-r0", 0, 20 * GIB),
    ]
    assert [o.replica_id for o in rank(options)] == ["p-d-r0", "p-c-r0", "p-a-r0", "p-a-r1", "p-b-r0"]
    assert choose(options, warm_replica="p-b-r0") == options[0]
    assert choose(options, warm_replica="p-e-r0") == options[4]  # warm but full: affinity yields


_options = st.lists(
    st.builds(
        Option,
        st.sampled_from(["a", "b", "c"]),
        st.text("0123456789", min_size=1, max_size=3),
        st.integers(0, 4),
        st.integers(0, 8).map(lambda g: g * GIB),
    ),
    max_size=8,
    unique_by=lambda o: o.replica_id,
)


@given(_options, st.randoms())
def test_ranking_is_deterministic_and_never_picks_a_full_replica(options: list[Option], rnd: Any) -> None:
    shuffled = list(options)
    rnd.shuffle(shuffled)
    assert rank(options) == rank(shuffled)
    assert all(o.slots_free > 0 for o in rank(options))
    best = choose(options)
    if best is not None:
        assert best.slots_free == max(o.slots_free for o in options)
