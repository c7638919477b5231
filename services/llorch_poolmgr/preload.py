"""Preload checks (ORCH-3002/3003, OC-POOL-3001..3003): fail fast, before any engine starts.

VRAM: every masked device's free memory minus `vram.headroom_mib` must cover its share of
model bytes x `vram.factor` (x 1.1 per VRAM OOM seen, ORCH-3039) + the KV reserve. The KV reserve is
`vram.kv_reserve_mib` when the operator sets it; else, for a GGUF file, the exact f16 KV size from its
metadata (layers x KV heads x head sizes, :func:`llorch.gpu.kv_reserve_from_facts`); else (directory
models, unreadable metadata) the file-size guess :func:`llorch.gpu.kv_reserve_estimate`. A vLLM pool
needs `--gpu-memory-utilization` x the device's total instead. RAM: MemAvailable must cover
model bytes x `ram_factor`. The numbers go into the reason, so `last_error` says what to change. A need
that exceeds a device's total memory (before any OOM bump) can never load: that failure is permanent.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final

from llorch import gpu
from llorch.config import PoolConfig

from .faults import Failure, PoolError

if TYPE_CHECKING:  # the caller reads the facts; this module only does arithmetic on them
    from llorch.gguf_meta import ModelFacts

MIB: Final = 1 << 20
VLLM_DEFAULT_UTILIZATION: Final = 0.9


@dataclass(frozen=True, slots=True)
class Plan:
    """What the replica will hold once loaded: bytes per masked device (empty for CPU pools)."""

    per_device: dict[int, int]


def model_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _vllm_utilization(pool: PoolConfig) -> float:
    args = list(pool.engine_args)
    for i, arg in enumerate(args):
        if arg == "--gpu-memory-utilization" and i + 1 < len(args):
            return float(args[i + 1])
        if arg.startswith("--gpu-memory-utilization="):
            return float(arg.partition("=")[2])
    return VLLM_DEFAULT_UTILIZATION


def kv_reserve(pool: PoolConfig, size: int, facts: ModelFacts | None = None) -> int:
    """The KV reserve in bytes: the operator's `vram.kv_reserve_mib`, else the exact figure from the
    model's GGUF `facts`, else the guess from the model's `size`."""
    if pool.vram.kv_reserve_mib is not None:
        return pool.vram.kv_reserve_mib * MIB
    exact = gpu.kv_reserve_from_facts(pool.ctx, pool.slots, facts) if facts is not None else None
    return exact if exact is not None else gpu.kv_reserve_estimate(pool.ctx, pool.slots, size)


def vram_need(pool: PoolConfig, size: int, bump: float, facts: ModelFacts | None = None) -> int:
    """Model bytes x `vram.factor` + the KV reserve (:func:`kv_reserve`), the whole estimate x `bump`
    (1.1 per VRAM OOM)."""
    kv = kv_reserve(pool, size, facts)
    return math.ceil(gpu.vram_need_bytes(size, pool.vram.factor, kv) * bump)


def ram_factor(pool: PoolConfig, devices: list[int] | None) -> float:
    """`ram_factor`, else 1.2 for a CPU replica (`devices` None) and 0.25 for a GPU one."""
    if pool.ram_factor is not None:
        return pool.ram_factor
    return 1.2 if devices is None else 0.25


def split(pool: PoolConfig, need: int, devices: list[int]) -> dict[int, int]:
    """`need` over `devices` as the VRAM check counts it: by `tensor_split`, else each device holds it
    all."""
    shares = pool.tensor_split or [1.0] * len(devices)
    total = sum(shares) if pool.tensor_split else 1.0
    return {index: int(need * share / total) for index, share in zip(devices, shares, strict=True)}


def replica_need(
    pool: PoolConfig,
    devices: list[int] | None,
    size: int,
    totals: Mapping[int, int],
    facts: ModelFacts | None = None,
) -> dict[str, int]:
    """What one loaded replica of `pool` holds per device label ("0", "1", ... or "cpu"), as
    :func:`check` predicts it (no OOM bump, no headroom): host RAM for a CPU replica, VRAM otherwise
    (a vLLM pool: its utilization of each device's total in `totals`)."""
    if devices is None:
        return {"cpu": math.ceil(size * ram_factor(pool, None))}
    if pool.engine == "vllm":
        util = _vllm_utilization(pool)
        return {str(index): int(totals.get(index, 0) * util) for index in devices}
    need = vram_need(pool, size, 1.0, facts)
    return {str(index): nbytes for index, nbytes in split(pool, need, devices).items()}


def check(
    pool: PoolConfig,
    devices: list[int] | None,
    path: Path,
    probe: gpu.GpuProbe,
    bump: float = 1.0,
    mem_available: int | None = None,
    facts: ModelFacts | None = None,
) -> Plan | Failure:
    """The preload decision for one replica of `pool` on `devices` (None: a CPU pool).

    `facts` are the GGUF metadata of the model at `path` (:func:`llorch.gguf_meta.read_facts`), which
    the caller reads (off the event loop: it takes seconds on a large vocabulary); None keeps the
    file-size KV guess."""
    try:
        size = model_bytes(path)
    except OSError as exc:
        return Failure(PoolError.MODEL_NOT_FOUND, f"model file {path}: {exc.strerror}")
    available = gpu.mem_available_bytes() if mem_available is None else mem_available
    short = gpu.check_ram(size, ram_factor(pool, devices), available)
    if short is not None:
        return Failure(PoolError.INSUFFICIENT_RAM, short)
    if devices is None:
        return Plan({})
    found = [probe.device(index) for index in devices]
    missing = [index for index, dev in zip(devices, found, strict=True) if dev is None]
    if missing:
        why = f" ({probe.reason})" if probe.reason else ""
        return Failure(
            PoolError.INSUFFICIENT_VRAM, f"GPU {missing[0]} not found by the {probe.kind} probe{why}"
        )
    present = [dev for dev in found if dev is not None]
    headroom = pool.vram.headroom_mib * MIB
    if pool.engine == "vllm":
        util = _vllm_utilization(pool)
        per_device = {dev.index: int(dev.total_bytes * util) for dev in present}
        for dev in present:
            short = gpu.check_vram([dev], per_device[dev.index], headroom, None)
            if short is not None:
                return Failure(PoolError.INSUFFICIENT_VRAM, short)
        return Plan(per_device)
    need = vram_need(pool, size, bump, facts)
    never = gpu.check_vram_total(present, vram_need(pool, size, 1.0, facts), headroom, pool.tensor_split)
    if never is not None:
        return Failure(PoolError.INSUFFICIENT_VRAM, never, permanent=True)
    short = gpu.check_vram(present, need, headroom, pool.tensor_split)
    if short is not None:
        return Failure(PoolError.INSUFFICIENT_VRAM, short)
    return Plan(split(pool, need, [dev.index for dev in present]))
