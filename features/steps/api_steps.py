"""Steps for journeys over the public HTTP API against a real stack (processes on free ports)."""

from __future__ import annotations

import math
import uuid
from typing import Any

from behave import given, then, when

from tests.support.bdd import client, run
from tests.support.procs import wait_until
from tests.support.stack import SseEvent, Stack, mock_pool


def start_stack(context: Any, **pool: Any) -> None:
    config = mock_pool(**pool)
    context.pool_id = config["id"]
    context.stack = Stack(context.workdir / "stack", context.redis.url, pools=[config])
    run(context, context.stack.start())


# ------------------------------------------------------------------------------------------------ given


@given("a running stack with a mock pool")
def step_stack(context: Any) -> None:
    start_stack(context)


@given("a running stack with a mock pool that takes {delay_ms:d} ms per token")
def step_stack_slow(context: Any, delay_ms: int) -> None:
    start_stack(context, args=["--token-delay-ms", str(delay_ms)])


@given(
    "a running stack with a mock pool of {slots:d} slot and queue capacity {capacity:d} "
    "that takes {delay_ms:d} ms per token"
)
def step_stack_small(context: Any, slots: int, capacity: int, delay_ms: int) -> None:
    start_stack(context, slots=slots, capacity=capacity, args=["--token-delay-ms", str(delay_ms)])


# ------------------------------------------------------------------------------------------------- when


@when('I submit a task for "{model}" with prompt "{prompt}" and max_tokens {max_tokens:d}')
def step_submit(context: Any, model: str, prompt: str, max_tokens: int) -> None:
    context.reply = run(
        context, client(context).submit(model_ref=model, prompt=prompt, max_tokens=max_tokens)
    )
    status, body, _ = context.reply
    if status == 202:
        context.task_id = body["task_id"]
        context.stream = None
        context.events = []


def open_stream(context: Any) -> Any:
    if context.stream is None:
        context.stream = client(context).follow(context.task_id)
        context.streams.append(context.stream)
    return context.stream


async def _next_until(stream: Any, events: list[SseEvent], name: str) -> None:
    async for event in stream:
        events.append(event)
        if event.event == name:
            return
    raise AssertionError(f"the stream ended without a {name!r} event: {[e.event for e in events]}")


async def _drain(stream: Any, events: list[SseEvent]) -> None:
    async for event in stream:
        events.append(event)


@when("I follow the stream until the first token")
def step_follow_to_token(context: Any) -> None:
    run(context, _next_until(open_stream(context), context.events, "token"))


@when("I read the stream to the end")
def step_read_to_end(context: Any) -> None:
    run(context, _drain(open_stream(context), context.events))
    assert context.events, "the stream sent no events"


@when("I cancel the task")
def step_cancel(context: Any) -> None:
    context.cancel_status = run(context, client(context).cancel(context.task_id))


# ------------------------------------------------------------------------------------------------- then


@then("the answer is 202 with a task_id, a stream_url and an X-Correlation-Id")
def step_admitted(context: Any) -> None:
    status, body, headers = context.reply
    assert status == 202, (status, body)
    assert body["task_id"] and body["stream_url"] == f"/v1/tasks/{body['task_id']}/stream", body
    assert headers.get("X-Correlation-Id"), dict(headers)


@then("the event ids count up from 0 without gaps")
def step_ids(context: Any) -> None:
    assert [e.id for e in context.events] == list(range(len(context.events))), context.events


@then('the first event is "{name}"')
def step_first(context: Any, name: str) -> None:
    assert context.events[0].event == name, context.events[0]
    assert context.events[0].data["task_id"] == context.task_id


def first_token_index(context: Any) -> int:
    names = [e.event for e in context.events]
    assert "token" in names, names
    return names.index("token")


@then('a "metrics" event with phase "{phase}" comes before the first token')
def step_metrics_before(context: Any, phase: str) -> None:
    before = context.events[: first_token_index(context)]
    assert any(e.event == "metrics" and e.data.get("phase") == phase for e in before), before


@then('a "metrics" event with phase "{phase}" follows the first token')
def step_metrics_after(context: Any, phase: str) -> None:
    after = context.events[first_token_index(context) + 1 :]
    assert any(e.event == "metrics" and e.data.get("phase") == phase for e in after), after


