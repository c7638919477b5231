"""Steps for session journeys: budgets reserved and refunded, turn limits, TTL expiry and DELETE.

Everything is read over HTTP: the 202 headers, GET/DELETE /v1/sessions/{id} and the task routes. Waits for
asynchronous outcomes (refunds, expiry) poll with a bounded deadline instead of sleeping.
"""

from __future__ import annotations

import uuid
from typing import Any

from behave import given, then, when

from tests.support.bdd import client, run
from tests.support.procs import wait_until
from tests.support.stack import Stack, mock_pool

DEFAULT_TTL_MS = 600_000
BUDGET_FIELDS = ("tokens_budget_remaining", "time_budget_remaining_ms", "cost_budget_remaining")


def start_stack(context: Any, sessions: dict[str, Any], **pool: Any) -> None:
    config = mock_pool(**pool)
    context.pool_id = config["id"]
    context.session_ttl_ms = int(sessions.get("ttl_ms", DEFAULT_TTL_MS))
    context.stack = Stack(
        context.workdir / "stack", context.redis.url, pools=[config], extra={"sessions": sessions}
    )
    run(context, context.stack.start())


async def get_session(context: Any, session_id: str) -> tuple[int, dict[str, Any]]:
    stack: Stack = context.stack
    async with context.http.get(f"{stack.url}/v1/sessions/{session_id}", headers=stack.headers) as r:
        return r.status, dict(await r.json())


def open_session(context: Any, session_id: str) -> dict[str, Any]:
    status, info = run(context, get_session(context, session_id))
    assert status == 200, (status, info)
    assert info["session_id"] == session_id, info
    return info


def created(context: Any) -> dict[str, list[int]]:
    """created_ms of every session seen, by id, in the order seen."""
    if not hasattr(context, "sessions_created"):
        context.sessions_created = {}
    seen: dict[str, list[int]] = context.sessions_created
    return seen


def submit_turn(context: Any, **body: Any) -> None:
    """Submit one task of a session under a known task_id, so a refusal can be checked for no record."""
    context.turn_task_id = f"turn-{uuid.uuid4().hex[:12]}"
    context.reply = run(context, client(context).submit(task_id=context.turn_task_id, **body))
    status, payload, _ = context.reply
    if status == 202:
        context.task_id = payload["task_id"]
        context.stream = None
        context.events = []


async def run_turn(context: Any, session_id: str, max_tokens: int) -> None:
    api = client(context)
    events = await api.events(await api.admit(session_id=session_id, prompt="hello", max_tokens=max_tokens))
    assert events[-1].event == "end", [e.event for e in events]


# ------------------------------------------------------------------------------------------------ given


@given(
    "a running stack with a mock pool that ends each answer after {eos:d} tokens and allows "
    "{turns:d} turns per session"
)
def step_stack_turns(context: Any, eos: int, turns: int) -> None:
    start_stack(context, {"max_turns": turns}, args=["--eos-after", str(eos)])


@given("a running stack with a mock pool whose sessions expire after {ttl_ms:d} ms without use")
def step_stack_ttl(context: Any, ttl_ms: int) -> None:
    start_stack(context, {"ttl_ms": ttl_ms})


# ------------------------------------------------------------------------------------------------- when


@when(
    'I start session "{session_id}" with a budget of {tokens:d} tokens, prompt "{prompt}" '
    "and max_tokens {max_tokens:d}"
)
def step_start_session(context: Any, session_id: str, tokens: int, prompt: str, max_tokens: int) -> None:
    status, _ = run(context, get_session(context, session_id))
    assert status == 404, f"session {session_id} already exists"
    submit_turn(
        context, session_id=session_id, prompt=prompt, max_tokens=max_tokens, budget={"tokens": tokens}
    )


@when('I submit a turn of session "{session_id}" with prompt "{prompt}" and max_tokens {max_tokens:d}')
def step_submit_turn(context: Any, session_id: str, prompt: str, max_tokens: int) -> None:
    submit_turn(context, session_id=session_id, prompt=prompt, max_tokens=max_tokens)


@when('I run {count:d} more turns of session "{session_id}" with max_tokens {max_tokens:d} to their end')
def step_more_turns(context: Any, count: int, session_id: str, max_tokens: int) -> None:
    for _ in range(count):
        run(context, run_turn(context, session_id, max_tokens))


@when('I run a turn of session "{session_id}" to its end')
def step_one_turn(context: Any, session_id: str) -> None:
    run(context, run_turn(context, session_id, max_tokens=2))


