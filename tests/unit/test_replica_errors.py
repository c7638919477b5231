"""A bug or OS error inside a replica's supervision restarts it like a crash (typed, counted), and with
the breaker it opens the circuit, instead of ending the run loop with the pool stuck in Preloading."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from llorch import gpu
from llorch.config import FakeGpu, PoolConfig
from llorch_poolmgr import supervisor
from llorch_poolmgr.faults import PoolError
from llorch_poolmgr.metrics import PoolMetrics
from llorch_poolmgr.supervisor import Replica, ReplicaState


async def test_an_unexpected_error_is_a_typed_failure_that_opens_the_circuit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = 0

    async def broken_facts(path: Path) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("facts reader bug")

    monkeypatch.setattr(supervisor, "facts_of", broken_facts)
    pool = PoolConfig.model_validate(
        {
            "id": "p-err",
            "engine": "mock",
            "model": "m",
            "devices": [0],
            "restart": {"initial_backoff_ms": 1, "max_backoff_ms": 2, "breaker_failures": 2},
        }
    )
    probe = gpu.FakeProbe([FakeGpu(index=0, name="Fake", total_mib=1024, free_mib=1024)], tmp_path / "fake")
    metrics = PoolMetrics(CollectorRegistry())
    changed = asyncio.Event()
    replica = Replica(pool, 0, tmp_path / "m.gguf", [0], tmp_path, probe, metrics, changed.set)
    run = asyncio.create_task(replica.run())
    try:
        async with asyncio.timeout(30):
            while replica.state != ReplicaState.UNAVAILABLE:
                assert not run.done(), "the run loop ended instead of recording a failure"
                changed.clear()
                await changed.wait()
    finally:
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
    assert calls == 2  # both lives of the breaker ran and failed
    restarts = metrics.registry.get_sample_value(
        "engine_restarts_total", {"pool_id": "p-err", "reason": "unhealthy"}
    )
    assert restarts == 2
    assert replica.last_error is not None
    code, message, _ = replica.last_error
    assert code == PoolError.CIRCUIT_OPEN.value
    assert "RuntimeError: facts reader bug" in message


def test_the_restart_keys_set_the_backoff_and_the_breaker_window(tmp_path: Path) -> None:
    """pools.restart.initial_backoff_ms doubles per recent failure up to max_backoff_ms (±20 % jitter),
    and breaker_window_s is how long a failure counts."""
    pool = PoolConfig.model_validate(
        {
            "id": "p-backoff",
            "engine": "mock",
            "model": "m",
            "devices": [0],
            "restart": {"initial_backoff_ms": 400, "max_backoff_ms": 1000, "breaker_window_s": 60},
        }
    )
    probe = gpu.FakeProbe([FakeGpu(index=0, name="Fake", total_mib=1024, free_mib=1024)], tmp_path / "fake")
    replica = Replica(
        pool, 0, tmp_path / "m.gguf", [0], tmp_path, probe, PoolMetrics(CollectorRegistry()), lambda: None
    )
    now = [1000.0]
    replica.breaker.clock = lambda: now[0]
    expected_ms = {1: 400, 2: 800, 3: 1000, 4: 1000}  # doubled, then capped
    for failures, base_ms in expected_ms.items():
        replica.breaker.record()
        assert replica.breaker.recent() == failures
        waits = [replica._backoff_s(None) * 1000 for _ in range(50)]  # type: ignore[arg-type]
        assert all(0.8 * base_ms <= w <= 1.2 * base_ms for w in waits), (failures, min(waits), max(waits))
    assert replica.breaker.window_s == 60
    now[0] += 61  # past the window: no recent failure counts any more
    assert replica.breaker.recent() == 0
