"""What clients can plan with: replica sets with load, queue and SLO, and capabilities (SPEC §2.3, §5.12).

Both are computed at request time from the pool registry (the pool managers' latest reports) and the
queue depths in Redis. The SLO snapshot covers the last 5 minutes of task ends the pool managers
reported: `first_token_ms` and `decode_ms` percentiles over successful tasks, and `on_time_ratio`
= succeeded / (succeeded + ended by DEADLINE_UNMET). Each value is null until there is data.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Final

from llorch.errors import Code
from llorch.lifecycle import COMING_STATES
from llorch.store import Store
from llorch.v1 import scheduler_pb2, types_pb2

from .registry import Manager, PoolRegistry, on_demand, set_of

API_VERSION: Final = "1.0.0"
SLO_WINDOW_S: Final = 300.0
QUEUE_POLICIES: Final = ("reject", "drop-lru")


@dataclass(frozen=True, slots=True)
class _End:
    at: float
    first_token_ms: int
    decode_ms: int
    code: str


def _percentile(values: list[int], q: float) -> int | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class SloWindow:
    def __init__(self, window_s: float = SLO_WINDOW_S) -> None:
        self.window_s = window_s
        self._ends: dict[str, deque[_End]] = {}

    def record(self, rs: str, done: types_pb2.TaskFinished) -> None:
        ends = self._ends.setdefault(rs, deque())
        ends.append(_End(time.monotonic(), int(done.first_token_ms), int(done.decode_ms), done.code))

    def snapshot(self, rs: str) -> scheduler_pb2.SloSnapshot:
        ends = self._ends.get(rs, deque())
        cutoff = time.monotonic() - self.window_s
        while ends and ends[0].at < cutoff:
            ends.popleft()
        ok = [e for e in ends if not e.code]
        late = sum(1 for e in ends if e.code == Code.DEADLINE_UNMET.value)
        first_tokens = [e.first_token_ms for e in ok if e.first_token_ms]
        return scheduler_pb2.SloSnapshot(
            first_token_ms_p50=_percentile(first_tokens, 0.5),
            first_token_ms_p95=_percentile(first_tokens, 0.95),
            decode_ms_p50=_percentile([e.decode_ms for e in ok], 0.5),
            on_time_ratio=round(len(ok) / (len(ok) + late), 4) if ok or late else None,
        )


async def replica_sets(
    registry: PoolRegistry, store: Store, slo: SloWindow
) -> scheduler_pb2.ListReplicaSetsResponse:
    reply = scheduler_pb2.ListReplicaSetsResponse()
    for rs in registry.replica_sets():
        info = registry.set_info(rs)
        if info is None:
            continue
        members = sorted((p for _, p in registry.pools() if set_of(p) == rs), key=lambda p: p.pool_id)
        total, free = registry.slots(rs)
        interactive, batch = await store.queue_depths(rs)
        first = members[0]
        reply.sets.append(
            scheduler_pb2.ReplicaSetView(
                id=rs,
                engine=info.engine,
                engine_version=info.engine_version,
                model_id=first.model_ref,
                model_digest=first.model_digest,
                ctx=info.ctx,
                sampler_profile_version=first.sampler_profile_version,
                pools=list(info.pool_ids),
                ready=total > 0,
                devices=sorted({d for p in members for d in p.devices}),
                determinism="strict" if info.single_slot and info.engine != "vllm" else "best_effort",
                load=round((total - free) / total, 4) if total else 0.0,
                slots_total=total,
                slots_free=free,
                queue_interactive=interactive,
                queue_batch=batch,
                queue_capacity=info.queue_capacity,
                full_policy=info.full_policy,
                slo=slo.snapshot(rs),
                residency="on-demand" if any(on_demand(p) for p in members) else "always",
                status=_status(members),
            )
        )
    return reply


def _status(members: list[types_pb2.PoolState]) -> str:
    """loaded (a member is Ready), loading (one is on its way), else unloaded."""
    states = {p.state for p in members}
    if "Ready" in states:
        return "loaded"
    if states & COMING_STATES:
        return "loading"
    return "unloaded"


def _ready_slots(registry: PoolRegistry, manager: Manager, pool: types_pb2.PoolState) -> tuple[int, int]:
    if not registry.is_ready(manager, pool):
        return 0, 0
    ready = [r for r in pool.replicas if r.state == "Ready"]
    return sum(r.slots_total for r in ready), sum(max(0, r.slots_total - registry.busy(r)) for r in ready)


def _concurrency(
    registry: PoolRegistry, pools: list[tuple[Manager, types_pb2.PoolState]]
) -> scheduler_pb2.Concurrency:
    """Slots of the Ready replicas of ``pools``, in all and per device (a split pool counts on each
    of its devices)."""
    devices: dict[str, scheduler_pb2.DeviceConcurrency] = {}
    all_total = all_free = 0
    for manager, pool in pools:
        total, free = _ready_slots(registry, manager, pool)
        all_total, all_free = all_total + total, all_free + free
        seen = {t.device: t for t in pool.telemetry}
        for device in pool.devices:
            entry = devices.setdefault(device, scheduler_pb2.DeviceConcurrency(device=device))
            tel = seen.get(device)
            if tel is not None and tel.name:  # a GPU the probe knows
                entry.name = tel.name
                entry.vram_total_bytes = tel.vram_total_bytes
                entry.vram_free_bytes = tel.vram_free_bytes
            entry.slots_total += total
            entry.slots_free += free
    order = sorted(devices, key=lambda d: (not d.isdigit(), d.zfill(4)))
    return scheduler_pb2.Concurrency(
        slots_total=all_total, slots_free=all_free, per_device=[devices[d] for d in order]
    )


def capabilities(registry: PoolRegistry, sessions: bool) -> scheduler_pb2.CapabilitiesResponse:
    """Engines with at least one configured pool, each with its concurrency as of now (SPEC D16)."""
    by_engine: dict[str, list[tuple[Manager, types_pb2.PoolState]]] = {}
    for manager, pool in registry.pools():
        by_engine.setdefault(pool.engine, []).append((manager, pool))
    reply = scheduler_pb2.CapabilitiesResponse(api_version=API_VERSION)
    for engine in sorted(by_engine):
        pools = [p for _, p in by_engine[engine]]
        strict = any(all(r.slots_total == 1 for r in p.replicas) for p in pools) and engine != "vllm"
        reply.engines.append(
            scheduler_pb2.EngineCapability(
                engine=engine,
                engine_versions=sorted({p.engine_version for p in pools if p.engine_version}),
                ctx_max=max(p.ctx for p in pools),
                supported_workloads=sorted({w for p in pools for w in p.workloads}),
                models=sorted({p.model_ref for p in pools}),
                features=scheduler_pb2.EngineFeatures(
                    determinism=["strict", "best_effort"] if strict else ["best_effort"],
                    queue_policies=list(QUEUE_POLICIES),
                    sessions=sessions,
                    budgets=sessions,
                    openai_compat=False,
                    tensor_split=engine == "llamacpp",
                    kv_hint=True,
                ),
                concurrency=_concurrency(registry, by_engine[engine]),
                model_status=_model_status(registry, by_engine[engine]),
            )
        )
    return reply


def _model_status(registry: PoolRegistry, pools: list[tuple[Manager, types_pb2.PoolState]]) -> dict[str, str]:
    """ready (a Ready pool serves it), loading (one is on its way), unloaded (an on-demand pool that a
    task would load), else unavailable."""
    rank = {"ready": 0, "loading": 1, "unloaded": 2, "unavailable": 3}
    out: dict[str, str] = {}
    for manager, pool in pools:
        if registry.is_ready(manager, pool):
            status = "ready"
        elif pool.state in COMING_STATES:
            status = "loading"
        elif registry.is_loadable(manager, pool):
            status = "unloaded"
        else:
            status = "unavailable"
        previous = out.get(pool.model_ref, "unavailable")
        out[pool.model_ref] = min(previous, status, key=rank.__getitem__)
    return out
