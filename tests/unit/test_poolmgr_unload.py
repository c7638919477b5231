"""The pool manager's unload (issue 13), step by step: refused while a task runs; otherwise every
replica refuses new Starts before its engine stops, so a Start that races the unload is refused; the
replicas end Stopped (an operator's drain kept), the pool's load lock held meanwhile; an unknown pool
is not found. The engines are stand-ins: a runner whose stop the test releases."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import cast

import pytest
from prometheus_client import CollectorRegistry

from llorch import gpu
from llorch.config import PoolConfig
from llorch.v1 import poolmgr_pb2
from llorch_poolmgr.eventlog import EventLog
from llorch_poolmgr.executor import Executor
from llorch_poolmgr.footprint import Sizer
from llorch_poolmgr.metrics import PoolMetrics
from llorch_poolmgr.reload import Runner
from llorch_poolmgr.residency import Residency
from llorch_poolmgr.service import Pools
from llorch_poolmgr.supervisor import Replica, ReplicaState
from llorch_poolmgr.telemetry import Telemetry


class GatedRunner(Runner):
    """Stops nothing until ``release`` is set; records which replicas it was asked to stop."""

    def __init__(self) -> None:
        super().__init__()
        self.stopping: list[str] = []
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def stop(self, replica: Replica) -> None:
        self.stopping.append(replica.replica_id)
        self.entered.set()
        await self.release.wait()


class Setup:
    def __init__(self, tmp_path: Path) -> None:
        pool = PoolConfig.model_validate(
            {"id": "p", "engine": "mock", "model": "m", "devices": "cpu", "residency": "on-demand"}
        )
        metrics = PoolMetrics(CollectorRegistry())
        self.changes = 0
        probe = gpu.NoGpuProbe("no GPU in a unit test")
        self.replicas = [
            Replica(pool, k, tmp_path / "m.gguf", None, tmp_path, probe, metrics, self._changed)
            for k in range(2)
        ]
        assert all(r.state == ReplicaState.STOPPED for r in self.replicas)  # on-demand: unloaded at start
        for replica in self.replicas:
            replica.state = ReplicaState.READY  # as after a Resume
            replica.watcher.telemetry = Telemetry(vram_used_bytes={"cpu": 123})
        self.pools = Pools([(pool, "sha256:x", self.replicas)], metrics, Sizer([], 0), {})
        self.runner = GatedRunner()
        self.residency = Residency(self.pools, self.runner)
        # A refused Start never reaches the event log: none is needed here.
        self.executor = Executor(cast(EventLog, None), self.pools.replicas, metrics)

    def _changed(self) -> None:
        self.changes += 1

    def start(self, task_id: str) -> bool:
        request = poolmgr_pb2.GenerateRequest(task_id=task_id, replica_id=self.replicas[0].replica_id)
        return self.executor.try_start(request) is not None


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path)


async def test_a_start_racing_the_unload_is_refused_and_the_pool_ends_stopped(setup: Setup) -> None:
    setup.replicas[1].draining = True  # an operator drained this one: the unload keeps that
    unload = asyncio.create_task(setup.residency.unload("p", "evicted"))
    await setup.runner.entered.wait()  # the first engine is stopping
    assert all(r.draining for r in setup.replicas)
    assert not setup.start("raced")  # refused: the scheduler re-queues it
    assert setup.residency.lock("p").locked()  # a Resume now waits for the engines to stop
    assert not unload.done()

    setup.runner.release.set()
    assert await unload is True
    assert setup.runner.stopping == ["p-r0", "p-r1"]
    assert [r.state for r in setup.replicas] == [ReplicaState.STOPPED, ReplicaState.STOPPED]
    assert [r.draining for r in setup.replicas] == [False, True]
    assert all(r.telemetry.vram_used_bytes == {} for r in setup.replicas)  # a stopped engine uses none
    assert setup.changes >= 2 and not setup.residency.lock("p").locked()
    assert setup.pools.states()[0].state == "Stopped"


async def test_an_unload_is_refused_while_a_task_runs(setup: Setup) -> None:
    setup.replicas[1].running.add("busy-task")
    setup.runner.release.set()
    assert await setup.residency.unload("p", "idle") is False
    assert setup.runner.stopping == []  # nothing stopped, nothing refused from now on
    assert not any(r.draining for r in setup.replicas)
    assert [r.state for r in setup.replicas] == [ReplicaState.READY, ReplicaState.READY]

    setup.replicas[1].running.clear()  # the task ended: now it goes
    assert await setup.residency.unload("p", "idle") is True
    assert setup.runner.stopping == ["p-r0", "p-r1"]


async def test_an_unknown_pool_is_not_found(setup: Setup) -> None:
    assert await setup.residency.unload("nope", "idle") is None