@then('{count:d} "token" events arrive, numbered from 0')
def step_tokens(context: Any, count: int) -> None:
    tokens = [e for e in context.events if e.event == "token"]
    assert [t.data["i"] for t in tokens] == list(range(count)), tokens
    assert all(isinstance(t.data["t"], str) for t in tokens)


@then('the last event is "end" with tokens_out {tokens_out:d} and finish_reason "{reason}"')
def step_end(context: Any, tokens_out: int, reason: str) -> None:
    last = context.events[-1]
    assert last.event == "end", last
    assert last.data["tokens_out"] == tokens_out and last.data["finish_reason"] == reason, last.data


@then('the last event is an "error" with code "{code}"')
def step_error(context: Any, code: str) -> None:
    last = context.events[-1]
    assert last.event == "error", last
    assert last.data["code"] == code and last.data["retriable"] is False, last.data
    terminals = [e for e in context.events if e.event in ("end", "error")]
    assert terminals == [last], terminals


@then("the error counts every token that was streamed before it")
def step_error_tokens(context: Any) -> None:
    streamed = sum(1 for e in context.events if e.event == "token")
    assert streamed >= 1
    assert context.events[-1].data["tokens_out"] == streamed, (context.events[-1].data, streamed)


@then('the task\'s status is "{state}"')
def step_status(context: Any, state: str) -> None:
    status = run(context, client(context).status(context.task_id))
    assert status["state"] == state, status


@then("the cancel answer is {status:d}")
def step_cancel_status(context: Any, status: int) -> None:
    assert context.cancel_status == status


@then("canceling the task again answers {status:d}")
def step_cancel_again(context: Any, status: int) -> None:
    assert run(context, client(context).cancel(context.task_id)) == status


@then("the pool frees its slot")
def step_slot_free(context: Any) -> None:
    stack: Stack = context.stack

    async def free() -> bool:
        url = f"{stack.url}/v1/pools/{context.pool_id}/health"
        async with context.http.get(url, headers=stack.headers) as resp:
            metrics = (await resp.json())["metrics"]
        return bool(metrics["tasks_running"] == 0 and metrics["slots_free"] == metrics["slots_total"])

    run(context, wait_until(free, 60, "the pool to free its slot"))


@then("a replay of the stream ends with the same error and has no token after it")
def step_replay_error(context: Any) -> None:
    replay = run(context, client(context).events(context.task_id))
    assert replay == context.events, (replay, context.events)
    assert replay[-1].event == "error"


@then("reading the stream again replays the same events")
def step_replay(context: Any) -> None:
    assert run(context, client(context).events(context.task_id)) == context.events


@then("resuming with Last-Event-ID {seq:d} replays only the events after it")
def step_resume(context: Any, seq: int) -> None:
    resumed = run(context, client(context).events(context.task_id, last_event_id=seq))
    assert resumed == context.events[seq + 1 :], resumed


@then('the answer is {status:d} with code "{code}"')
def step_error_answer(context: Any, status: int, code: str) -> None:
    got, body, headers = context.reply
    assert got == status, (got, body)
    assert headers.get("Content-Type", "").startswith("application/json"), dict(headers)
    assert body["code"] == code and isinstance(body["message"], str) and body["message"], body


@then('the error is retriable with policy_label "{label}" and engine "{engine}"')
def step_error_fields(context: Any, label: str, engine: str) -> None:
    body = context.reply[1]
    assert body["retriable"] is True and body["policy_label"] == label and body["engine"] == engine, body


@then("the Retry-After header is at least 1 second and matches X-Backoff-Ms")
def step_retry_after(context: Any) -> None:
    headers = context.reply[2]
    retry_after = int(headers["Retry-After"])
    backoff_ms = int(headers["X-Backoff-Ms"])
    assert retry_after >= 1
    assert retry_after == max(1, math.ceil(backoff_ms / 1000)), (retry_after, backoff_ms)


@then("X-Backoff-Ms equals the error's retry_after_ms")
def step_backoff(context: Any) -> None:
    _, body, headers = context.reply
    assert int(headers["X-Backoff-Ms"]) == body["retry_after_ms"], (dict(headers), body)


@then("the answer carries an X-Correlation-Id")
def step_cid(context: Any) -> None:
    cid = context.reply[2]["X-Correlation-Id"]
    assert uuid.UUID(cid).version == 4, cid
