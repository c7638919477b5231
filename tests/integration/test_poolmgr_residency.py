"""The pool manager's side of on-demand residency (issue 13), on a fake GPU with the mock engine: an
on-demand pool starts unloaded and reports its predicted need and its device's total before anything
loads; ``Resume`` loads it behind the preload check; ``Unload`` is refused while a task runs there and
otherwise stops the engine, giving the fake GPU's memory back; ``Resume`` loads it again.

The pool manager runs alone (with Redis), called over its own gRPC service as the scheduler calls it,
so no swap planner loads or unloads a pool behind the test's back. A task is a direct ``Start`` whose
first token the mock engine holds back until the task is aborted.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from typing import Any, cast

import aiohttp
import grpc.aio
import pytest
import yaml

from llorch import gpu
from llorch.config import FakeGpu
from llorch.rpc import metadata
from llorch.v1 import poolmgr_pb2, poolmgr_pb2_grpc, types_pb2
from tests.support.procs import wait_until
from tests.support.stack import MOCK_MODEL, Stack, mock_pool

MIB = 1 << 20
GPU_MIB = 8192
FAKE_GPU = FakeGpu(index=0, name="Fake 8GB", total_mib=GPU_MIB, free_mib=GPU_MIB)
COLD = "mock-cold"
IDLE_UNLOAD_S = 3600
FAST_RESTART = {"initial_backoff_ms": 50, "max_backoff_ms": 200, "breaker_failures": 1000}


class PoolManager:
    """The stack's pool manager, called over its own gRPC service with the internal token."""

    def __init__(self, stub: poolmgr_pb2_grpc.PoolManagerStub, token: str) -> None:
        self.stub = stub
        self.md = metadata(token)

    async def pool(self, pool_id: str = COLD) -> types_pb2.PoolState:
        reply = await self.stub.Health(poolmgr_pb2.HealthRequest(), metadata=self.md)
        return next(p for p in reply.pools if p.pool_id == pool_id)

    async def resume(self, pool_id: str = COLD) -> poolmgr_pb2.ResumeResponse:
        return await self.stub.Resume(poolmgr_pb2.ResumeRequest(pool_id=pool_id), metadata=self.md)

    async def unload(self, pool_id: str = COLD) -> poolmgr_pb2.UnloadReply:
        request = poolmgr_pb2.UnloadRequest(pool_id=pool_id, reason="evicted")
        return await self.stub.Unload(request, metadata=self.md)

    async def start(self, task_id: str) -> bool:
        pool = await self.pool()
        request = poolmgr_pb2.GenerateRequest(
            task_id=task_id,
            pool_id=COLD,
            replica_id=pool.replicas[0].replica_id,
            replica_set_id="rs-test",
            prompt="hello",
            max_tokens=8,
            priority="interactive",
            workload="completion",
        )
        call = cast(Any, self.stub.StartStream)(metadata=self.md)
        await call.write(poolmgr_pb2.StartCalls(calls=[poolmgr_pb2.StartCall(call=1, request=request)]))
        reply = await call.read()
        call.cancel()
        [result] = reply.results
        assert result.call == 1
        return bool(result.reply.accepted)

    async def abort(self, task_id: str) -> bool:
        reply = await self.stub.Abort(poolmgr_pb2.AbortRequest(task_id=task_id), metadata=self.md)
        return bool(reply.aborted)

    async def busy(self) -> bool:
        return any(r.slots_busy for r in (await self.pool()).replicas)

    async def wait_state(self, state: str, pool_id: str = COLD) -> types_pb2.PoolState:
        async def reached() -> bool:
            try:
                return (await self.pool(pool_id)).state == state
            except grpc.aio.AioRpcError:  # not listening yet
                return False

        await wait_until(reached, 60, f"{pool_id} to be {state}")
        return await self.pool(pool_id)


def _cold_pool(pool_id: str, kv_mib: int, **extra: Any) -> dict[str, Any]:
    """An on-demand mock pool on fake GPU 0 whose need is the model file + ``kv_mib``."""
    vram = {"factor": 1.0, "kv_reserve_mib": kv_mib, "headroom_mib": 0}
    return mock_pool(pool_id, model=pool_id, devices=[0], residency="on-demand", vram=vram, **extra)


