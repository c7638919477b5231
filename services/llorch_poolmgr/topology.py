"""Which pool manager owns which pool, and where `devices: auto` pools go (SPEC §1, §5.3).

One pool manager per device mask that fixed pools name (`[0]`, `[1]`, `[0, 1]` for a split), plus one
for CPU pools (`devices: cpu`) — in that order, so manager n listens on `pool_manager_base_port + n`.
An `auto` pool is placed after the fixed pools, in config order, on the single GPU with the most free
VRAM that passes its VRAM check, counting what the pools placed before it will take (the probe's free
memory minus their predicted need; the running engines' own use is already in the probe). A fixed pool
whose need exceeds its devices' total memory never loads, so it takes nothing. It then
belongs to that GPU's manager. With no GPU that fits, a mock pool runs on the CPU manager and any
other pool stays unplaced: its manager reports INSUFFICIENT_VRAM with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llorch import gpu
from llorch.config import LlorchConfig, PoolConfig

from .preload import MIB, model_bytes, vram_need

UNPLACED = -1


@dataclass
class ManagerPlan:
    index: int
    name: str  # "gpu0", "gpu0-1", "cpu"
    pools: list[str] = field(default_factory=list)
    assign: dict[str, int] = field(default_factory=dict)  # auto pool -> chosen GPU (or UNPLACED)


def manager_args(plan: ManagerPlan) -> list[str]:
    """The `llorch` arguments that start the pool manager of `plan` (add `--config FILE`)."""
    args = ["pool-manager", "--index", str(plan.index), "--pools", ",".join(plan.pools)]
    return args + [f"--assign={pool}={index}" for pool, index in plan.assign.items()]


def _need(pool: PoolConfig, models: dict[str, Path]) -> int:
    path = models.get(pool.model)
    try:
        size = model_bytes(path) if path is not None else 0
    except OSError:
        size = 0
    return vram_need(pool, size, 1.0) * pool.replicas


def _never_fits(pool: PoolConfig, models: dict[str, Path], devices: list[gpu.GpuDevice]) -> bool:
    """A fixed pool whose need exceeds its devices' total memory: a configuration error (defect 5)."""
    if not devices or pool.engine == "vllm" or len(devices) != len(pool.devices or []):
        return False
    need = _need(pool, models) // pool.replicas
    return gpu.check_vram_total(devices, need, pool.vram.headroom_mib * MIB, pool.tensor_split) is not None


def place_auto(cfg: LlorchConfig, devices: list[gpu.GpuDevice]) -> dict[str, int]:
    """Auto pool id → GPU index (UNPLACED when none fits), deterministic for equal inputs."""
    models = {m.id: Path(m.path) for m in cfg.catalog.models}
    free = {dev.index: dev.free_bytes for dev in devices}
    by_index = {dev.index: dev for dev in devices}
    for pool in cfg.pools:
        if isinstance(pool.devices, list):
            if _never_fits(pool, models, [by_index[i] for i in pool.devices if i in by_index]):
                continue  # it will never load (its manager reports it Failed): it takes nothing
            share = _need(pool, models) // len(pool.devices)
            for index in pool.devices:
                if index in free:
                    free[index] -= share
    chosen: dict[str, int] = {}
    for pool in cfg.pools:
        if pool.devices != "auto":
            continue
        need = _need(pool, models)
        view = [
            gpu.GpuDevice(d.index, d.name, d.uuid, d.total_bytes, max(0, free[d.index]), d.used_bytes, None)
            for d in devices
        ]
        pick = gpu.pick_auto_device(view, need, pool.vram.headroom_mib * MIB)
        chosen[pool.id] = UNPLACED if pick is None else pick
        if pick is not None:
            free[pick] -= need
    return chosen


def plan_managers(cfg: LlorchConfig, devices: list[gpu.GpuDevice]) -> list[ManagerPlan]:
    auto = place_auto(cfg, devices)
    groups: dict[tuple[int, ...], ManagerPlan] = {}
    cpu = ManagerPlan(0, "cpu")
    for pool in cfg.pools:
        if isinstance(pool.devices, list):
            mask = tuple(pool.devices)
        elif pool.devices == "auto" and auto[pool.id] != UNPLACED:
            mask = (auto[pool.id],)
        else:
            mask = ()
        plan = cpu if not mask else groups.setdefault(mask, ManagerPlan(0, "gpu" + "-".join(map(str, mask))))
        plan.pools.append(pool.id)
        if pool.devices == "auto":
            plan.assign[pool.id] = auto[pool.id]
    plans = [groups[mask] for mask in sorted(groups)] + ([cpu] if cpu.pools else [])
    for index, plan in enumerate(plans):
        plan.index = index
    return plans


def resolve_devices(
    cfg: LlorchConfig, pool: PoolConfig, assign: dict[str, int], devices: list[gpu.GpuDevice]
) -> list[int] | str | None:
    """The replica's device mask: a list of GPUs, None for the CPU, or why it has none."""
    if isinstance(pool.devices, list):
        return list(pool.devices)
    if pool.devices == "cpu":
        return None
    pick = assign.get(pool.id)
    if pick is None:  # a manager started without a plan places it from what the probe sees now
        pick = place_auto(cfg, devices).get(pool.id, UNPLACED)
    if pick != UNPLACED:
        return [pick]
    if pool.engine == "mock":
        return None  # the mock may run anywhere
    return "devices: auto found no GPU with enough free VRAM for this pool"
