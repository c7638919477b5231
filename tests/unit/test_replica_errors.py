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