def _stack(stack_factory: Any, *pools: dict[str, Any], **extra: Any) -> Stack:
    stack: Stack = stack_factory(
        pools=list(pools),
        models=[{"id": pool["model"], "path": str(MOCK_MODEL)} for pool in pools],
        extra={"telemetry": {"gpu_provider": "fake", "fake_gpus": [FAKE_GPU.model_dump()]}, **extra},
    )
    return stack


@pytest.fixture
async def connect() -> AsyncIterator[Any]:
    """Start ``stack``'s pool manager alone and return a client of it."""
    channels: list[grpc.aio.Channel] = []

    def connected(stack: Stack) -> PoolManager:
        stack.start_pool_manager()
        config = yaml.safe_load(stack.config_path.read_text())
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{config['grpc']['pool_manager_base_port']}")
        channels.append(channel)
        return PoolManager(poolmgr_pb2_grpc.PoolManagerStub(channel), stack.env["LLORCH_INTERNAL_TOKEN"])

    yield connected
    for channel in channels:
        await channel.close()


def _free_bytes(stack: Stack) -> int:
    device = gpu.FakeProbe([FAKE_GPU], stack.workdir / "state").device(0)
    assert device is not None
    return device.free_bytes


def _need(kv_mib: int) -> int:
    return gpu.vram_need_bytes(MOCK_MODEL.stat().st_size, 1.0, kv_mib * MIB)


async def _hold_first_token(http: aiohttp.ClientSession, manager: PoolManager) -> None:
    """Make the engine hold a task's first token back (10 min): the task runs until it is aborted."""
    port = (await manager.pool()).replicas[0].port
    async with http.post(
        f"http://127.0.0.1:{port}/mock/control", json={"first_token_delay_ms": 600_000}
    ) as r:
        assert r.status == 200, await r.text()


async def test_an_on_demand_pool_loads_on_resume_and_unloads_only_when_idle(
    stack_factory: Any, connect: Any, http: aiohttp.ClientSession
) -> None:
    pool_cfg = _cold_pool(COLD, 512, pinned=True, idle_unload_s=IDLE_UNLOAD_S)
    stack = _stack(stack_factory, pool_cfg)
    manager: PoolManager = connect(stack)
    need, total = _need(512), GPU_MIB * MIB

    # Unloaded at start, yet it reports what it would take and what its device holds in all.
    pool = await manager.wait_state("Stopped")
    assert (pool.residency, pool.pinned, pool.idle_unload_ms) == ("on-demand", True, IDLE_UNLOAD_S * 1000)
    assert dict(pool.need_bytes) == {"0": need}
    assert dict(pool.device_total_bytes) == {"0": total}
    assert dict(pool.device_names) == {"0": "Fake 8GB"}
    assert not pool.live and _free_bytes(stack) == total

    # Resume loads it: the preload check reserves its need on the fake GPU.
    assert (await manager.resume()).found
    await manager.wait_state("Ready")
    assert _free_bytes(stack) == total - need

    # A task running there: the unload is refused and nothing changes.
    await _hold_first_token(http, manager)
    assert await manager.start("task-long")
    assert await manager.busy()  # reported busy as soon as Start accepted it
    refused = await manager.unload()
    assert (refused.found, refused.unloaded, refused.state) == (True, False, "Ready")
    assert (await manager.pool()).state == "Ready" and _free_bytes(stack) == total - need

    # Once it has ended, the unload stops the engine and gives the memory back.
    assert await manager.abort("task-long")

    async def idle() -> bool:
        return not await manager.busy()

    await wait_until(idle, 60, "the aborted task to leave the pool")
    done = await manager.unload()
    assert (done.found, done.unloaded, done.state) == (True, True, "Stopped")
    pool = await manager.pool()
    assert pool.state == "Stopped" and not pool.live and dict(pool.need_bytes) == {"0": need}
    assert _free_bytes(stack) == total
    again = await manager.unload()  # idempotent
    assert (again.found, again.unloaded, again.state) == (True, True, "Stopped")
    assert not (await manager.unload("no-such-pool")).found
    log = stack.procs["pool-manager"].log_text()
    assert log.count('"event": "model_unloaded"') == 1, log[-3000:]  # the second unload stopped nothing
    assert f'"model_id": "{COLD}"' in log and '"reason": "evicted"' in log

    # Resume loads it once more, and it takes tasks again.
    assert (await manager.resume()).found
    await manager.wait_state("Ready")
    assert _free_bytes(stack) == total - need
    await _hold_first_token(http, manager)
    assert await manager.start("task-after-reload")
    assert await manager.busy() and await manager.abort("task-after-reload")
    await wait_until(idle, 60, "the aborted task to leave the pool")

    # A reload onto a bigger model: the reported need follows the new model, measured once.
    bigger = stack.workdir / "bigger.bin"
    bigger.write_bytes(b"\0" * 2 * MIB)
    request = poolmgr_pb2.ReloadRequest(pool_id=COLD, model_ref="mock-bigger", model_path=str(bigger))
    assert (await manager.stub.Reload(request, metadata=manager.md)).state == "Ready"
    need = gpu.vram_need_bytes(2 * MIB, 1.0, 512 * MIB)
    pool = await manager.pool()
    assert (pool.model_ref, dict(pool.need_bytes)) == ("mock-bigger", {"0": need})

    async def old_engine_gone() -> bool:
        return _free_bytes(stack) == total - need

    await wait_until(old_engine_gone, 60, "the old engine's reservation to go")


