"""The loader (issue 13) against a registry fed with pool managers' reports: what it plans from the
residency keys, and what the ledger shows. Its gRPC calls go to an address where nothing listens; the
plan, not the call, is under test here (the integration suite runs the calls)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from prometheus_client import CollectorRegistry

from llorch.config import ResidencyConfig
from llorch.v1 import types_pb2
from llorch_scheduler.loader import Loader
from llorch_scheduler.metrics import SchedulerMetrics
from llorch_scheduler.registry import PoolRegistry, set_of
from llorch_scheduler.residency import QueueView

GIB = 1 << 30


def _pool(pool_id: str, state: str, ctx: int) -> types_pb2.PoolState:
    pool = types_pb2.PoolState(
        pool_id=pool_id,
        engine="mock",
        model_ref=f"model-{pool_id}",
        model_digest="sha256:x",
        ctx=ctx,
        state=state,
        residency="on-demand",
        idle_unload_ms=300_000,
        slots=1,
    )
    pool.need_bytes["0"] = 8 * GIB
    pool.device_total_bytes["0"] = 12 * GIB
    pool.device_names["0"] = "Fake 12GB"
    pool.replicas.add(replica_id=f"{pool_id}-r0", state=state, slots_total=1)
    return pool


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def registry() -> AsyncIterator[PoolRegistry]:
    registry = PoolRegistry()
    registry.update(
        "pm", "127.0.0.1:9", "127.0.0.1:9", [_pool("a", "Ready", 2048), _pool("b", "Stopped", 1024)]
    )
    yield registry
    await registry.aclose()


async def _swap_planned(registry: PoolRegistry, settings: ResidencyConfig, after_ms: int) -> bool:
    """a is loaded with batch work queued; b's interactive task has waited 5 s. Is a evicted for b
    ``after_ms`` after a was first seen Ready?"""
    a, b = (p for _, p in registry.pools())
    clock = Clock()
    queues = {
        set_of(a): QueueView(set_of(a), batch=3, oldest_batch_ms=1_000),
        set_of(b): QueueView(set_of(b), interactive=1, oldest_interactive_ms=5_000),
    }
    loader = Loader(
        settings, registry, lambda: queues, SchedulerMetrics(CollectorRegistry()), "t", clock=clock
    )
    try:
        assert loader.tick().evict == []  # a was just seen Ready: it is protected
        clock.now += after_ms
        return [e.pool_id for e in loader.tick().evict] == ["a"]
    finally:
        await loader.aclose()


async def test_max_swap_wait_ms_decides_when_a_waiting_model_forces_a_swap(registry: PoolRegistry) -> None:
    assert await _swap_planned(registry, ResidencyConfig(max_swap_wait_ms=2_000, min_residency_s=0), 4_000)
    assert not await _swap_planned(
        registry, ResidencyConfig(max_swap_wait_ms=6_000, min_residency_s=0), 4_000
    )


async def test_min_residency_s_keeps_a_fresh_load(registry: PoolRegistry) -> None:
    assert not await _swap_planned(registry, ResidencyConfig(max_swap_wait_ms=0, min_residency_s=5), 4_000)
    assert await _swap_planned(registry, ResidencyConfig(max_swap_wait_ms=0, min_residency_s=3), 4_000)


async def test_the_ledger_counts_the_resident_and_lists_the_unloaded(registry: PoolRegistry) -> None:
    loader = Loader(ResidencyConfig(), registry, dict, SchedulerMetrics(CollectorRegistry()), "t")
    reply = loader.gpus()
    assert (reply.max_swap_wait_ms, reply.min_residency_ms) == (30_000, 10_000)
    (device,) = reply.devices
    assert (device.device, device.name, device.total_bytes) == ("0", "Fake 12GB", 12 * GIB)
    assert (device.used_bytes, device.reserved_bytes, device.free_bytes) == (8 * GIB, 0, 4 * GIB)
    assert {r.pool_id: r.state for r in device.residents} == {"a": "idle", "b": "unloaded"}
