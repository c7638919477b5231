"""Defect 5 end to end: on a (fake) H200, a pool whose VRAM need exceeds the card's total memory goes to
a terminal Failed state with INSUFFICIENT_VRAM naming the device and MiB, is not retried in Backoff, and
does not push a `devices: auto` pool off the GPU onto the CPU manager."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.support.procs import wait_until
from tests.support.stack import Stack, mock_pool

H200_MIB = 143771


async def _get(http: aiohttp.ClientSession, stack: Stack, path: str) -> Any:
    async with http.get(f"{stack.url}{path}", headers=stack.headers) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_an_impossible_pool_fails_for_good_and_auto_still_lands_on_the_gpu(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(
        pools=[
            mock_pool(
                "mock-impossible",
                devices=[0],
                vram={"factor": 1.0, "kv_reserve_mib": 200_000, "headroom_mib": 512},
                restart={"initial_backoff_ms": 50, "max_backoff_ms": 100, "breaker_failures": 50},
            ),
            mock_pool(
                "mock-auto", devices="auto", vram={"factor": 1.0, "kv_reserve_mib": 1024, "headroom_mib": 512}
            ),
        ],
        extra={
            "telemetry": {
                "gpu_provider": "fake",
                "fake_gpus": [{"index": 0, "name": "Fake H200", "total_mib": H200_MIB, "free_mib": H200_MIB}],
            }
        },
    )
    await stack.start(ready=False, per_device=True)
    assert sorted(n for n in stack.procs if n.startswith("pool-manager")) == ["pool-manager-gpu0"]

    async def settled() -> bool:
        try:
            pools = {p["pool_id"]: p for p in await _get(http, stack, "/v1/pools")}
        except (AssertionError, aiohttp.ClientError):
            return False
        return pools.get("mock-auto", {}).get("ready") is True and (
            pools.get("mock-impossible", {}).get("state") == "Failed"
        )

    await wait_until(settled, 60, "mock-auto Ready on the GPU and mock-impossible Failed")
    auto = await _get(http, stack, "/v1/pools/mock-auto/health")
    assert auto["devices"] == ["0"]  # placed on the GPU, not on a CPU manager
    health = await _get(http, stack, "/v1/pools/mock-impossible/health")
    assert health["state"] == "Failed" and health["ready"] is False
    error = health["last_error"]
    assert error["code"] == "INSUFFICIENT_VRAM", error
    assert "GPU 0 (Fake H200)" in error["message"] and f"{H200_MIB} MiB in total" in error["message"], error
    assert health["restarts"] == 0  # a configuration error is not a restart, and nothing was retried
    assert all(r["pid"] is None for r in health["replicas"])  # no engine was started