async def test_a_load_that_does_not_fit_backs_off_until_an_unload_makes_room(
    stack_factory: Any, connect: Any
) -> None:
    # Each fits the 8 GiB GPU alone, not both together; neither is pinned, an always pool reports 0.
    first, second = _cold_pool("cold-a", 4096), _cold_pool("cold-b", 5120, restart=FAST_RESTART)
    always = mock_pool("warm", model="warm", devices=[0], vram={"factor": 1.0, "kv_reserve_mib": 64})
    on_cpu = mock_pool("cold-cpu", model="cold-cpu", residency="on-demand")  # devices: cpu
    stack = _stack(stack_factory, first, second, always, on_cpu, residency={"cpu_memory_mib": 3000})
    manager: PoolManager = connect(stack)
    warm = await manager.wait_state("Ready", "warm")
    assert (warm.residency, warm.pinned, warm.idle_unload_ms) == ("always", False, 0)
    cold = await manager.pool("cold-a")
    assert (cold.state, cold.pinned, cold.idle_unload_ms) == ("Stopped", False, 300_000)  # the defaults
    # A CPU pool's device is the host's RAM: the configured budget, and the model x ram_factor 1.2.
    cpu = await manager.pool("cold-cpu")
    assert (cpu.state, dict(cpu.device_total_bytes)) == ("Stopped", {"cpu": 3000 * MIB})
    assert (dict(cpu.need_bytes), dict(cpu.device_names)) == (
        {"cpu": math.ceil(MOCK_MODEL.stat().st_size * 1.2)},
        {"cpu": "cpu"},
    )

    assert (await manager.resume("cold-a")).found
    await manager.wait_state("Ready", "cold-a")
    assert (await manager.resume("cold-b")).found

    async def refused() -> bool:
        pool = await manager.pool("cold-b")
        return pool.has_error and pool.last_error.code == "INSUFFICIENT_VRAM"

    await wait_until(refused, 60, "cold-b's preload check to refuse it")
    assert (await manager.pool("cold-b")).state != "Ready"
    assert _free_bytes(stack) == GPU_MIB * MIB - _need(4096) - _need(64)

    assert (await manager.unload("cold-a")).unloaded
    await manager.wait_state("Ready", "cold-b")  # its next attempt finds the room
    assert _free_bytes(stack) == GPU_MIB * MIB - _need(5120) - _need(64)
