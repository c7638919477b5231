"""Effects of the pool keys that only a running pool manager shows (issue 15, "No inert config"):
``preload: false``, ``timeouts.start_ms``, ``timeouts.selftest_ms`` and ``timeouts.wall_ms``, each on its
own pool of one stack, and ``sampler_profiles`` with ``pools[].sampler_profile_version`` (what reaches the
engine, from the mock's ``--log-requests``); ``tests/unit/test_config_keys.py`` names these tests."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.support.procs import wait_until
from tests.support.stack import MOCK_MODEL, Client, Stack, mock_pool

CUSTOM = {"temperature": 0.25, "top_k": 7, "top_p": 0.5, "min_p": 0.01, "repeat_penalty": 1.1}
MODELS = ("mock-tiny", "mock-lazy", "mock-slow-start", "mock-slow-test", "mock-wall")
ONE_LIFE = {"initial_backoff_ms": 60_000, "breaker_failures": 1}  # the first failure opens the circuit


async def _health(http: aiohttp.ClientSession, stack: Stack, pool_id: str) -> dict[str, Any]:
    async with http.get(f"{stack.url}/v1/pools/{pool_id}/health", headers=stack.headers) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def _last_error(http: aiohttp.ClientSession, stack: Stack, pool_id: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def failed() -> bool:
        seen.update(await _health(http, stack, pool_id))
        return seen["state"] == "Unavailable"

    await wait_until(failed, 60, f"pool {pool_id} to give up")
    return dict(seen["last_error"])


async def test_preload_and_the_pool_timeouts_take_effect(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(
        pools=[
            mock_pool("mock-a"),
            mock_pool("mock-lazy", model="mock-lazy", preload=False),
            mock_pool(
                "mock-slow-start",
                model="mock-slow-start",
                args=["--start-delay-ms", "30000"],
                timeouts={"start_ms": 1000},
                restart=ONE_LIFE,
            ),
            mock_pool(
                "mock-slow-test",
                model="mock-slow-test",
                args=["--first-token-delay-ms", "30000"],
                timeouts={"selftest_ms": 1000},
                restart=ONE_LIFE,
            ),
            mock_pool(
                "mock-wall",
                model="mock-wall",
                ctx=1024,  # a replica set of its own: its tasks run on this pool only
                args=["--token-delay-ms", "50"],
                timeouts={"wall_ms": 1000},
            ),
        ],
        models=[{"id": model, "path": str(MOCK_MODEL)} for model in MODELS],
    )
    await stack.start()
    await stack.wait_pools_ready("mock-a", "mock-wall")

    # preload: false — the pool stays Stopped until resumed, then loads.
    assert (await _health(http, stack, "mock-lazy"))["state"] == "Stopped"
    async with http.post(f"{stack.url}/v1/pools/mock-lazy/resume", headers=stack.headers) as r:
        assert r.status == 202, await r.text()
    await stack.wait_pools_ready("mock-lazy")

    # timeouts.start_ms and timeouts.selftest_ms: each names itself in the pool's last error.
    slow_start = await _last_error(http, stack, "mock-slow-start")
    assert "timeouts.start_ms" in slow_start["message"], slow_start
    slow_test = await _last_error(http, stack, "mock-slow-test")
    assert "timeouts.selftest_ms" in slow_test["message"], slow_test

    # timeouts.wall_ms: a run that keeps streaming is cut off at the pool's wall time (50 s of tokens
    # asked for, 1 s allowed; the idle limit, 60 s, never trips while tokens flow).
    client = Client(stack, http)
    task_id = await client.admit(model_ref="mock-wall", max_tokens=1000)
    events = await client.events(task_id)
    assert events[-1].event == "error", events[-1]
    assert events[-1].data["code"] == "DECODE_TIMEOUT", events[-1].data
    tokens = [e for e in events if e.event == "token"]
    assert 0 < len(tokens) < 1000


async def test_the_pools_sampler_profile_reaches_the_engine(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(
        pools=[mock_pool(args=["--log-requests"], sampler_profile_version="custom-v1")],
        extra={"sampler_profiles": {"v1": {**CUSTOM, "temperature": 0.0}, "custom-v1": CUSTOM}},
    )
    await stack.start()
    await stack.wait_pools_ready("mock-a")
    client = Client(stack, http)
    task_id = await client.admit(max_tokens=2)
    assert (await client.events(task_id))[-1].event == "end"
    logs = "".join(path.read_text() for path in stack.workdir.rglob("mock-a-r0*.log"))
    sent = [
        json.loads(line.split("completion settings ", 1)[1])
        for line in logs.splitlines()
        if "completion settings " in line
    ]
    assert sent, "the engine logged no completion"
    assert {key: sent[-1][key] for key in CUSTOM} == CUSTOM  # the task's own request, after the self-test's
