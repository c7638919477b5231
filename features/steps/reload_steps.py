"""Steps for the reload journey: a pool swapped onto another catalog model, and a failed swap."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from behave import given, then, when

from tests.support.bdd import client, run
from tests.support.stack import MOCK_MODEL, Stack, mock_pool


@given('a running stack with one mock pool "{pool_id}" whose catalog also holds "{other}" and "{broken}"')
def step_reload_stack(context: Any, pool_id: str, other: str, broken: str) -> None:
    folder = context.workdir / "models"
    folder.mkdir(exist_ok=True)
    second = folder / f"{other}.bin"
    second.write_bytes(MOCK_MODEL.read_bytes() + other.encode())  # the same engine, another digest
    unloadable = folder / broken  # a directory: the engine cannot load it
    unloadable.mkdir()
    (unloadable / "weights").write_bytes(b"not a model")
    context.model_files = {other: second}
    models = [
        {"id": "mock-tiny", "path": str(MOCK_MODEL)},
        {"id": other, "path": str(second)},
        {"id": broken, "path": str(unloadable)},
    ]
    pools = [mock_pool(pool_id, args=["--token-delay-ms", "20"])]
    context.stack = Stack(context.workdir / "stack", context.redis.url, pools=pools, models=models)
    run(context, context.stack.start())


@when('a task of {tokens:d} tokens is streaming on "{pool_id}"')
def step_streaming(context: Any, tokens: int, pool_id: str) -> None:
    api = client(context)

    async def started() -> tuple[str, asyncio.Task[Any]]:
        task_id = await api.admit(max_tokens=tokens)
        events = api.follow(task_id)
        async for event in events:  # its first token: it runs on the old engine
            if event.event == "token":
                break
        rest = asyncio.ensure_future(_collect(events))
        return task_id, rest

    context.streaming, context.rest = run(context, started())


async def _collect(events: Any) -> list[Any]:
    return [event async for event in events]


@when('I reload "{pool_id}" onto "{model_ref}" and wait')
def step_reload(context: Any, pool_id: str, model_ref: str) -> None:
    stack: Stack = context.stack

    async def reload() -> tuple[int, Any]:
        url = f"{stack.url}/v1/pools/{pool_id}/reload?wait=true"
        async with context.http.post(url, json={"new_model_ref": model_ref}, headers=stack.headers) as r:
            return r.status, await r.json()

    context.reload = run(context, reload())


@then('the reload answers 200 with the digest of "{model_ref}"')
def step_reloaded(context: Any, model_ref: str) -> None:
    status, body = context.reload
    digest = "sha256:" + hashlib.sha256(context.model_files[model_ref].read_bytes()).hexdigest()
    assert status == 200 and body["model_ref"] == model_ref and body["model_digest"] == digest, body


@then('the streaming task runs to its end on replica "{replica_id}"')
def step_stream_ended(context: Any, replica_id: str) -> None:
    events = run(context, context.rest)
    assert events[-1].event == "end", events[-1]
    assert run(context, client(context).status(context.streaming))["replica_id"] == replica_id


@then('a task for "{model_ref}" runs to its end on replica "{replica_id}"')
def step_task_on(context: Any, model_ref: str, replica_id: str) -> None:
    api = client(context)
    task_id = run(context, api.admit(model_ref=model_ref, max_tokens=3))
    assert run(context, api.events(task_id))[-1].event == "end"
    assert run(context, api.status(task_id))["replica_id"] == replica_id


@then('the reload answers 409 "{code}", rolled back')
def step_rolled_back(context: Any, code: str) -> None:
    status, body = context.reload
    assert status == 409 and body["code"] == code and body["rolled_back"] is True, body


@then('pool "{pool_id}" still serves "{model_ref}" and its health shows "{code}"')
def step_still_serves(context: Any, pool_id: str, model_ref: str, code: str) -> None:
    stack: Stack = context.stack

    async def health() -> Any:
        async with context.http.get(f"{stack.url}/v1/pools/{pool_id}/health", headers=stack.headers) as r:
            return await r.json()

    body = run(context, health())
    assert body["model_ref"] == model_ref and body["state"] == "Ready", body
    assert body["last_error"]["code"] == code, body
