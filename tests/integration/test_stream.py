"""SSE through the whole stack: order, framing, replay, Last-Event-ID, many readers."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.support.stack import Client, mock_pool


async def test_submit_and_stream_in_spec_order(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    client = Client(stack, http)
    status, body, headers = await client.submit(prompt="Hello there", max_tokens=6, seed=7)
    assert status == 202
    assert set(body) == {
        "task_id",
        "session_id",
        "queue_position",
        "predicted_start_ms",
        "backoff_ms",
        "on_time_probability",
        "stream_url",
    }
    assert headers["X-Correlation-Id"]
    events = await client.events(body["task_id"])
    names = [e.event for e in events]
    assert [e.id for e in events] == list(range(len(events)))
    assert names[0] == "started" and names[1] == "metrics" and events[1].data["phase"] == "dispatch"
    assert names[-1] == "end"
    tokens = [e for e in events if e.event == "token"]
    assert [t.data["i"] for t in tokens] == list(range(6))
    first_token = names.index("token")
    assert any(e.event == "metrics" and e.data["phase"] == "decode" for e in events[first_token:])
    end = events[-1].data
    assert end["tokens_out"] == 6 and end["finish_reason"] == "length"
    assert end["pool_id"] == "mock-a" and end["replica_id"] == "mock-a-r0"
    assert events[1].data["seed"] == 7


async def test_replay_after_end_and_last_event_id(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    client = Client(stack, http)
    task_id = await client.admit(max_tokens=5)
    live = await client.events(task_id)
    replay = await client.events(task_id)
    assert replay == live
    resumed = await client.events(task_id, last_event_id=3)
    assert resumed == live[4:]
    url = f"{stack.url}/v1/tasks/{task_id}/stream?last_event_id=2"
    async with http.get(url, headers=stack.headers) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Correlation-Id"]
        text = await r.text()
    assert text.startswith("id: 3\nevent: ")


async def test_identical_seeded_requests_stream_identical_text(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(slots=2)])
    await stack.start()
    client = Client(stack, http)
    a = await client.admit(prompt="same words", seed=42, max_tokens=12)
    b = await client.admit(prompt="same words", seed=42, max_tokens=12)
    c = await client.admit(prompt="same words", seed=43, max_tokens=12)
    texts = []
    for task_id in (a, b, c):
        texts.append([e.data["t"] for e in await client.events(task_id) if e.event == "token"])
    assert texts[0] == texts[1]
    assert texts[0] != texts[2]


async def test_status_reflects_the_run(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    client = Client(stack, http)
    task_id = await client.admit(max_tokens=3, task_id="status-1")
    assert task_id == "status-1"
    await client.events(task_id)
    status = await client.status(task_id)
    assert status["state"] == "succeeded"
    assert status["tokens_out"] == 3
    assert status["pool_id"] == "mock-a"
    assert status["error"] is None


async def test_decode_metrics_report_the_queue_behind(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(slots=1, args=["--token-delay-ms", "50"])])
    await stack.start()
    client = Client(stack, http)
    running = await client.admit(max_tokens=200)
    waiting = [await client.admit(max_tokens=1) for _ in range(2)]
    depths = []
    async for event in client.follow(running):
        if event.event == "metrics" and event.data["phase"] == "decode":
            depths.append(event.data["queue_depth"])
            assert 0.0 <= event.data["on_time_probability"] <= 1.0
            if event.data["queue_depth"] == 2:
                break
    assert depths[-1] == 2, depths
    for task_id in [running, *waiting]:
        assert await client.cancel(task_id) == 204
