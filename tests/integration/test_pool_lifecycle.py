"""Pool managers own their engines: preload checks, self-test, crash and hang handling, the breaker,
retry of a reset before the first token, telemetry, and one pool manager per device mask."""

from __future__ import annotations

from typing import Any

import aiohttp

from llorch import gpu
from llorch.config import FakeGpu
from tests.support.procs import wait_until
from tests.support.stack import Client, SseEvent, Stack, mock_pool

FAST_RESTART = {"initial_backoff_ms": 50, "max_backoff_ms": 200, "breaker_failures": 50}
GIB = 1 << 30


async def _get(http: aiohttp.ClientSession, stack: Stack, path: str) -> Any:
    async with http.get(f"{stack.url}{path}", headers=stack.headers) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def _health(http: aiohttp.ClientSession, stack: Stack, pool_id: str = "mock-a") -> dict[str, Any]:
    return dict(await _get(http, stack, f"/v1/pools/{pool_id}/health"))


async def _metrics(http: aiohttp.ClientSession, stack: Stack) -> list[str]:
    async with http.get(f"{stack.url}/metrics") as r:
        return (await r.text()).splitlines()


def _sample(lines: list[str], name: str, *labels: str) -> float:
    """Sum of the samples of `name` whose label text contains every one of `labels`."""
    total = 0.0
    for line in lines:
        if line.startswith(name + "{") and all(label in line for label in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _control(http: aiohttp.ClientSession, port: int, **knobs: Any) -> None:
    async with http.post(f"http://127.0.0.1:{port}/mock/control", json=knobs) as r:
        assert r.status == 200, await r.text()


async def test_preload_failure_backs_off_with_last_error(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(args=["--preload-fail", "exit"], restart=FAST_RESTART)])
    await stack.start(ready=False)

    async def failing() -> bool:
        try:
            health = await _health(http, stack)
        except (AssertionError, aiohttp.ClientError):
            return False
        return health["restarts"] >= 2 and health["last_error"] is not None

    await wait_until(failing, 60, "the pool to fail preload twice")
    health = await _health(http, stack)
    assert health["ready"] is False and health["state"] in ("Backoff", "Preloading")
    assert health["last_error"]["code"] == "PRELOAD_FAILED"
    assert "exited with code 1" in health["last_error"]["message"]
    assert health["circuit"] == "closed"
    lines = await _metrics(http, stack)
    assert _sample(lines, "preload_outcomes_total", 'outcome="preload_failed"') >= 2
    assert _sample(lines, "engine_restarts_total", 'reason="preload"') >= 2


