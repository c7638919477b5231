"""``GET /v1/gpus`` and the residency fields of ``/v1/models`` and ``/v1/replicasets`` (issue 13) on a real
stack: a fake 24 GB GPU with one on-demand mock pool on it (unloaded: nothing asked for it yet) beside an
always-loaded CPU pool; ``llorch gpus --ledger`` prints the same ledger; bad input gets the API's error
envelope."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.integration.test_cli_ops import llorch
from tests.support.procs import wait_until
from tests.support.stack import MOCK_MODEL, Stack, mock_pool

MIB = 1 << 20
FAKE_GPU = {"index": 0, "name": "Fake 24GB", "total_mib": 24576, "free_mib": 24576}
ENVELOPE = {"code", "message", "retriable"}


def _stack(stack_factory: Any) -> Stack:
    cold = mock_pool("mock-cold", model="mock-cold", ctx=1024, devices=[0], residency="on-demand")
    stack: Stack = stack_factory(
        pools=[mock_pool("mock-a"), cold],
        models=[{"id": model, "path": str(MOCK_MODEL)} for model in ("mock-tiny", "mock-cold")],
        extra={
            "telemetry": {"gpu_provider": "fake", "fake_gpus": [FAKE_GPU]},
            "residency": {"max_swap_wait_ms": 12_345, "min_residency_s": 7},
        },
    )
    return stack


async def _get(http: aiohttp.ClientSession, stack: Stack, path: str) -> Any:
    async with http.get(f"{stack.url}{path}", headers=stack.headers) as r:
        assert r.status == 200, (path, r.status, await r.text())
        return await r.json()


def _resident(ledger: dict[str, Any], device: str, pool_id: str) -> dict[str, Any] | None:
    for entry in ledger["devices"]:
        if entry["device"] == device:
            return next((r for r in entry["residents"] if r["pool_id"] == pool_id), None)
    return None


async def test_the_ledger_lists_an_unloaded_on_demand_pool_and_the_model_list_says_so(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = _stack(stack_factory)
    await stack.start()
    await stack.wait_pools_ready("mock-a")  # the on-demand pool stays unloaded: nothing asked for it
    ledger: dict[str, Any] = {}

    async def listed() -> bool:
        nonlocal ledger
        ledger = await _get(http, stack, "/v1/gpus")
        return _resident(ledger, "0", "mock-cold") is not None

    await wait_until(listed, 30, "the ledger to list mock-cold on device 0")
    assert set(ledger) == {"devices", "max_swap_wait_ms", "min_residency_ms"}
    assert (ledger["max_swap_wait_ms"], ledger["min_residency_ms"]) == (12_345, 7_000)
    [gpu] = [d for d in ledger["devices"] if d["device"] == "0"]
    assert (gpu["name"], gpu["total_bytes"]) == ("Fake 24GB", 24576 * MIB)
    assert gpu["used_bytes"] == gpu["reserved_bytes"] == 0  # nothing is loaded on it
    assert gpu["free_bytes"] == gpu["total_bytes"]
    assert [r["pool_id"] for r in gpu["residents"]] == ["mock-cold"]  # mock-a runs on the CPU
    cold = gpu["residents"][0]
    assert cold == {
        "pool_id": "mock-cold",
        "model": "mock-cold",
        "state": "unloaded",
        "idle_since_ms": None,
        "pinned": False,
        "residency": "on-demand",
        "used_bytes": 0,
        "need_bytes": cold["need_bytes"],
        "running": 0,
        "loaded_at_ms": None,
    }
    assert isinstance(cold["need_bytes"], int) and cold["need_bytes"] > 0  # the preload estimate

    models = {m["id"]: m for m in (await _get(http, stack, "/v1/models"))["data"]}
    assert (models["mock-cold"]["status"], models["mock-cold"]["residency"]) == ("unloaded", "on-demand")
    assert (models["mock-tiny"]["status"], models["mock-tiny"]["residency"]) == ("ready", "always")
    sets = {s["model_id"]: s for s in await _get(http, stack, "/v1/replicasets")}
    assert (sets["mock-cold"]["residency"], sets["mock-cold"]["status"]) == ("on-demand", "unloaded")
    assert (sets["mock-tiny"]["residency"], sets["mock-tiny"]["status"]) == ("always", "loaded")

    # The CLI prints the same ledger: as JSON, and as a table per device.
    run = await llorch(stack, "gpus", "--ledger", "--json")
    assert run.code == 0, run.err
    printed = json.loads(run.out)
    assert _resident(printed, "0", "mock-cold") == cold
    run = await llorch(stack, "gpus", "--ledger")
    assert run.code == 0, run.err
    assert "Device 0 · Fake 24GB" in run.out
    [row] = [line.split() for line in run.out.splitlines() if line.startswith("mock-cold")]
    assert row[:5] == ["mock-cold", "mock-cold", "unloaded", "on-demand", "no"]
    assert stack.token not in run.out + run.err


async def test_bad_requests_to_the_ledger_get_the_error_envelope(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = _stack(stack_factory)
    await stack.start()
    url = f"{stack.url}/v1/gpus"
    async with http.get(f"{url}?device=0", headers=stack.headers) as r:
        body = await r.json()
        assert r.status == 400, body
        assert set(body) >= ENVELOPE and body["code"] == "INVALID_PARAMS" and body["field"] == "device"
        assert r.headers["X-Correlation-Id"]
    async with http.post(url, headers=stack.headers, json={}) as r:
        body = await r.json()
        assert r.status == 405, body
        assert set(body) >= ENVELOPE and body["code"] == "METHOD_NOT_ALLOWED"
        assert "GET" in r.headers["Allow"]
    async with http.get(url) as r:  # no token
        body = await r.json()
        assert (r.status, body["code"]) == (401, "UNAUTHENTICATED")
