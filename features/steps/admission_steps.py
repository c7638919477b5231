"""Steps for admission journeys: named tasks in a queue behind one busy slot, drop-lru, priorities,
deadlines. Queue order is read from task states and stream events, never from timing."""

from __future__ import annotations

import contextlib
from typing import Any

from behave import given, then, when

from tests.support.bdd import client, run
from tests.support.stack import Client, SseEvent, Stack, mock_pool


def named(context: Any) -> dict[str, str]:
    """Task ids by the names the scenario gave them."""
    if not hasattr(context, "named_tasks"):
        context.named_tasks = {}
    tasks: dict[str, str] = context.named_tasks
    return tasks


async def read_until(client: Client, task_id: str, name: str, phase: str | None = None) -> list[SseEvent]:
    """Events of ``task_id`` up to the first ``name`` event (with ``phase``, if given)."""
    seen: list[SseEvent] = []
    async with contextlib.aclosing(client.follow(task_id)) as stream:
        async for event in stream:
            seen.append(event)
            if event.event == name and (phase is None or event.data.get("phase") == phase):
                return seen
    raise AssertionError(f"the stream ended without a {name!r} event: {[e.event for e in seen]}")


# ------------------------------------------------------------------------------------------------ given


@given(
    'a running stack with a mock pool of {slots:d} slot and queue capacity {capacity:d} under "{policy}" '
    "that takes {delay_ms:d} ms per token"
)
def step_stack_policy(context: Any, slots: int, capacity: int, policy: str, delay_ms: int) -> None:
    config = mock_pool(
        slots=slots,
        args=["--token-delay-ms", str(delay_ms)],
        queue={"capacity": capacity, "full_policy": policy},
    )
    context.pool_id = config["id"]
    context.stack = Stack(context.workdir / "stack", context.redis.url, pools=[config])
    run(context, context.stack.start())


# ------------------------------------------------------------------------------------------------- when


@when("a long task keeps the slot busy")
def step_busy(context: Any) -> None:
    async def busy() -> str:
        task_id = await client(context).admit(max_tokens=1000, prompt="keep the slot busy")
        await read_until(client(context), task_id, "token")
        return task_id

    context.long_task = run(context, busy())


@when('I queue a "{priority}" task named "{name}"')
@when('I queue an "{priority}" task named "{name}"')
def step_queue_named(context: Any, priority: str, name: str) -> None:
    status, body, _ = run(context, client(context).submit(priority=priority, max_tokens=5, prompt=name))
    assert status == 202, (status, body)
    named(context)[name] = body["task_id"]


@when('I queue {count:d} "{priority}" tasks with max_tokens {max_tokens:d}')
def step_queue_many(context: Any, count: int, priority: str, max_tokens: int) -> None:
    for _ in range(count):
        status, body, _ = run(context, client(context).submit(priority=priority, max_tokens=max_tokens))
        assert status == 202, (status, body)


@when('I submit a "{priority}" task named "{name}"')
@when('I submit an "{priority}" task named "{name}"')
def step_submit_named(context: Any, priority: str, name: str) -> None:
    context.reply = run(context, client(context).submit(priority=priority, max_tokens=5, prompt=name))
    status, body, _ = context.reply
    if status == 202:
        named(context)[name] = body["task_id"]


@when(
    'I submit a task for "{model}" with prompt "{prompt}" and max_tokens {max_tokens:d} '
    "and deadline_ms {deadline_ms:d}"
)
def step_submit_deadline(context: Any, model: str, prompt: str, max_tokens: int, deadline_ms: int) -> None:
    context.reply = run(
        context,
        client(context).submit(
            model_ref=model, prompt=prompt, max_tokens=max_tokens, deadline_ms=deadline_ms
        ),
    )


@when("the long task is canceled")
def step_cancel_long(context: Any) -> None:
    assert run(context, client(context).cancel(context.long_task)) == 204


# ------------------------------------------------------------------------------------------------- then


@then('the stream of "{name}" ends while queued with a retriable "{code}" error and policy_label "{label}"')
def step_evicted(context: Any, name: str, code: str, label: str) -> None:
    events = run(context, client(context).events(named(context)[name]))
    names = [e.event for e in events]
    assert names[0] == "started" and names[-1] == "error", names
    assert all(e.event == "metrics" and e.data["phase"] == "queued" for e in events[1:-1]), names
    error = events[-1].data
    assert error["code"] == code and error["retriable"] is True, error
    assert error["policy_label"] == label and error["tokens_out"] == 0, error


@then('the task "{name}" is "{state}"')
def step_named_state(context: Any, name: str, state: str) -> None:
    status = run(context, client(context).status(named(context)[name]))
    assert status["state"] == state, status


@then('the queue position of "{name}" is {position:d}')
def step_position(context: Any, name: str, position: int) -> None:
    status = run(context, client(context).status(named(context)[name]))
    assert status["state"] == "queued" and status["queue_position"] == position, status


@then('"{first}" is dispatched while "{second}" is still queued')
def step_dispatched_first(context: Any, first: str, second: str) -> None:
    tasks = named(context)
    run(context, read_until(client(context), tasks[first], "metrics", phase="dispatch"))
    status = run(context, client(context).status(tasks[second]))
    assert status["state"] == "queued", status


@then('once "{name}" is canceled, "{other}" runs to its end')
def step_then_runs(context: Any, name: str, other: str) -> None:
    tasks = named(context)
    assert run(context, client(context).cancel(tasks[name])) == 204
    events = run(context, client(context).events(tasks[other]))
    assert events[-1].event == "end", [e.event for e in events]


@then("the error is not retriable and its predicted_start_ms is over {deadline_ms:d}")
def step_predicted_over(context: Any, deadline_ms: int) -> None:
    body = context.reply[1]
    assert body["retriable"] is False, body
    assert isinstance(body["predicted_start_ms"], int) and body["predicted_start_ms"] > deadline_ms, body


@then("the error is not retriable")
def step_not_retriable(context: Any) -> None:
    body = context.reply[1]
    assert body["retriable"] is False, body
