"""The JSON shapes the gateway renders from the scheduler's typed replies (SPEC §2.2, §2.3): integers
are numbers, absent values are null, and capabilities carry concurrency per engine (D16)."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.support.procs import wait_until
from tests.support.stack import Client, Stack, mock_pool

SLOW = ["--token-delay-ms", "50"]


async def _get(http: aiohttp.ClientSession, stack: Stack, path: str) -> Any:
    async with http.get(f"{stack.url}{path}", headers=stack.headers) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_typed_replies_render_as_spec_json(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack = stack_factory(pools=[mock_pool(args=SLOW)])
    await stack.start()
    client = Client(stack, http)
    # Long enough that the first task still holds the only slot through every check; canceled at the end.
    busy = await client.admit(max_tokens=1500, session_id="shape-s", budget={"tokens": 5000})
    queued = await client.admit(max_tokens=5)

    async def running() -> bool:
        return (await client.status(busy))["state"] == "running"

    await wait_until(running, 30, "the first task to run")
    status = await client.status(queued)
    assert status["state"] == "queued"
    # Defect 1: protobuf's int64 JSON mapping made this a string; placement fields were "".
    assert isinstance(status["predicted_start_ms"], int) and isinstance(status["queue_position"], int)
    assert status["pool_id"] is None and status["replica_id"] is None and status["error"] is None
    assert status["session_id"] is None
    running_status = await client.status(busy)
    assert running_status["pool_id"] == "mock-a" and running_status["replica_id"] == "mock-a-r0"
    assert "queue_position" not in running_status and running_status["session_id"] == "shape-s"

    caps = await _get(http, stack, "/v1/capabilities")
    # Defect 4: concurrency belongs to each engine entry (SPEC D16), not to the top level.
    assert set(caps) == {"api_version", "engines"}
    (engine,) = caps["engines"]
    assert engine["engine"] == "mock" and engine["rate_limits"] == {
        "requests_per_s": None,
        "tokens_per_min": None,
    }
    concurrency = engine["concurrency"]
    assert concurrency["slots_total"] == 1 and concurrency["slots_free"] == 0
    (device,) = concurrency["per_device"]
    assert device == {
        "device": "cpu",
        "name": None,
        "vram_total_bytes": None,
        "vram_free_bytes": None,
        "slots_total": 1,
        "slots_free": 0,
    }

    session = await _get(http, stack, "/v1/sessions/shape-s")
    assert session["session_id"] == "shape-s" and session["turns"] == 1
    assert isinstance(session["tokens_budget_remaining"], int) and "cost_budget_remaining" not in session
    assert session["replica_id"] == "mock-a-r0" and isinstance(session["created_ms"], int)

    (view,) = await _get(http, stack, "/v1/replicasets")
    assert view["queue_depth"] == {"interactive": 1, "batch": 0} and view["pools"] == ["mock-a"]
    assert set(view["slo"]) == {"first_token_ms_p50", "first_token_ms_p95", "decode_ms_p50", "on_time_ratio"}
    assert await client.cancel(busy) == 204