@when('I delete session "{session_id}"')
def step_delete(context: Any, session_id: str) -> None:
    stack: Stack = context.stack

    async def delete() -> tuple[int, Any]:
        url = f"{stack.url}/v1/sessions/{session_id}"
        async with context.http.delete(url, headers=stack.headers) as r:
            return r.status, r.headers  # case-insensitive, like every reply the steps keep

    context.delete_reply = run(context, delete())


# ------------------------------------------------------------------------------------------------- then


@then('the answer is 202 for session "{session_id}" with {tokens:d} budget tokens remaining')
def step_admitted_in_session(context: Any, session_id: str, tokens: int) -> None:
    status, body, headers = context.reply
    assert status == 202, (status, body)
    assert body["session_id"] == session_id and body["task_id"] == context.turn_task_id, body
    assert int(headers["X-Budget-Tokens-Remaining"]) == tokens, dict(headers)


@then("the answer carries no time or cost budget header")
def step_no_other_budget_headers(context: Any) -> None:
    headers = context.reply[2]
    unset = ("X-Budget-Time-Remaining-Ms", "X-Budget-Cost-Remaining")
    assert not [h for h in unset if h in headers], dict(headers)


@then('the unused reservation is refunded: session "{session_id}" soon has {tokens:d} budget tokens left')
def step_refunded(context: Any, session_id: str, tokens: int) -> None:
    seen: list[Any] = []

    async def refunded() -> bool:
        status, info = await get_session(context, session_id)
        seen.append(info.get("tokens_budget_remaining"))
        return status == 200 and info.get("tokens_budget_remaining") == tokens

    try:
        run(context, wait_until(refunded, 30, f"session {session_id} to have {tokens} budget tokens left"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen[-1:]}") from None


@then('session "{session_id}" has {tokens:d} budget tokens left after {turns:d} of {max_turns:d} turns')
def step_session_budget(context: Any, session_id: str, tokens: int, turns: int, max_turns: int) -> None:
    info = open_session(context, session_id)
    assert info["tokens_budget_remaining"] == tokens, info
    assert info["turns"] == turns and info["max_turns"] == max_turns, info
    assert "time_budget_remaining_ms" not in info and "cost_budget_remaining" not in info, info
    assert info["model_ref"] == "mock-tiny", info


@then('the refusal names the "{budget}" budget and no task was queued')
def step_refusal(context: Any, budget: str) -> None:
    status, body, headers = context.reply
    assert status == 403 and body["budget"] == budget and body["retriable"] is False, body
    assert headers.get("X-Correlation-Id"), dict(headers)
    stack: Stack = context.stack

    async def task_status() -> int:
        url = f"{stack.url}/v1/tasks/{context.turn_task_id}"
        async with context.http.get(url, headers=stack.headers) as r:
            return int(r.status)

    assert run(context, task_status()) == 404, "a refused turn must leave no task behind"


@then('session "{session_id}" is open at turn {turns:d}')
def step_open_at(context: Any, session_id: str, turns: int) -> None:
    info = open_session(context, session_id)
    assert info["turns"] == turns, info
    ttl_ms = getattr(context, "session_ttl_ms", DEFAULT_TTL_MS)  # a plain stack keeps the default TTL
    assert 0 < info["ttl_ms_remaining"] <= ttl_ms, (info, ttl_ms)
    assert not any(field in info for field in BUDGET_FIELDS), info  # no budget was set
    assert isinstance(info["created_ms"], int) and info["created_ms"] > 0, info
    created(context).setdefault(session_id, []).append(info["created_ms"])


@then('session "{session_id}" is gone within {seconds:d} seconds')
def step_expires(context: Any, session_id: str, seconds: int) -> None:
    async def expired() -> bool:
        return (await get_session(context, session_id))[0] == 404

    run(context, wait_until(expired, seconds, f"session {session_id} to expire"))
    status, body = run(context, get_session(context, session_id))
    assert status == 404 and body["code"] == "NOT_FOUND", (status, body)


@then('session "{session_id}" is a fresh session, created after the expired one')
def step_fresh(context: Any, session_id: str) -> None:
    seen = created(context).get(session_id, [])
    assert len(seen) >= 2, seen
    assert seen[-1] > seen[-2], seen


@then("the delete answers {status:d} with an X-Correlation-Id")
def step_delete_status(context: Any, status: int) -> None:
    got, headers = context.delete_reply
    assert got == status, (got, dict(headers))
    assert headers.get("X-Correlation-Id"), dict(headers)


@then('session "{session_id}" is not found')
def step_not_found(context: Any, session_id: str) -> None:
    status, body = run(context, get_session(context, session_id))
    assert status == 404 and body["code"] == "NOT_FOUND", (status, body)
