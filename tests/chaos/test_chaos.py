"""One fault per test under load: every admitted task ends exactly once, nothing is lost, new tasks run
after recovery, and no record is left `running` without a lease (issue 10)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiohttp
import pytest

from tests.chaos.harness import ChaosStack, Fault, Load, Outcome, raw_witness, run_fault
from tests.support.procs import wait_until

SERVICE_DOWN_S = 1.5
"""How long a killed service stays down before its restart (the fault's length, not a wait)."""
REDIS_DOWN_S = 3.0
FREEZE_S = 10.0


def _check(outcome: Outcome, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print("\n" + outcome.report(), flush=True)
    failures = outcome.failures()
    assert not failures, "\n".join(failures)


async def _kill_redis(stack: ChaosStack, load: Load) -> float:
    stack.redis.kill()
    await asyncio.sleep(REDIS_DOWN_S)
    await stack.redis.start()
    return time.monotonic()


async def test_redis_killed_and_restarted(
    chaos_stack: ChaosStack, capsys: pytest.CaptureFixture[str]
) -> None:
    received: list[tuple[float, bytes]] = []
    killed_at: list[float] = []

    async def fault(stack: ChaosStack, load: Load) -> float:
        # One stream on a raw socket as well, to see the bytes the gateway writes across the outage.
        queued = next(t for t in load.traces.values() if not t.tokens)
        witnesses.append(asyncio.create_task(raw_witness(stack, queued.task_id, received)))

        async def streaming() -> bool:
            return b"event: started" in b"".join(data for _, data in received)

        await wait_until(streaming, 30, "the raw witness stream to start")
        killed_at.append(time.monotonic())
        return await _kill_redis(stack, load)

    witnesses: list[asyncio.Task[None]] = []
    outcome = await run_fault("redis", chaos_stack, fault)
    # Its task ended (the outcome's check), so the stream ends: after the terminal event, the body's end.
    await asyncio.wait_for(asyncio.gather(*witnesses), 60)
    after = b"".join(data for at, data in received if at > killed_at[0])
    with capsys.disabled():
        print(f"\nCHAOS redis: raw stream bytes after the kill: {after[-600:]!r}")
    _check(outcome, capsys)
    # The stream rode out the outage on its connection: no error comment, its terminal event came.
    assert b": error" not in after, after[-600:]
    assert b"event: end" in after or b"event: error" in after, after[-600:]


def _kill_and_restart(name: str) -> Fault:
    async def fault(stack: ChaosStack, load: Load) -> None:
        stack.kill(name)
        await asyncio.sleep(SERVICE_DOWN_S)
        stack.restart(name)

    return fault


@pytest.mark.parametrize("service", ["scheduler", "pm-mock-a", "gateway"])
async def test_service_killed_and_restarted(
    chaos_stack: ChaosStack, service: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _check(await run_fault(f"kill {service}", chaos_stack, _kill_and_restart(service)), capsys)


async def _freeze_pool_manager(stack: ChaosStack, load: Load) -> None:
    stack.signal("pm-mock-a", signal.SIGSTOP)
    try:
        await asyncio.sleep(FREEZE_S)
    finally:
        stack.signal("pm-mock-a", signal.SIGCONT)


async def test_pool_manager_frozen(chaos_stack: ChaosStack, capsys: pytest.CaptureFixture[str]) -> None:
    _check(await run_fault("SIGSTOP pm-mock-a 10s", chaos_stack, _freeze_pool_manager), capsys)


async def _kill_engine(stack: ChaosStack, load: Load) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        health = await stack.pool_health(http, "mock-a")
        assert health is not None
        pid = int(health["replicas"][0]["pid"])
        os.kill(pid, signal.SIGKILL)

        async def replaced() -> bool:
            now = await stack.pool_health(http, "mock-a")
            return bool(now and now["ready"] and now["replicas"][0]["pid"] not in (None, pid))

        await wait_until(replaced, 60, "the pool manager to restart its engine")


async def test_engine_killed(chaos_stack: ChaosStack, capsys: pytest.CaptureFixture[str]) -> None:
    _check(await run_fault("kill engine of mock-a", chaos_stack, _kill_engine), capsys)
