"""Anthropic's Messages API (the official `anthropic` SDK) and the Responses API (the `openai` SDK)
through the whole stack on the mock engine: text, streaming, tools, errors."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

from tests.support.stack import Stack, mock_pool

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
    },
}


@pytest.fixture
def stack(stack_factory: Any) -> Stack:
    built: Stack = stack_factory(pools=[mock_pool(slots=2)])
    return built


async def test_messages_text_streaming_and_tools_with_the_anthropic_sdk(stack: Stack) -> None:
    await stack.start()
    client = anthropic.Anthropic(base_url=stack.url, api_key=stack.token, max_retries=0)

    raw = client.messages.with_raw_response.create(
        model="mock-tiny",
        max_tokens=6,
        system="You are terse.",
        messages=[{"role": "user", "content": "Say hello"}],
    )
    message = raw.parse()
    assert message.id == f"msg_{raw.headers['X-Task-Id']}" and message.role == "assistant"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 6
    assert message.usage.input_tokens > 0

    with client.messages.stream(
        model="mock-tiny", max_tokens=6, messages=[{"role": "user", "content": "Say hello"}]
    ) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(texts) == 6 and "".join(texts) == final.content[0].text  # type: ignore[union-attr]

    used = client.messages.create(
        model="mock-tiny",
        max_tokens=64,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "any"},
        messages=[{"role": "user", "content": "What is the weather like?"}],
    )
    assert used.stop_reason == "tool_use"
    (call,) = [block for block in used.content if block.type == "tool_use"]
    assert call.name == "get_weather" and set(call.input) == {"city", "days"}  # type: ignore[arg-type]

    with client.messages.stream(
        model="mock-tiny",
        max_tokens=64,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "What is the weather like?"}],
    ) as stream:
        streamed = stream.get_final_message()
    (streamed_call,) = [block for block in streamed.content if block.type == "tool_use"]
    assert streamed_call.name == "get_weather"  # type: ignore[union-attr]
    assert set(streamed_call.input) == {"city", "days"}  # type: ignore[union-attr,arg-type]

    reply = client.messages.create(
        model="mock-tiny",
        max_tokens=4,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[
            {"role": "user", "content": "What is the weather like?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": call.id, "name": call.name, "input": call.input}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
            },
        ],
    )
    assert reply.content[0].type == "text"

    counted = client.messages.count_tokens(
        model="mock-tiny", messages=[{"role": "user", "content": "Say hello"}]
    )
    assert counted.input_tokens > 0

    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(
            model="mock-tiny", max_tokens=16, messages=[{"role": "user", "content": "word " * 3000}]
        )
    assert caught.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "prompt is too long" in caught.value.body["error"]["message"]  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("mock-tiny")  # no /v1/models/{id}: 404 in Anthropic's shape
    with pytest.raises(anthropic.PermissionDeniedError):
        anthropic.Anthropic(base_url=stack.url, api_key="wrong", max_retries=0).messages.create(
            model="mock-tiny", max_tokens=4, messages=[{"role": "user", "content": "x"}]
        )


async def test_responses_text_streaming_and_function_tools_with_the_openai_sdk(stack: Stack) -> None:
    await stack.start()
    client = openai.OpenAI(base_url=f"{stack.url}/v1", api_key=stack.token, max_retries=0)

    response = client.responses.create(
        model="mock-tiny", input="Say hello", instructions="Be terse.", max_output_tokens=5
    )
    assert response.output_text and response.usage is not None
    assert response.usage.output_tokens == 5 and response.status == "incomplete"

    events = list(
        client.responses.create(model="mock-tiny", input="Say hello", max_output_tokens=5, stream=True)
    )
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert events[0].type == "response.created" and events[-1].type == "response.incomplete"
    assert len(deltas) == 5 and "".join(deltas) == events[-1].response.output_text  # type: ignore[union-attr]
    assert [e.sequence_number for e in events] == list(range(len(events)))

    tool = {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": WEATHER["input_schema"],
    }
    called = client.responses.create(
        model="mock-tiny",
        input="What is the weather like?",
        tools=[tool],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=64,
    )
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and set(json.loads(call.arguments)) == {"city", "days"}
    answered = client.responses.create(
        model="mock-tiny",
        input=[
            {"role": "user", "content": "What is the weather like?"},
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
        max_output_tokens=4,
    )
    assert answered.output_text

    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="mock-tiny", input="x", previous_response_id="resp_1")


HOSTILE = [
    ("/v1/messages", b"{not json"),
    ("/v1/messages", b'{"model":"mock-tiny","messages":[{"role":"user","content":"x"}]}'),  # no max_tokens
    ("/v1/messages", b'{"model":"mock-tiny","max_tokens":"many","messages":[]}'),
    (
        "/v1/messages",
        b'{"model":"mock-tiny","max_tokens":4,"messages":[{"role":"user","content":'
        b'[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"AA=="}}]}]}',
    ),
    (
        "/v1/messages",
        b'{"model":"mock-tiny","max_tokens":4,"messages":[{"role":"user","content":"\\ud800"}]}',
    ),
    ("/v1/messages/count_tokens", b"[]"),
    ("/v1/responses", b'{"model":"mock-tiny"}'),
    ("/v1/responses", b'{"model":"mock-tiny","input":5}'),
    ("/v1/responses", b'{"model":"mock-tiny","input":"x","tools":[{"type":"web_search"}]}'),
    ("/v1/responses", b"[" * 5000 + b"]" * 5000),
]


async def test_hostile_input_gets_each_api_s_error_shape(stack: Stack) -> None:
    import aiohttp

    await stack.start()
    async with aiohttp.ClientSession() as http:
        for path, body in HOSTILE:
            headers = {**stack.headers, "Content-Type": "application/json"}
            async with http.post(f"{stack.url}{path}", data=body, headers=headers) as r:
                payload = await r.json()
                assert 400 <= r.status < 500, (path, body[:60], r.status, payload)
                if path.startswith("/v1/messages"):
                    assert payload["type"] == "error" and payload["error"]["type"], payload
                else:
                    assert payload["error"]["type"] == "invalid_request_error", payload
