"""On-demand residency on a fake 12 GiB GPU with the mock engine (issue 13).

Three on-demand pools of 5 GiB each (the KV reserve sets the estimate) cannot all fit: two can. One is
pinned. Tasks load their models, an idle model is evicted least recently used first, a busy model is
never evicted (checked while its long task runs: the waiting task is told why), the pinned one never
leaves, an idle model unloads after idle_unload_s, and a model bigger than the GPU gets its 400.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import wait_until
from tests.support.stack import MOCK_MODEL, Client, SseEvent, Stack, mock_pool

GIB = 1 << 30
MODELS = ("model-a", "model-b", "model-c", "model-huge")


def _pool(pool_id: str, model: str, ctx: int, reserve_gib: int, **extra: Any) -> dict[str, Any]:
    return mock_pool(
        pool_id,
        slots=1,
        model=model,
        ctx=ctx,
        devices=[0],
        residency="on-demand",
        vram={"kv_reserve_mib": reserve_gib * 1024, "headroom_mib": 0, "factor": 1.0},
        args=["--token-delay-ms", "20"],
        **extra,
    )


def _config() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    # Distinct ctx keep the sets apart (the four catalog ids share one file, so one digest).
    pools = [
        _pool("pool-a", "model-a", 2048, 5),
        _pool("pool-b", "model-b", 1536, 5, idle_unload_s=1),
        _pool("pool-c", "model-c", 1024, 5, pinned=True),
        _pool("pool-huge", "model-huge", 512, 20),
    ]
    fake_gpu = {"index": 0, "name": "Fake 12GB", "total_mib": 12288, "free_mib": 12288}
    extra = {
        "telemetry": {"gpu_provider": "fake", "fake_gpus": [fake_gpu]},
        "residency": {"min_residency_s": 0, "max_swap_wait_ms": 30_000},
    }
    return pools, extra


async def _state(http: aiohttp.ClientSession, stack: Stack, pool_id: str) -> str:
    async with http.get(f"{stack.url}/v1/pools/{pool_id}/health", headers=stack.headers) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["state"])


async def _counter(http: aiohttp.ClientSession, stack: Stack, name: str, **labels: str) -> float:
    async with http.get(f"{stack.url}/metrics") as r:
        text = await r.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def _run(client: Client, model: str, max_tokens: int = 5) -> list[SseEvent]:
    task_id = await client.admit(model_ref=model, max_tokens=max_tokens)
    frames = await client.events(task_id)
    assert frames[-1].event == "end", frames[-1]
    return frames


def _phases(frames: list[SseEvent]) -> list[str]:
    return [f.data.get("phase", "") for f in frames if f.event in ("started", "metrics")]


async def test_on_demand_pools_load_evict_and_unload_as_specified(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    pools, extra = _config()
    stack = stack_factory(
        pools=pools, models=[{"id": m, "path": str(MOCK_MODEL)} for m in MODELS], extra=extra
    )
    await stack.start()  # ready although nothing is loaded: on-demand pools serve
    client = Client(stack, http)
    for pool_id in ("pool-a", "pool-b", "pool-c"):
        assert await _state(http, stack, pool_id) == "Stopped"
    async with http.get(f"{stack.url}/v1/capabilities", headers=stack.headers) as r:
        (engine,) = (await r.json())["engines"]
    assert engine["model_status"] == dict.fromkeys(MODELS, "unloaded"), engine

    # A task for an unloaded model waits, is told so, and is served.
    frames = await _run(client, "model-c")
    assert frames[0].event == "started" and frames[0].data["phase"] == "loading", frames[0]
    phases = _phases(frames)
    assert phases.index("dispatch") > 0 and "loading" in phases[: phases.index("dispatch")], phases
    await _run(client, "model-a")  # fits beside c
    assert await _counter(http, stack, "model_loads_total", model="model-a", reason="demand") == 1

    # A long task keeps a busy; b fits only if a or c leaves: c is pinned, a is busy, so b waits.
    long_task = await client.admit(model_ref="model-a", max_tokens=2000)
    async for frame in client.follow(long_task):
        if frame.event == "token":
            break
    waiting = await client.admit(model_ref="model-b", max_tokens=5, priority="interactive")
    async with asyncio.timeout(60):  # the queue watch's next frames say why the load waits
        async for frame in client.follow(waiting):
            assert frame.event in ("started", "metrics"), frame  # not dispatched while a is busy
            if "pool-a" in str(frame.data.get("waiting_for", "")):
                break
    assert (await client.status(long_task))["state"] == "running"
    assert await _state(http, stack, "pool-a") == "Ready"  # busy: never evicted
    assert await _state(http, stack, "pool-b") == "Stopped"
    assert await _counter(http, stack, "model_evictions_total", model="model-a") == 0

    # The long task ends: a drains, is evicted for b, and the waiting task is served.
    assert await client.cancel(long_task) == 204
    frames = await client.events(waiting)
    assert frames[-1].event == "end", frames[-1]
    assert await _counter(http, stack, "model_evictions_total", model="model-a", reason="swap") == 1
    assert await _counter(http, stack, "model_load_ms_count", model="model-b") == 1

    # b unloads by itself once idle for its idle_unload_s; c, pinned, stays.
    async def b_unloaded() -> bool:
        return await _state(http, stack, "pool-b") == "Stopped"

    await wait_until(b_unloaded, 30, "pool-b to unload when idle")
    assert await _counter(http, stack, "model_evictions_total", model="model-b", reason="idle") == 1
    assert await _state(http, stack, "pool-c") == "Ready"
    assert await _counter(http, stack, "model_evictions_total", model="model-c") == 0

    # A model bigger than every GPU is refused at admission, never queued.
    status, payload, _ = await client.submit(model_ref="model-huge", max_tokens=5)
    assert status == 400, payload
    assert payload["code"] == "INVALID_PARAMS" and payload["field"] == "model_ref", payload
    assert "cannot load on any GPU" in payload["message"]

    logs = stack.logs()
    for event in ("model_load_started", "model_loaded", "model_evicted", "model_unloaded"):
        assert f'"{event}"' in logs, event
