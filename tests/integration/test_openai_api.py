"""The OpenAI-compatible API through the whole stack, with the official `openai` SDK as the client.

The mock engine serves the chat route with its built-in ChatML template, deterministic tool calls and
schema-shaped JSON (``services/llorch_mockengine``), so every assertion here is about what the stack
relays: the chunk format, tool-call deltas, usage, errors, Retry-After and cancel on disconnect.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import jsonschema
import openai
import pytest

from tests.support.procs import wait_until
from tests.support.stack import MOCK_MODEL, Client, Stack, mock_pool

WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "count": {"type": "integer"}, "ok": {"type": "boolean"}},
    "required": ["name", "count", "ok"],
    "additionalProperties": False,
}
USER = [{"role": "user", "content": "Say hello"}]


def sdk(stack: Stack, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.token, **kwargs)


def pools() -> list[dict[str, Any]]:
    return [
        # This engine leaves usage out of its chat answers: the usage clients see is our own count.
        mock_pool("mock-a", slots=2, args=["--no-chat-usage"]),
        mock_pool("mock-emb", model="mock-embed", workloads=["embedding"]),
    ]


async def started(stack: Stack) -> Stack:
    """Start the two-pool stack and wait for both pools (the stack is ready once one pool is)."""
    await stack.start()
    await stack.wait_pools_ready("mock-a", "mock-emb")
    return stack


@pytest.fixture
def stack(stack_factory: Any, tmp_path: Path) -> Stack:
    embedder = tmp_path / "mock-embed.bin"  # another file: another digest, so another replica set
    embedder.write_bytes(MOCK_MODEL.read_bytes() + b"embed")
    models = [{"id": "mock-tiny", "path": str(MOCK_MODEL)}, {"id": "mock-embed", "path": str(embedder)}]
    built: Stack = stack_factory(pools=pools(), models=models)
    return built


async def test_chat_completions_models_and_embeddings_with_the_sdk(stack: Stack) -> None:
    await started(stack)
    client = sdk(stack)

    raw = client.chat.completions.with_raw_response.create(
        model="mock-tiny", messages=USER, max_tokens=5, seed=3
    )
    answer = raw.parse()
    task_id = raw.headers["X-Task-Id"]
    assert answer.id == f"chatcmpl-{task_id}" and answer.object == "chat.completion"
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 5
    assert answer.usage.prompt_tokens > 0
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 5

    chunks = list(
        client.chat.completions.create(
            model="mock-tiny",
            messages=USER,
            max_tokens=5,
            seed=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content  # same seed, same prompt: the same answer
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5

    completion = client.completions.create(model="mock-tiny", prompt="Once upon", max_tokens=4, seed=1)
    assert completion.object == "text_completion" and completion.choices[0].text
    assert completion.usage is not None and completion.usage.completion_tokens == 4

    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"mock-tiny", "mock-embed"}
    tiny = listed["mock-tiny"].model_dump()
    assert tiny["owned_by"] == "llorch" and tiny["status"] == "ready" and tiny["context_length"] == 2048
    assert tiny["replica_set"]

    embedded = client.embeddings.create(model="mock-embed", input=["one", "two", "one"])
    vectors = [d.embedding for d in embedded.data]
    assert [d.index for d in embedded.data] == [0, 1, 2]
    assert len(vectors[0]) > 1 and vectors[0] == vectors[2] and vectors[0] != vectors[1]
    assert embedded.usage.prompt_tokens > 0

    async_client = openai.AsyncOpenAI(base_url=f"{stack.url}/v1", api_key=stack.token)
    async_answer = await async_client.chat.completions.create(
        model="mock-tiny", messages=USER, max_tokens=5, seed=3
    )
    assert async_answer.choices[0].message.content == answer.choices[0].message.content
    streamed = await async_client.chat.completions.create(
        model="mock-tiny", messages=USER, max_tokens=3, stream=True
    )
    pieces = [c.choices[0].delta.content async for c in streamed if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 3
    await async_client.close()


async def test_tools_and_json_schema_pass_through(stack: Stack) -> None:
    await started(stack)
    client = sdk(stack)
    stream = client.chat.completions.create(
        model="mock-tiny",
        messages=[{"role": "user", "content": "What is the weather like?"}],
        tools=[WEATHER_TOOL],
        tool_choice="required",
        stream=True,
        max_tokens=64,
    )
    calls: dict[int, dict[str, str]] = {}
    deltas = 0
    finish = None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for call in choice.delta.tool_calls or []:
            deltas += 1
            entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += call.id or ""
            if call.function is not None:
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
    assert finish == "tool_calls" and deltas > 2  # streamed in pieces, relayed as they came
    assert list(calls) == [0] and calls[0]["name"] == "get_weather" and calls[0]["id"]
    arguments = json.loads(calls[0]["arguments"])
    assert set(arguments) == {"city", "days"} and isinstance(arguments["days"], int)

    whole = client.chat.completions.create(
        model="mock-tiny",
        messages=[{"role": "user", "content": "What is the weather like?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
    )
    message = whole.choices[0].message
    assert whole.choices[0].finish_reason == "tool_calls" and message.tool_calls
    assert message.tool_calls[0].function.name == "get_weather"
    assert set(json.loads(message.tool_calls[0].function.arguments)) == {"city", "days"}

    followup = client.chat.completions.create(
        model="mock-tiny",
        messages=[
            {"role": "user", "content": "What is the weather like?"},
            {"role": "assistant", "content": None, "tool_calls": [message.tool_calls[0].model_dump()]},
            {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "sunny"},
        ],
        max_tokens=4,
    )
    assert followup.choices[0].message.content

    structured = client.chat.completions.create(
        model="mock-tiny",
        messages=[{"role": "user", "content": "Describe a thing"}],
        response_format={"type": "json_schema", "json_schema": {"name": "thing", "schema": ANSWER_SCHEMA}},
        max_tokens=128,
    )
    jsonschema.validate(json.loads(structured.choices[0].message.content or ""), ANSWER_SCHEMA)


async def test_context_overflow_n_and_bad_input_are_openai_errors(stack: Stack) -> None:
    await started(stack)
    client = sdk(stack, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="mock-tiny", messages=[{"role": "user", "content": "word " * 3000}], max_tokens=16
        )
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "context_length_exceeded"
    assert "2048" in error["message"] and str(error["message"]).count("tokens") >= 2
    with pytest.raises(openai.BadRequestError, match="n must be 1"):
        client.chat.completions.create(model="mock-tiny", messages=USER, n=2)
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="no-such-model", messages=USER)
    assert isinstance(unknown.value.body, dict) and unknown.value.body["param"] == "model_ref"
    with pytest.raises(openai.BadRequestError, match="workload"):
        client.embeddings.create(model="mock-tiny", input="chat models do not embed")
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=f"{stack.url}/v1", api_key="wrong", max_retries=0).models.list()


HOSTILE: list[tuple[str, str, bytes | None]] = [
    ("POST", "/v1/chat/completions", b"{not json"),
    ("POST", "/v1/chat/completions", b"[1,2]"),
    ("POST", "/v1/chat/completions", b'{"model":"mock-tiny"}'),
    ("POST", "/v1/chat/completions", b'{"model":"mock-tiny","messages":"hi"}'),
    ("POST", "/v1/chat/completions", b'{"model":"mock-tiny","messages":[{"role":"wizard","content":"x"}]}'),
    (
        "POST",
        "/v1/chat/completions",
        b'{"model":"mock-tiny","messages":[{"role":"user","content":"\\ud800"}]}',
    ),
    ("POST", "/v1/chat/completions", b'{"model":5,"messages":[{"role":"user","content":"x"}]}'),
    (
        "POST",
        "/v1/chat/completions",
        b'{"model":"mock-tiny","messages":[{"role":"user","content":"x"}],'
        b'"max_tokens":99999999999999999999999}',
    ),
    (
        "POST",
        "/v1/chat/completions",
        b'{"model":"mock-tiny","messages":[{"role":"user","content":"x"}],"temperature":"hot"}',
    ),
    (
        "POST",
        "/v1/chat/completions",
        b'{"model":"mock-tiny","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}',
    ),
    (
        "POST",
        "/v1/chat/completions",
        b'{"model":"mock-tiny","messages":[{"role":"user","content":'
        b'[{"type":"image_url","image_url":{"url":"http://x"}}]}]}',
    ),
    ("POST", "/v1/chat/completions", b"[" * 5000 + b"]" * 5000),
    ("POST", "/v1/completions", b'{"model":"mock-tiny","prompt":["a","b"]}'),
    ("POST", "/v1/completions", b'{"model":"mock-tiny","prompt":"a","echo":true}'),
    ("POST", "/v1/completions", b'{"model":"mock-tiny"}'),
    ("POST", "/v1/embeddings", b'{"model":"mock-embed","input":[]}'),
    ("POST", "/v1/embeddings", b'{"model":"mock-embed","input":[1,2]}'),
    ("POST", "/v1/embeddings", b'{"model":"mock-embed","input":"x","dimensions":8}'),
    (
        "POST",
        "/v1/chat/completions",
        b'{"model":"mock-tiny","messages":[{"role":"user","content":"' + b"x" * 70000 + b'"}]}',
    ),
    ("DELETE", "/v1/models", None),
    ("GET", "/v1/chat/completions", None),
]


async def test_hostile_input_gets_the_openai_error_shape(stack: Stack, http: aiohttp.ClientSession) -> None:
    await started(stack)
    for method, path, body in HOSTILE:
        headers = {**stack.headers, "Content-Type": "application/json"}
        async with http.request(method, f"{stack.url}{path}", data=body, headers=headers) as r:
            payload = await r.json()
            assert 400 <= r.status < 500, (path, body and body[:80], r.status, payload)
            error = payload["error"]
            assert set(error) >= {"message", "type", "code", "param"}, payload
            assert error["type"] == "invalid_request_error", payload
            assert r.headers["X-Correlation-Id"]
    async with http.get(f"{stack.url}/v1/models") as r:  # no token
        assert r.status == 401 and (await r.json())["error"]["type"] == "authentication_error"
        assert r.headers["WWW-Authenticate"]
    unknown = {"model": "mock-tiny", "messages": USER, "max_tokens": 2, "user": "u1", "vendor_knob": {"a": 1}}
    async with http.post(f"{stack.url}/v1/chat/completions", json=unknown, headers=stack.headers) as r:
        assert r.status == 200, await r.text()  # unknown fields are ignored (SPEC §2.1)
    bad_priority = {**stack.headers, "X-Priority": "urgent"}
    async with http.post(
        f"{stack.url}/v1/chat/completions",
        json={"model": "mock-tiny", "messages": USER},
        headers=bad_priority,
    ) as r:
        assert r.status == 400 and (await r.json())["error"]["param"] == "X-Priority"


async def test_429_carries_retry_after_and_the_sdk_honours_it(stack_factory: Any) -> None:
    stack: Stack = stack_factory(
        pools=[mock_pool()],
        extra={"api": {"tokens": [{"name": "agents", "token_env": "LLORCH_API_TOKEN", "rps": 0.5}]}},
    )
    await stack.start()
    statuses: list[tuple[int, str | None]] = []

    def record(response: httpx2.Response) -> None:
        statuses.append((response.status_code, response.headers.get("Retry-After")))

    client = sdk(stack, http_client=httpx2.Client(event_hooks={"response": [record]}), max_retries=3)
    first = client.chat.completions.create(model="mock-tiny", messages=USER, max_tokens=2)
    second = client.chat.completions.create(model="mock-tiny", messages=USER, max_tokens=2)
    assert first.choices[0].message.content and second.choices[0].message.content
    refused = [s for s in statuses if s[0] == 429]
    assert refused, statuses  # the bucket holds one request: the second waited for Retry-After
    assert all(after is not None and int(after) >= 1 for _, after in refused)
    assert statuses[-1][0] == 200


async def test_disconnect_cancels_running_and_queued_tasks(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack: Stack = stack_factory(pools=[mock_pool(slots=1, args=["--token-delay-ms", "50"])])
    await stack.start()
    native = Client(stack, http)
    body = {"model": "mock-tiny", "messages": USER, "max_tokens": 1500, "stream": True}
    url = f"{stack.url}/v1/chat/completions"

    running = await http.post(url, json=body, headers=stack.headers)
    running_id = running.headers["X-Task-Id"]
    async for line in running.content:  # the first token: the task holds the only slot
        if line.startswith(b"data: ") and b'"content":"' in line and b'"content":""' not in line:
            break
    queued = await http.post(url, json=body, headers=stack.headers)
    queued_id = queued.headers["X-Task-Id"]
    first = await queued.content.readline()
    assert first.startswith(b"data: ")  # the role chunk comes at once, then where it waits:
    comment = b""
    while not comment.startswith(b": queued"):
        comment = await queued.content.readline()
    assert b"queue_position=0" in comment and b"predicted_start_ms=" in comment

    queued.close()
    running.close()

    async def ended() -> bool:
        states = [(await native.status(t))["state"] for t in (running_id, queued_id)]
        return states == ["canceled", "canceled"]

    await wait_until(ended, 30, "both tasks to be canceled")
    for task_id in (running_id, queued_id):
        assert (await native.status(task_id))["error"]["code"] == "CANCELED"
    client = sdk(stack)  # the slot is free again
    answer = client.chat.completions.create(model="mock-tiny", messages=USER, max_tokens=2)
    assert answer.choices[0].finish_reason == "length"
