"""Reload of a pool onto another catalog model (SPEC §5.6) through the whole stack on the mock engine:
an atomic swap that running tasks survive, and a failed reload that rolls back with no task failing."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.procs import wait_until
from tests.support.stack import MOCK_MODEL, Client, Stack, mock_pool

SLOW = ["--token-delay-ms", "20"]


async def _reload(
    http: aiohttp.ClientSession, stack: Stack, pool_id: str, body: Any, wait: str = "true"
) -> tuple[int, Any]:
    url = f"{stack.url}/v1/pools/{pool_id}/reload?wait={wait}"
    async with http.post(url, json=body, headers=stack.headers) as r:
        return r.status, await r.json()


async def _health(http: aiohttp.ClientSession, stack: Stack) -> Any:
    async with http.get(f"{stack.url}/v1/pools/mock-a/health", headers=stack.headers) as r:
        return await r.json()


async def test_reload_swaps_atomically_and_a_failed_one_rolls_back(
    stack_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    v2 = tmp_path / "mock-v2.bin"
    v2.write_bytes(MOCK_MODEL.read_bytes() + b"v2")
    broken = tmp_path / "broken-model"  # a directory: the engine cannot load it
    broken.mkdir()
    (broken / "weights").write_bytes(b"not a model")
    stack: Stack = stack_factory(
        pools=[mock_pool("mock-a", args=SLOW)],
        models=[
            {"id": "mock-tiny", "path": str(MOCK_MODEL)},
            {"id": "mock-v2", "path": str(v2)},
            {"id": "broken", "path": str(broken)},
        ],
    )
    await stack.start()
    client = Client(stack, http)
    before = await _health(http, stack)

    running = await client.admit(max_tokens=60)  # on the old engine when the swap happens
    status, done = await _reload(http, stack, "mock-a", {"new_model_ref": "mock-v2"})
    assert status == 200, done
    digest = "sha256:" + hashlib.sha256(v2.read_bytes()).hexdigest()
    assert done == {
        "pool_id": "mock-a",
        "state": "Ready",
        "model_ref": "mock-v2",
        "model_digest": digest,
        "engine_version": done["engine_version"],
    }
    assert (await client.events(running))[-1].event == "end"  # it finished on the old engine
    served = await client.admit(model_ref="mock-v2", max_tokens=3)
    assert (await client.events(served))[-1].event == "end"
    assert (await client.status(served))["replica_id"] == "mock-a-r0-g1"
    after = await _health(http, stack)
    assert after["model_ref"] == "mock-v2" and after["model_digest"] == digest
    assert after["model_digest"] != before["model_digest"] and after["state"] == "Ready"
    assert [r["replica_id"] for r in after["replicas"]] == ["mock-a-r0-g1"]

    # A reload whose new engine cannot start: rolled back, the old model serves on, nothing fails.
    during = [asyncio.create_task(client.admit(model_ref="mock-v2", max_tokens=20)) for _ in range(3)]
    status, failed = await _reload(http, stack, "mock-a", {"new_model_ref": "broken"})
    assert status == 409 and failed["code"] == "RELOAD_FAILED" and failed["rolled_back"] is True, failed
    assert failed["last_error"]["code"] == "PRELOAD_FAILED", failed  # the new engine could not load it
    for task_id in await asyncio.gather(*during):
        assert (await client.events(task_id))[-1].event == "end"
    health = await _health(http, stack)
    assert health["model_ref"] == "mock-v2" and health["state"] == "Ready"
    assert health["last_error"]["code"] == "RELOAD_FAILED"
    again = await client.admit(model_ref="mock-v2", max_tokens=2)
    assert (await client.events(again))[-1].event == "end"


async def test_reload_without_wait_and_bad_input(
    stack_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    v2 = tmp_path / "mock-v2.bin"
    v2.write_bytes(MOCK_MODEL.read_bytes() + b"v2")
    stack: Stack = stack_factory(
        pools=[mock_pool("mock-a")],
        models=[{"id": "mock-tiny", "path": str(MOCK_MODEL)}, {"id": "mock-v2", "path": str(v2)}],
    )
    await stack.start()
    for body, wait, want in (
        ({}, "true", 400),
        ({"new_model_ref": "no-such-model"}, "true", 400),
        ({"new_model_ref": "../x"}, "true", 400),
        ({"new_model_ref": "mock-v2", "extra": 1}, "true", 400),
        ({"new_model_ref": "mock-v2"}, "maybe", 400),
    ):
        status, error = await _reload(http, stack, "mock-a", body, wait)
        assert status == want and error["code"] == "INVALID_PARAMS", (body, error)
    status, error = await _reload(http, stack, "nope", {"new_model_ref": "mock-v2"})
    assert status == 404 and error["code"] == "NOT_FOUND"
    status, accepted = await _reload(http, stack, "mock-a", {"new_model_ref": "mock-v2"}, "false")
    assert status == 202 and accepted["state"] == "reloading" and accepted["reload_id"]

    async def swapped() -> bool:
        return (await _health(http, stack))["model_ref"] == "mock-v2"

    await wait_until(swapped, 60, "the background reload to swap")
