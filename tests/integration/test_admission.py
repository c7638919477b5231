"""Admission and queue (SPEC §2.2, §3, §5.1, §5.2) on the real stack with the mock engine.

One slot kept busy by a long first task (50 ms per token) holds every later task in the queue, so the
tests can look at queue order through task states and stream events instead of timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import wait_until
from tests.support.stack import Client, SseEvent, Stack, mock_pool

SLOW = ["--token-delay-ms", "50"]
WAIT_S = 60


def _drop_lru(capacity: int) -> dict[str, Any]:
    return {"capacity": capacity, "full_policy": "drop-lru"}


def _is_dispatch(event: SseEvent) -> bool:
    return event.event == "metrics" and event.data.get("phase") == "dispatch"


async def _read_until(client: Client, task_id: str, stop: Callable[[SseEvent], bool]) -> list[SseEvent]:
    """Events of ``task_id`` up to and including the first one ``stop`` accepts."""
    seen: list[SseEvent] = []
    async with contextlib.aclosing(client.follow(task_id)) as stream:
        async for event in stream:
            seen.append(event)
            if stop(event):
                return seen
    raise AssertionError(f"the stream of {task_id} ended first: {[e.event for e in seen]}")


async def _busy(client: Client) -> str:
    """Admit a long task and wait for its first token: the single slot is taken from then on."""
    task_id = await client.admit(max_tokens=1000, prompt="keep the slot busy")
    await _read_until(client, task_id, lambda e: e.event == "token")
    return task_id


async def _state(client: Client, task_id: str) -> str:
    return str((await client.status(task_id))["state"])


async def _unknown(http: aiohttp.ClientSession, stack: Stack, task_id: str) -> bool:
    async with http.get(f"{stack.url}/v1/tasks/{task_id}", headers=stack.headers) as r:
        return r.status == 404


def _assert_backpressure(reply: tuple[int, dict[str, Any], Any], code: str, label: str) -> None:
    """The 429 contract of SPEC §2.2: body, Retry-After and X-Backoff-Ms."""
    status, body, headers = reply
    assert status == 429, (status, body)
    assert headers["Content-Type"].startswith("application/json")
    assert body["code"] == code and body["policy_label"] == label, body
    assert body["retriable"] is True and body["engine"] == "mock", body
    assert isinstance(body["message"], str) and body["message"], body
    backoff_ms = body["retry_after_ms"]
    assert isinstance(backoff_ms, int) and 250 <= backoff_ms <= 60_000, body
    assert int(headers["X-Backoff-Ms"]) == backoff_ms, dict(headers)
    retry_after = int(headers["Retry-After"])
    assert retry_after >= 1 and retry_after == max(1, math.ceil(backoff_ms / 1000)), dict(headers)
    assert headers["X-Correlation-Id"]


def _assert_queued_error(events: list[SseEvent], code: str) -> dict[str, Any]:
    """A task that ended while queued: `started`, queued `metrics` only, then one `error`."""
    assert events[0].event == "started" and events[-1].event == "error", [e.event for e in events]
    middle = events[1:-1]
    assert all(e.event == "metrics" and e.data["phase"] == "queued" for e in middle), middle
    error = events[-1].data
    assert error["code"] == code and error["tokens_out"] == 0, error
    return error


async def _samples(http: aiohttp.ClientSession, stack: Stack, name: str) -> dict[frozenset[Any], float]:
    """Every sample called ``name`` on the /metrics union, keyed by its label set."""
    async with http.get(f"{stack.url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {
        frozenset(s.labels.items()): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    }


async def _metric_is(
    http: aiohttp.ClientSession, stack: Stack, name: str, labels: dict[str, str], want: float
) -> None:
    """Wait until the sum of ``name`` over samples carrying ``labels`` equals ``want``."""
    seen: dict[frozenset[Any], float] = {}

    async def equal() -> bool:
        seen.clear()
        seen.update(await _samples(http, stack, name))
        got = sum(v for k, v in seen.items() if set(labels.items()) <= k)
        return got == want

    try:
        await wait_until(equal, WAIT_S, f"{name}{labels} == {want}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; samples: {seen}") from None


# ------------------------------------------------------------------------------------- 429 contract


async def test_full_queue_under_reject_answers_429_admission_reject(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(capacity=2, args=SLOW)])
    await stack.start()
    client = Client(stack, http)
    running = await _busy(client)
    queued = [await client.admit(max_tokens=5) for _ in range(2)]
    _assert_backpressure(await client.submit(max_tokens=5, task_id="rej-1"), "ADMISSION_REJECT", "reject")
    _assert_backpressure(await client.submit(max_tokens=5, priority="batch"), "ADMISSION_REJECT", "reject")
    assert await _unknown(http, stack, "rej-1"), "a refused task must leave no record"
    assert [await _state(client, t) for t in queued] == ["queued", "queued"]

    await _metric_is(http, stack, "admission_backpressure_events_total", {"policy": "reject"}, 2)
    await _metric_is(http, stack, "tasks_rejected_total", {"reason": "ADMISSION_REJECT"}, 2)
    await _metric_is(http, stack, "queue_depth", {"priority": "interactive"}, 2)
    await _metric_is(http, stack, "queue_depth", {"priority": "batch"}, 0)

    for task_id in [running, *queued]:
        assert await client.cancel(task_id) == 204
    retried = await client.submit(max_tokens=1, task_id="rej-1")
    assert retried[0] == 202, retried  # the refused id is free to use again


# ------------------------------------------------------------------------------------------ drop-lru


async def test_drop_lru_evicts_the_oldest_batch_task_and_never_an_interactive_one(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(args=SLOW, queue=_drop_lru(3))])
    await stack.start()
    client = Client(stack, http)
    running = await _busy(client)
    b1 = await client.admit(max_tokens=3, priority="batch", task_id="b1")
    i1 = await client.admit(max_tokens=3, priority="interactive", task_id="i1")
    b2 = await client.admit(max_tokens=3, priority="batch", task_id="b2")
    await _metric_is(http, stack, "queue_depth", {"priority": "batch"}, 2)

    # Full (3 of 3): a new interactive task displaces the oldest batch task, b1.
    i2 = await client.admit(max_tokens=3, priority="interactive", task_id="i2")
    error = _assert_queued_error(await client.events(b1), "QUEUE_FULL_DROP_LRU")
    assert error["retriable"] is True and error["policy_label"] == "drop-lru", error
    status = await client.status(b1)
    assert status["state"] == "failed" and status["error"]["code"] == "QUEUE_FULL_DROP_LRU", status
    assert await _state(client, b2) == "queued"

    # A new batch task displaces the now oldest batch task, b2; then an interactive one displaces b3.
    b3 = await client.admit(max_tokens=3, priority="batch", task_id="b3")
    _assert_queued_error(await client.events(b2), "QUEUE_FULL_DROP_LRU")
    i3 = await client.admit(max_tokens=3, priority="interactive", task_id="i3")
    _assert_queued_error(await client.events(b3), "QUEUE_FULL_DROP_LRU")

    # Only interactive tasks are queued: nothing can be displaced, whatever the new task's class.
    for priority in ("batch", "interactive"):
        _assert_backpressure(
            await client.submit(max_tokens=3, priority=priority), "QUEUE_FULL_DROP_LRU", "drop-lru"
        )
    interactive = [i1, i2, i3]
    assert [await _state(client, t) for t in interactive] == ["queued"] * 3

    await _metric_is(http, stack, "admission_backpressure_events_total", {"policy": "drop-lru"}, 5)
    await _metric_is(http, stack, "tasks_rejected_total", {"reason": "QUEUE_FULL_DROP_LRU"}, 5)
    await _metric_is(http, stack, "queue_depth", {"priority": "batch"}, 0)
    await _metric_is(http, stack, "queue_depth", {"priority": "interactive"}, 3)

    assert await client.cancel(running) == 204
    for task_id in interactive:
        assert (await client.events(task_id))[-1].event == "end", task_id


async def test_drop_lru_a_batch_task_displaces_the_oldest_in_an_all_batch_queue(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(args=SLOW, queue=_drop_lru(2))])
    await stack.start()
    client = Client(stack, http)
    await _busy(client)
    oldest = await client.admit(max_tokens=3, priority="batch")
    newer = await client.admit(max_tokens=3, priority="batch")
    reply = await client.submit(max_tokens=3, priority="batch")
    assert reply[0] == 202, reply
    _assert_queued_error(await client.events(oldest), "QUEUE_FULL_DROP_LRU")
    assert await _state(client, newer) == "queued"


async def test_concurrent_evictions_end_every_displaced_task(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(args=SLOW, queue=_drop_lru(2))])
    await stack.start()
    client = Client(stack, http)
    await _busy(client)
    await client.admit(max_tokens=3, priority="interactive")  # so each batch task displaces the last
    admitted: list[str] = []
    for _ in range(10):
        burst = await asyncio.gather(*(client.submit(max_tokens=3, priority="batch") for _ in range(12)))
        assert [r[0] for r in burst] == [202] * 12, burst
        admitted += [r[1]["task_id"] for r in burst]
    still_queued: list[str] = []
    orphans: list[dict[str, Any]] = []
    for task_id in admitted:
        status = await client.status(task_id)
        if status["state"] != "queued":
            _assert_queued_error(await client.events(task_id), "QUEUE_FULL_DROP_LRU")
        elif "queue_position" in status:
            still_queued.append(task_id)
        else:
            orphans.append(status)  # `queued` but in no queue: it can never end
    assert not orphans, f"{len(orphans)} of {len(admitted)} displaced tasks never ended: {orphans[:2]}"
    assert len(still_queued) == 1, still_queued


@pytest.mark.parametrize(
    ("queue", "code", "label"),
    [
        ({"capacity": 4, "full_policy": "reject"}, "ADMISSION_REJECT", "reject"),
        (_drop_lru(4), "QUEUE_FULL_DROP_LRU", "drop-lru"),
    ],
)
async def test_class_cap_refuses_the_class_while_the_queue_has_room(
    stack_factory: Any, http: aiohttp.ClientSession, queue: dict[str, Any], code: str, label: str
) -> None:
    pool = mock_pool(args=SLOW, queue=queue, admission={"batch": {"queue_capacity": 1}})
    stack = stack_factory(pools=[pool])
    await stack.start()
    client = Client(stack, http)
    await _busy(client)
    first = await client.admit(max_tokens=3, priority="batch")
    _assert_backpressure(await client.submit(max_tokens=3, priority="batch"), code, label)
    assert await _state(client, first) == "queued"  # a class cap never evicts
    interactive = await client.submit(max_tokens=3, priority="interactive")
    assert interactive[0] == 202, interactive
    assert await _state(client, first) == "queued"


# ---------------------------------------------------------------------------------------- dispatch order


async def test_interactive_overtakes_a_queued_batch_task(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(args=SLOW)])
    await stack.start()
    client = Client(stack, http)
    running = await _busy(client)
    status, batch_reply, _ = await client.submit(max_tokens=5, priority="batch")
    assert status == 202 and batch_reply["queue_position"] == 0, batch_reply
    batch = batch_reply["task_id"]
    status, inter_reply, _ = await client.submit(max_tokens=200, priority="interactive")
    assert status == 202 and inter_reply["queue_position"] == 0, inter_reply
    interactive = inter_reply["task_id"]
    batch_status = await client.status(batch)
    assert batch_status["state"] == "queued" and batch_status["queue_position"] == 1, batch_status

    assert await client.cancel(running) == 204
    await _read_until(client, interactive, _is_dispatch)
    assert await _state(client, batch) == "queued"
    assert not any(_is_dispatch(e) for e in await _read_until(client, batch, lambda e: True))
    assert await client.cancel(interactive) == 204
    assert (await client.events(batch))[-1].event == "end"  # and the batch task is not starved


async def test_an_aged_batch_task_goes_before_a_newer_interactive_one(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(args=SLOW)], extra={"queue": {"max_batch_wait_ms": 1000}})
    await stack.start()
    client = Client(stack, http)
    running = await _busy(client)
    batch = await client.admit(max_tokens=200, priority="batch")
    aged_at = time.monotonic() + 1.5

    async def aged() -> bool:  # elapsed time is this scenario's input, not a synchronisation
        return time.monotonic() >= aged_at

    await wait_until(aged, WAIT_S, "the batch task to wait past max_batch_wait_ms")
    interactive = await client.admit(max_tokens=5, priority="interactive")
    assert await _state(client, batch) == "queued"

    assert await client.cancel(running) == 204
    await _read_until(client, batch, _is_dispatch)
    assert await _state(client, interactive) == "queued"
    assert await client.cancel(batch) == 204
    assert (await client.events(interactive))[-1].event == "end"


# -------------------------------------------------------------------------------------------- deadlines


async def test_deadline_unmet_at_admission(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack = stack_factory(pools=[mock_pool(args=SLOW)])
    await stack.start()
    client = Client(stack, http)
    status, body, _ = await client.submit(max_tokens=5, deadline_ms=0)
    assert status == 400 and body["code"] == "DEADLINE_UNMET" and body["retriable"] is False, body

    await _busy(client)
    for _ in range(5):
        await client.admit(max_tokens=100)
    status, body, _ = await client.submit(max_tokens=10, deadline_ms=100, task_id="too-late")
    assert status == 400, (status, body)
    assert body["code"] == "DEADLINE_UNMET" and body["retriable"] is False, body
    assert isinstance(body["predicted_start_ms"], int) and body["predicted_start_ms"] > 100, body
    assert await _unknown(http, stack, "too-late"), "a refused task must leave no record"


async def test_a_queued_task_past_its_deadline_ends_with_deadline_unmet_and_never_runs(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    # A 1 ms/token prior makes the long task look nearly done, so a 2 s deadline passes admission;
    # the task really runs for 50 s, so the queued task's deadline passes while it waits.
    stack = stack_factory(pools=[mock_pool(args=SLOW)], extra={"scheduler": {"prior_ms_per_token": 1}})
    await stack.start()
    client = Client(stack, http)
    running = await _busy(client)
    late = await client.admit(max_tokens=5, deadline_ms=2000)
    events = await client.events(late)
    error = _assert_queued_error(events, "DEADLINE_UNMET")
    assert error["retriable"] is False, error
    status = await client.status(late)
    assert status["state"] == "failed" and status["error"]["code"] == "DEADLINE_UNMET", status

    assert await client.cancel(running) == 204
    follow_up = await client.admit(max_tokens=2)
    assert (await client.events(follow_up))[-1].event == "end"
    assert await client.events(late) == events  # never dispatched afterwards


# --------------------------------------------------------------------------------------------- estimates


async def test_queued_metrics_frames_follow_the_position(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(args=SLOW)])
    await stack.start()
    client = Client(stack, http)
    running = await _busy(client)
    replies = [await client.submit(max_tokens=5) for _ in range(3)]
    assert [r[0] for r in replies] == [202] * 3, replies
    assert [r[1]["queue_position"] for r in replies] == [0, 1, 2]
    first, second, last = (r[1]["task_id"] for r in replies)

    # Cancel the tasks ahead one by one; each queued frame of the last task triggers the next cancel.
    assert await client.cancel(first) == 204
    on_frame = {1: second, 0: running}
    events: list[SseEvent] = []
    async for event in client.follow(last):
        events.append(event)
        if event.event == "metrics" and event.data["phase"] == "queued":
            target = on_frame.pop(event.data["queue_position"], None)
            if target is not None:
                assert await client.cancel(target) == 204

    names = [e.event for e in events]
    assert names[0] == "started" and names[-1] == "end", names
    started, admitted = events[0].data, replies[2][1]
    assert started["task_id"] == last and started["priority"] == "interactive", started
    for key in ("queue_position", "predicted_start_ms", "on_time_probability"):
        assert started[key] == admitted[key], (key, started, admitted)
    dispatch = next(i for i, e in enumerate(events) if _is_dispatch(e))
    queued = [e.data for e in events if e.event == "metrics" and e.data["phase"] == "queued"]
    assert all(e.event == "metrics" and e.data["phase"] == "queued" for e in events[1:dispatch]), names
    assert [f["queue_position"] for f in queued] == [1, 0], queued
    for frame in queued:
        assert frame["queue_depth"] == frame["queue_position"] + 1, frame
        assert isinstance(frame["predicted_start_ms"], int) and frame["predicted_start_ms"] >= 0, frame
        assert 0.0 <= frame["on_time_probability"] <= 1.0, frame


async def test_admission_response_estimates_and_backoff_past_the_soft_watermark(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool(capacity=10, args=SLOW)])
    await stack.start()
    client = Client(stack, http)
    status, first, _ = await client.submit(max_tokens=1000)
    assert status == 202, first
    assert first["queue_position"] == 0 and first["predicted_start_ms"] == 0, first
    assert first["backoff_ms"] == 0, first
    await _read_until(client, first["task_id"], lambda e: e.event == "token")

    replies = []
    for _ in range(10):
        status, body, _ = await client.submit(max_tokens=20)
        assert status == 202, body
        replies.append(body)
    assert [r["queue_position"] for r in replies] == list(range(10)), replies
    for reply in replies:
        assert reply["predicted_start_ms"] > 0, reply  # the slot is busy
        assert 0.0 <= reply["on_time_probability"] <= 1.0, reply
        assert reply["stream_url"] == f"/v1/tasks/{reply['task_id']}/stream"
    # Depth 1..7 of 10 is under the 0.8 watermark either way it is counted; 9 and 10 are over it.
    assert [r["backoff_ms"] for r in replies[:7]] == [0] * 7, replies
    assert all(250 <= r["backoff_ms"] <= 60_000 for r in replies[8:]), replies
    _assert_backpressure(await client.submit(max_tokens=20), "ADMISSION_REJECT", "reject")


# ----------------------------------------------------------------------------------------- rate limits


async def test_per_class_rate_limit_refuses_a_batch_burst_only(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    pool = mock_pool(capacity=32, admission={"batch": {"rate_limit_rps": 1}})
    stack = stack_factory(pools=[pool])
    await stack.start()
    client = Client(stack, http)
    ids = [f"burst-{n}" for n in range(6)]
    burst = await asyncio.gather(
        *(client.submit(max_tokens=1, priority="batch", task_id=task_id) for task_id in ids)
    )
    accepted = [r for r in burst if r[0] == 202]
    refused = [r for r in burst if r[0] != 202]
    assert len(accepted) >= 2 and refused, [r[0] for r in burst]  # the burst is max(1, 2 * rps)
    for reply in refused:
        _assert_backpressure(reply, "ADMISSION_REJECT", "rate-limit")
    await _metric_is(
        http, stack, "admission_backpressure_events_total", {"policy": "rate-limit"}, len(refused)
    )

    interactive = await asyncio.gather(
        *(client.submit(max_tokens=1, priority="interactive") for _ in range(6))
    )
    assert [r[0] for r in interactive] == [202] * 6, interactive

    task_id = next(t for t, r in zip(ids, burst, strict=True) if r[0] == 429)
    answers: list[int] = []

    async def admitted() -> bool:
        status, _, _ = await client.submit(max_tokens=1, priority="batch", task_id=task_id)
        answers.append(status)
        return status != 429

    await wait_until(admitted, WAIT_S, "the refused task_id to pass the rate limit once it refills")
    assert answers[-1] == 202, answers