async def test_crash_loop_opens_the_circuit_without_a_restart_storm(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    restart = {
        "initial_backoff_ms": 50,
        "max_backoff_ms": 100,
        "breaker_failures": 3,
        "breaker_window_s": 300,
    }
    stack = stack_factory(pools=[mock_pool(args=["--preload-fail", "exit"], restart=restart)])
    await stack.start(ready=False)

    async def state_is(state: str, restarts: int) -> bool:
        try:
            health = await _health(http, stack)
        except (AssertionError, aiohttp.ClientError):
            return False
        return bool(health["state"] == state and health["restarts"] == restarts)

    await wait_until(lambda: state_is("Unavailable", 3), 60, "the circuit to open after 3 failures")
    health = await _health(http, stack)
    assert health["circuit"] == "open" and health["live"] is False
    assert health["last_error"]["code"] == "CIRCUIT_OPEN"
    assert "/v1/pools/mock-a/resume" in health["last_error"]["message"]
    lines = await _metrics(http, stack)
    assert _sample(lines, "pool_circuit_open", 'pool_id="mock-a"') == 1
    # Resume closes the circuit; the engine still cannot start, so it opens again after exactly 3
    # more failures: 6 restarts in all, none while the circuit was open.
    async with http.post(f"{stack.url}/v1/pools/mock-a/resume", headers=stack.headers) as r:
        assert r.status == 202
        assert (await r.json())["pool_id"] == "mock-a"
    await wait_until(lambda: state_is("Unavailable", 6), 60, "the circuit to open again after resume")
    lines = await _metrics(http, stack)
    assert _sample(lines, "engine_restarts_total", 'pool_id="mock-a"') == 6


async def test_resume_of_an_unknown_pool_is_404(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    async with http.post(f"{stack.url}/v1/pools/nope/resume", headers=stack.headers) as r:
        assert r.status == 404
        assert (await r.json())["code"] == "NOT_FOUND"


async def test_insufficient_simulated_vram_fails_fast_naming_the_device(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(
        pools=[
            mock_pool(),
            mock_pool(
                "mock-big", devices=[0], vram={"factor": 1.0, "kv_reserve_mib": 4096, "headroom_mib": 512}
            ),
        ],
        extra={"telemetry": {"gpu_provider": "fake", "fake_gpus": [_fake_gpu(0, "Fake 4GB", 4096)]}},
    )
    await stack.start()

    async def refused() -> bool:
        return (await _health(http, stack, "mock-big"))["last_error"] is not None

    await wait_until(refused, 60, "the big pool's preload to be refused")
    health = await _health(http, stack, "mock-big")
    assert health["last_error"]["code"] == "INSUFFICIENT_VRAM"
    message = health["last_error"]["message"]
    assert "GPU 0" in message or "device 0" in message, message
    assert health["ready"] is False
    assert all(r["pid"] is None for r in health["replicas"])  # no engine was started
    lines = await _metrics(http, stack)
    assert _sample(lines, "preload_outcomes_total", 'pool_id="mock-big"', 'outcome="insufficient_vram"') >= 1


def _fake_gpu(index: int, name: str, mib: int) -> dict[str, Any]:
    return {"index": index, "name": name, "total_mib": mib, "free_mib": mib}


async def test_reset_before_the_first_token_is_retried_once_on_another_replica(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool("mock-a", restart=FAST_RESTART), mock_pool("mock-b")])
    await stack.start()
    client = Client(stack, http)

    async def both_ready() -> bool:
        return all([(await _health(http, stack, p))["ready"] for p in ("mock-a", "mock-b")])

    await wait_until(both_ready, 60, "both pools to be Ready")
    port = (await _health(http, stack, "mock-a"))["replicas"][0]["port"]
    await _control(http, port, crash_after_tokens=0)  # the next request kills mock-a's engine
    events = await client.events(await client.admit(max_tokens=4))
    assert events[-1].event == "end", events[-1]
    dispatches = [e.data["replica_id"] for e in events if _is_dispatch(e)]
    assert dispatches == ["mock-a-r0", "mock-b-r0"]
    assert sum(1 for e in events if e.event == "token") == 4


def _is_dispatch(event: SseEvent) -> bool:
    return event.event == "metrics" and event.data.get("phase") == "dispatch"


async def test_a_second_reset_before_any_token_ends_the_task(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool("mock-a", replicas=2, restart=FAST_RESTART)])
    await stack.start()
    client = Client(stack, http)

    async def both_ready() -> bool:
        return [r["state"] for r in (await _health(http, stack))["replicas"]] == ["Ready", "Ready"]

    await wait_until(both_ready, 60, "both replicas to be Ready")
    for replica in (await _health(http, stack))["replicas"]:
        await _control(http, replica["port"], crash_after_tokens=0)
    events = await client.events(await client.admit(max_tokens=4))
    assert events[-1].event == "error" and events[-1].data["code"] == "WORKER_RESET"
    assert [e.data["replica_id"] for e in events if _is_dispatch(e)] == ["mock-a-r0", "mock-a-r1"]
    assert not any(e.event == "token" for e in events)


async def test_an_engine_that_stops_decoding_is_restarted(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(
        pools=[mock_pool(timeouts={"idle_ms": 1000, "wall_ms": 600000}, restart=FAST_RESTART)]
    )
    await stack.start()
    client = Client(stack, http)
    health = await _health(http, stack)
    pid = health["replicas"][0]["pid"]
    await _control(http, health["replicas"][0]["port"], hang_after_tokens=0)  # /health still answers
    events = await client.events(await client.admit(max_tokens=4))
    assert events[-1].data["code"] == "DECODE_TIMEOUT"

    async def restarted() -> bool:
        health = await _health(http, stack)
        return bool(health["ready"] and health["replicas"][0]["pid"] not in (None, pid))

    await wait_until(restarted, 60, "the stuck engine to be restarted")
    health = await _health(http, stack)
    assert health["last_error"]["code"] == "ENGINE_STUCK"
    assert (await client.events(await client.admit(max_tokens=2)))[-1].event == "end"


async def test_gpu_telemetry_reaches_health_metrics_and_capabilities(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(
        pools=[
            mock_pool(
                "mock-gpu", devices=[0], slots=2, args=["--vram-used-bytes", str(2 * GIB), "--gpu-util", "37"]
            )
        ],
        extra={"telemetry": {"gpu_provider": "fake", "fake_gpus": [_fake_gpu(0, "Fake 12GB", 12288)]}},
    )
    await stack.start()

    async def reported() -> bool:
        return (await _health(http, stack, "mock-gpu"))["metrics"]["vram_used_bytes"] == 2 * GIB

    await wait_until(reported, 30, "the replica's VRAM use to be reported")
    metrics = (await _health(http, stack, "mock-gpu"))["metrics"]
    assert metrics["vram_total_bytes"] == 12288 << 20 and metrics["gpu_utilization"] == 37.0
    lines = await _metrics(http, stack)
    assert _sample(lines, "vram_used_bytes", 'replica_id="mock-gpu-r0"', 'device="0"') == 2 * GIB
    assert _sample(lines, "gpu_utilization", 'replica_id="mock-gpu-r0"', 'device="0"') == 37.0
    caps = await _get(http, stack, "/v1/capabilities")
    (engine,) = caps["engines"]  # concurrency is per engine (SPEC D16)
    (device,) = engine["concurrency"]["per_device"]
    assert device["device"] == "0" and device["name"] == "Fake 12GB" and device["slots_total"] == 2
    assert device["vram_total_bytes"] == 12288 << 20
    assert caps["api_version"] == "1.0.0" and caps["engines"][0]["engine"] == "mock"
    assert caps["engines"][0]["rate_limits"] == {"requests_per_s": None, "tokens_per_min": None}


async def test_one_pool_manager_per_device_and_auto_placement(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(
        pools=[
            mock_pool("mock-gpu0", devices=[0]),
            mock_pool("mock-gpu1", devices=[1]),
            mock_pool(
                "mock-auto",
                devices="auto",
                vram={"kv_reserve_mib": 16384, "factor": 1.0, "headroom_mib": 512},
            ),
            mock_pool("mock-cpu"),
        ],
        extra={
            "telemetry": {
                "gpu_provider": "fake",
                "fake_gpus": [_fake_gpu(0, "Fake 24GB", 24576), _fake_gpu(1, "Fake 12GB", 12288)],
            }
        },
    )
    await stack.start(ready=False, per_device=True)
    assert sorted(n for n in stack.procs if n.startswith("pool-manager")) == [
        "pool-manager-cpu",
        "pool-manager-gpu0",
        "pool-manager-gpu1",
    ]

    async def all_ready() -> bool:
        try:
            pools = await _get(http, stack, "/v1/pools")
        except (AssertionError, aiohttp.ClientError):
            return False
        return len(pools) == 4 and all(p["ready"] for p in pools)

    await wait_until(all_ready, 60, "all four pools to be Ready")
    devices = {p["pool_id"]: p["devices"] for p in await _get(http, stack, "/v1/pools")}
    # 16 GiB of KV only fits the 24 GB card: auto chose GPU 0 and shows it in health.
    assert devices == {"mock-auto": ["0"], "mock-cpu": ["cpu"], "mock-gpu0": ["0"], "mock-gpu1": ["1"]}
    caps = await _get(http, stack, "/v1/capabilities")
    (engine,) = caps["engines"]
    per_device = {d["device"]: d["slots_total"] for d in engine["concurrency"]["per_device"]}
    assert per_device == {"0": 2, "1": 1, "cpu": 1}


async def test_auto_pools_spread_over_gpus_of_different_size_and_load_lands_on_both(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    vram = {"kv_reserve_mib": 14 * 1024, "factor": 1.0, "headroom_mib": 512}  # only one fits per GPU
    stack = stack_factory(
        pools=[
            mock_pool("mock-x", devices="auto", vram=vram, args=["--token-delay-ms", "20"]),
            mock_pool("mock-y", devices="auto", vram=vram, args=["--token-delay-ms", "20"]),
        ],
        extra={
            "telemetry": {
                "gpu_provider": "fake",
                "fake_gpus": [_fake_gpu(0, "Fake 24GB", 24576), _fake_gpu(1, "Fake 16GB", 16384)],
            }
        },
    )
    await stack.start(ready=False, per_device=True)

    async def both_ready() -> bool:
        try:
            pools = await _get(http, stack, "/v1/pools")
        except (AssertionError, aiohttp.ClientError):
            return False
        return len(pools) == 2 and all(p["ready"] for p in pools)

    await wait_until(both_ready, 60, "both auto pools to be Ready")
    devices = {p["pool_id"]: p["devices"] for p in await _get(http, stack, "/v1/pools")}
    assert devices == {"mock-x": ["0"], "mock-y": ["1"]}  # the bigger GPU first, in config order
    (rs,) = await _get(http, stack, "/v1/replicasets")
    assert rs["pools"] == ["mock-x", "mock-y"] and rs["devices"] == ["0", "1"] and rs["ready"] is True
    client = Client(stack, http)
    tasks = [await client.admit(max_tokens=100) for _ in range(4)]  # 2 s each: both slots fill
    used = set()
    for task_id in tasks:
        events = await client.events(task_id)
        assert events[-1].event == "end"
        used |= {e.data["replica_id"] for e in events if _is_dispatch(e)}
    assert used == {"mock-x-r0", "mock-y-r0"}


async def test_vram_oom_at_load_is_named_and_raises_the_next_estimate(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    # 3300 MiB of KV fits the fake 4 GiB card (4096 - 512 headroom); 10 % more after a VRAM OOM does not.
    vram = {"factor": 1.0, "kv_reserve_mib": 3300, "headroom_mib": 512}
    stack = stack_factory(
        pools=[
            mock_pool(),
            mock_pool(
                "mock-oom", devices=[0], vram=vram, args=["--preload-fail", "oom"], restart=FAST_RESTART
            ),
        ],
        extra={"telemetry": {"gpu_provider": "fake", "fake_gpus": [_fake_gpu(0, "Fake 4GB", 4096)]}},
    )
    await stack.start()

    async def refused_after_oom() -> bool:
        error = (await _health(http, stack, "mock-oom"))["last_error"]
        return error is not None and error["code"] == "INSUFFICIENT_VRAM"

    await wait_until(refused_after_oom, 60, "the raised estimate to be refused by the preload check")
    lines = await _metrics(http, stack)
    assert _sample(lines, "engine_restarts_total", 'pool_id="mock-oom"', 'reason="vram_oom"') == 1
    assert _sample(lines, "preload_outcomes_total", 'pool_id="mock-oom"', 'outcome="vram_oom"') == 1
    assert _sample(lines, "preload_outcomes_total", 'pool_id="mock-oom"', 'outcome="insufficient_vram"') >= 1
    message = (await _health(http, stack, "mock-oom"))["last_error"]["message"]
    assert "GPU 0" in message and "needs 3631 MiB" in message, message  # (3300 MiB + 4 KiB model) x 1.1


async def test_an_xid_on_the_masked_gpu_restarts_the_replica_as_a_driver_fault(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    gpus = [_fake_gpu(0, "Fake 12GB", 12288)]
    stack = stack_factory(
        pools=[mock_pool("mock-gpu", devices=[0], restart=FAST_RESTART)],
        extra={"telemetry": {"gpu_provider": "fake", "fake_gpus": gpus}},
    )
    await stack.start()
    pid = (await _health(http, stack, "mock-gpu"))["replicas"][0]["pid"]
    fake = gpu.FakeProbe([FakeGpu(**g) for g in gpus], stack.workdir / "state")
    fake.inject_fault(0, "xid", "Xid 79: GPU has fallen off the bus")

    async def restarted() -> bool:
        health = await _health(http, stack, "mock-gpu")
        return bool(health["ready"] and health["replicas"][0]["pid"] not in (None, pid))

    await wait_until(restarted, 60, "the replica to restart after the Xid")
    error = (await _health(http, stack, "mock-gpu"))["last_error"]
    assert error["code"] == "DRIVER_FAULT" and "Xid 79" in error["message"]
    lines = await _metrics(http, stack)
    assert _sample(lines, "driver_resets_total", 'pool_id="mock-gpu"', 'device="0"') == 1
    assert _sample(lines, "engine_restarts_total", 'pool_id="mock-gpu"', 'reason="driver"') == 1
