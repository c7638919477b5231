"""The mock engine's OpenAI routes as a real process: chat (text, tools, JSON) and embeddings."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jsonschema
import pytest

from llorch_mockengine.generation import WORDS, completion_text
from tests.support.mockengine import Mock, StartMock

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "Tell me about GPUs."}]
WEATHER: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
        "metric": {"type": "boolean"},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "hours": {"type": "array", "items": {"type": "number", "minimum": 0, "maximum": 23}},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}, "tag": {"type": "string"}}},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
    },
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER},
    },
]
CHUNK_KEYS = ["choices", "created", "id", "model", "system_fingerprint", "object"]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def mock(start_mock: StartMock) -> Mock:
    return await start_mock("--token-delay-ms", "0")


async def post(http: aiohttp.ClientSession, url: str, body: object, status: int = 200) -> Any:
    async with http.post(url, json=body) as resp:
        assert resp.status == status, await resp.text()
        return await resp.json()


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def chat(http: aiohttp.ClientSession, mock: Mock, **body: object) -> dict[str, Any]:
    result: dict[str, Any] = await post(http, f"{mock.url}{CHAT}", {"messages": USER, **body})
    return result


async def chat_stream(http: aiohttp.ClientSession, mock: Mock, **body: object) -> list[dict[str, Any]]:
    """POST a streaming chat; check the framing and ``[DONE]``, return the JSON chunks before it."""
    async with http.post(f"{mock.url}{CHAT}", json={"messages": USER, "stream": True, **body}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    events = raw.split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    assert all(event.startswith(b"data: {") for event in events[:-2])
    return [json.loads(event.removeprefix(b"data: ")) for event in events[:-2]]


async def control(http: aiohttp.ClientSession, mock: Mock, **knobs: object) -> None:
    await post(http, f"{mock.url}/mock/control", knobs)


async def rendered(http: aiohttp.ClientSession, mock: Mock, messages: object) -> str:
    prompt: str = (await post(http, f"{mock.url}/apply-template", {"messages": messages}))["prompt"]
    return prompt


def prompt_est(prompt: str) -> int:
    return max(1, math.ceil(len(prompt.encode()) / 4))


def arguments_of(chunks: list[dict[str, Any]]) -> str:
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    return "".join(call["function"]["arguments"] for d in deltas for call in d.get("tool_calls", []))


async def test_non_stream_answer_shape_and_text(mock: Mock, http: aiohttp.ClientSession) -> None:
    body = await chat(http, mock, max_tokens=5, seed=7, temperature=0.2, top_p=0.9, stop=["\n"], extra=1)
    prompt = await rendered(http, mock, USER)

    assert body["id"].startswith("chatcmpl-") and len(body["id"]) > len("chatcmpl-")
    assert body["object"] == "chat.completion" and body["model"] == "mock"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length"
    assert choice["message"] == {"role": "assistant", "content": completion_text("none", prompt, 7, 5)}
    n_prompt = prompt_est(prompt)
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 5, "total_tokens": n_prompt + 5}
    # The rendered prompt drives the same generation as /completion.
    plain = await post(http, f"{mock.url}/completion", {"prompt": prompt, "n_predict": 5, "seed": 7})
    assert plain["content"] == choice["message"]["content"]


async def test_stream_chunks_done_and_usage(mock: Mock, http: aiohttp.ClientSession) -> None:
    chunks = await chat_stream(
        http, mock, max_completion_tokens=4, seed=3, stream_options={"include_usage": True}
    )
    assert len(chunks) == 1 + 4 + 1 + 1
    assert all(list(chunk)[:6] == CHUNK_KEYS for chunk in chunks)
    assert {chunk["id"] for chunk in chunks} == {chunks[0]["id"]} and chunks[0]["id"].startswith("chatcmpl-")
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    first, *tokens, last, usage = chunks
    assert first["choices"] == [
        {"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}
    ]
    for chunk in tokens:
        [choice] = chunk["choices"]
        assert choice["finish_reason"] is None and list(choice["delta"]) == ["content"]
        assert choice["delta"]["content"][1:] in WORDS
    assert last["choices"] == [{"finish_reason": "length", "index": 0, "delta": {}}]
    assert usage["choices"] == [] and "usage" not in last
    text = "".join(chunk["choices"][0]["delta"]["content"] for chunk in tokens)
    prompt = await rendered(http, mock, USER)
    assert text == completion_text("none", prompt, 3, 4)
    n_prompt = prompt_est(prompt)
    assert usage["usage"] == {"completion_tokens": 4, "prompt_tokens": n_prompt, "total_tokens": n_prompt + 4}
    assert usage["timings"]["predicted_n"] == 4

    without = await chat_stream(http, mock, max_tokens=2, seed=3)
    assert len(without) == 1 + 2 + 1 and all(chunk["choices"] for chunk in without)

    await control(http, mock, eos_after=2)
    stopped = await chat_stream(http, mock, max_tokens=10, seed=3)
    assert stopped[-1]["choices"][0]["finish_reason"] == "stop" and len(stopped) == 1 + 2 + 1
    ignored = await chat(http, mock, max_tokens=4, seed=3, ignore_eos=True)
    assert ignored["usage"]["completion_tokens"] == 4


async def test_equal_seed_and_prompt_give_equal_output(mock: Mock, http: aiohttp.ClientSession) -> None:
    async def text(**body: object) -> str:
        content: str = (await chat(http, mock, max_tokens=12, **body))["choices"][0]["message"]["content"]
        return content

    first = await text(seed=42)
    assert first == await text(seed=42)
    assert first != await text(seed=43)
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "about GPUs."}],
        }
    ]
    assert first == await text(seed=42, messages=parts)
    stream = await chat_stream(http, mock, max_tokens=12, seed=42)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in stream) == first


async def test_tool_conversation_renders_tool_messages(mock: Mock, http: aiohttp.ClientSession) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What time is it?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": "12:00"},
    ]
    prompt = await rendered(http, mock, messages)
    assert json.dumps([call], separators=(",", ":")) in prompt
    assert "<|im_start|>tool\n12:00<|im_end|>\n" in prompt and prompt.endswith("<|im_start|>assistant\n")
    body = await chat(http, mock, messages=messages, max_tokens=3, seed=5, tools=TOOLS)
    assert body["choices"][0]["message"]["content"] == completion_text("none", prompt, 5, 3)


@pytest.mark.parametrize(
    ("tool_choice", "text", "name"),
    [
        ("required", "hello", "get_time"),
        ({"type": "function", "function": {"name": "get_weather"}}, "hello", "get_weather"),
        ("auto", "please get_weather for Delft", "get_weather"),
        (None, "please get_weather for Delft", "get_weather"),
    ],
)
async def test_streamed_tool_call_assembles_to_valid_arguments(
    mock: Mock, http: aiohttp.ClientSession, tool_choice: object, text: str, name: str
) -> None:
    body: dict[str, object] = {"tools": TOOLS, "seed": 11, "messages": [{"role": "user", "content": text}]}
    if tool_choice is not None:
        body["tool_choice"] = tool_choice
    chunks = await chat_stream(http, mock, stream_options={"include_usage": True}, **body)

    head = chunks[1]["choices"][0]["delta"]["tool_calls"]
    assert len(head) == 1 and head[0]["index"] == 0 and head[0]["type"] == "function"
    assert head[0]["id"].startswith("call_") and head[0]["function"] == {"name": name, "arguments": ""}
    pieces = chunks[2:-2]
    assert len(pieces) > 1 if name == "get_weather" else len(pieces) == 1  # get_time's arguments are "{}"
    for chunk in pieces:
        delta = chunk["choices"][0]["delta"]
        assert list(delta) == ["tool_calls"] and len(delta["tool_calls"]) == 1
        assert delta["tool_calls"][0]["index"] == 0 and list(delta["tool_calls"][0]) == ["index", "function"]
        assert list(delta["tool_calls"][0]["function"]) == ["arguments"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == len(pieces)
    arguments = json.loads(arguments_of(chunks))
    schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == name)
    assert list(arguments) == list(schema["properties"])
    jsonschema.validate(arguments, schema)

    plain = await chat(http, mock, **body)
    [choice] = plain["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"] == head[0]["id"]
    assert call["function"] == {"name": name, "arguments": arguments_of(chunks)}


async def test_weather_arguments_fill_every_kind(mock: Mock, http: aiohttp.ClientSession) -> None:
    body = await chat(
        http,
        mock,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        seed=1,
    )
    arguments = json.loads(body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"])
    assert arguments["unit"] == "celsius" and arguments["city"] in WORDS
    assert isinstance(arguments["metric"], bool) and 1 <= arguments["days"] <= 7
    assert len(arguments["hours"]) == 1 and set(arguments["where"]) == {"lat", "tag"}


@pytest.mark.parametrize("body", [{"tool_choice": "none"}, {"tool_choice": "auto"}, {}])
async def test_no_tool_call_without_a_reason(
    mock: Mock, http: aiohttp.ClientSession, body: dict[str, object]
) -> None:
    messages = [{"role": "user", "content": "get_weather" if body.get("tool_choice") == "none" else "hello"}]
    answer = await chat(http, mock, tools=TOOLS, messages=messages, max_tokens=3, seed=1, **body)
    [choice] = answer["choices"]
    assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "length"
    assert len(choice["message"]["content"].split()) == 3


SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "minLength": 12},
        "score": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        "count": {"type": "integer", "minimum": 1000},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "minItems": 2},
        "kind": {"enum": ["a", "b"]},
        "nested": {"$ref": "#/$defs/inner"},
        "maybe": {"type": ["null", "boolean"]},
    },
    "required": ["title", "score", "count", "tags", "kind", "nested", "maybe"],
    "$defs": {"inner": {"type": "object", "properties": {"ok": {"const": True}}, "required": ["ok"]}},
}


async def test_json_schema_answer_validates(mock: Mock, http: aiohttp.ClientSession) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": SCHEMA}}
    chunks = await chat_stream(http, mock, response_format=fmt, seed=9)
    pieces = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert len(pieces) > 1 and chunks[-1]["choices"][0]["finish_reason"] == "stop"
    document = json.loads("".join(pieces))
    jsonschema.validate(document, SCHEMA)
    plain = await chat(http, mock, response_format=fmt, seed=9)
    assert plain["choices"][0]["message"]["content"] == "".join(pieces)
    assert plain["usage"]["completion_tokens"] == len(pieces)

    other = await chat(http, mock, response_format={"type": "json_object"}, seed=9)
    answer = json.loads(other["choices"][0]["message"]["content"])
    assert list(answer) == ["answer"] and all(word in WORDS for word in answer["answer"].split())
    text = await chat(http, mock, response_format={"type": "text"}, seed=9, max_tokens=2)
    assert len(text["choices"][0]["message"]["content"].split()) == 2


async def test_structured_answer_is_cut_at_max_tokens(mock: Mock, http: aiohttp.ClientSession) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": SCHEMA}}
    body = await chat(http, mock, response_format=fmt, seed=9, max_tokens=2)
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 2


async def test_prompt_beyond_the_context_is_a_400(start_mock: StartMock, http: aiohttp.ClientSession) -> None:
    mock = await start_mock("-c", "64")
    messages = [{"role": "user", "content": "x" * 400}]
    n_prompt = prompt_est(await rendered(http, mock, messages))
    for stream in (False, True):
        body = await post(http, f"{mock.url}{CHAT}", {"messages": messages, "stream": stream}, status=400)
        assert body == {
            "error": {
                "code": 400,
                "message": f"request ({n_prompt} tokens) exceeds the available context size (64 tokens), "
                "try increasing it",
                "type": "exceed_context_size_error",
                "n_prompt_tokens": n_prompt,
                "n_ctx": 64,
            }
        }


async def test_chat_usage_knob_drops_usage(mock: Mock, http: aiohttp.ClientSession) -> None:
    await control(http, mock, chat_usage=False)
    body = await chat(http, mock, max_tokens=2, seed=1)
    assert "usage" not in body and body["choices"][0]["message"]["content"]
    chunks = await chat_stream(http, mock, max_tokens=2, seed=1, stream_options={"include_usage": True})
    assert all(chunk["choices"] and "usage" not in chunk for chunk in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"

    await control(http, mock, chat_usage=True)
    assert (await chat(http, mock, max_tokens=2, seed=1))["usage"]["completion_tokens"] == 2
    async with http.post(f"{mock.url}/mock/control", json={"chat_usage": "no"}) as resp:
        assert resp.status == 400


async def test_chat_usage_launch_flag(start_mock: StartMock, http: aiohttp.ClientSession) -> None:
    mock = await start_mock("--no-chat-usage", "--token-delay-ms", "0")
    assert "usage" not in await chat(http, mock, max_tokens=1)


async def test_fault_knobs_apply_to_chat(mock: Mock, http: aiohttp.ClientSession) -> None:
    await control(http, mock, fail_after_tokens=2, fail_code="503")
    body = {"messages": USER, "stream": True, "max_tokens": 9}
    # The mock closes the connection after an in-stream fault: keep it out of the shared pool.
    async with aiohttp.ClientSession() as own, own.post(f"{mock.url}{CHAT}", json=body) as resp:
        assert resp.status == 200
        events = (await resp.read()).split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""]
    chunks = [json.loads(event.removeprefix(b"data: ")) for event in events[:-2]]
    assert [list(c["choices"][0]["delta"]) for c in chunks[:3]] == [
        ["role", "content"],
        ["content"],
        ["content"],
    ]
    assert chunks[3]["error"]["code"] == 503 and chunks[3]["error"]["type"] == "unavailable_error"

    await control(http, mock, fail_after_tokens=0)
    error = (await post(http, f"{mock.url}{CHAT}", body, status=503))["error"]
    assert (error["code"], error["type"]) == (503, "unavailable_error")


@pytest.mark.parametrize(
    "body",
    [
        [],
        {},
        {"messages": []},
        {"messages": "hi"},
        {"messages": [{"content": "hi"}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": 3}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {"messages": [{"role": "user", "content": "hi", "tool_calls": []}]},
        {"messages": [{"role": "tool", "content": "x", "tool_call_id": 7}]},
        {"messages": USER, "max_tokens": "many"},
        {"messages": USER, "seed": 1.5},
        {"messages": USER, "stream": "yes"},
        {"messages": USER, "stream_options": True},
        {"messages": USER, "temperature": "hot"},
        {"messages": USER, "stop": [1]},
        {"messages": USER, "tools": {"name": "x"}},
        {"messages": USER, "tools": [{"type": "function", "function": {}}]},
        {"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
        {"messages": USER, "tools": TOOLS, "tool_choice": "always"},
        {"messages": USER, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"messages": USER, "response_format": {"type": "xml"}},
        {"messages": USER, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
    ],
)
async def test_bad_chat_bodies_are_400(mock: Mock, http: aiohttp.ClientSession, body: object) -> None:
    error = (await post(http, f"{mock.url}{CHAT}", body, status=400))["error"]
    assert error["code"] == 400 and error["type"] == "invalid_request_error" and error["message"]


async def test_unparseable_body_is_400(mock: Mock, http: aiohttp.ClientSession) -> None:
    async with http.post(f"{mock.url}{CHAT}", data=b"{not json") as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_embeddings(start_mock: StartMock, http: aiohttp.ClientSession) -> None:
    mock = await start_mock("--embeddings", "--alias", "emb")
    url = f"{mock.url}/v1/embeddings"
    body = await post(http, url, {"input": ["hello", "world"], "model": "whatever"})
    assert body["object"] == "list" and body["model"] == "emb"
    assert body["usage"] == {"prompt_tokens": 4, "total_tokens": 4}
    assert [(item["object"], item["index"]) for item in body["data"]] == [("embedding", 0), ("embedding", 1)]
    first, second = (item["embedding"] for item in body["data"])
    assert len(first) == 64 and first != second
    for vector in (first, second):
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-9)
    again = await post(http, f"{mock.url}/embeddings", {"input": "hello"})
    assert again["data"][0]["embedding"] == first and again["usage"]["prompt_tokens"] == 2

    await control(http, mock, embedding_dim=8)
    assert len((await post(http, url, {"input": "hello"}))["data"][0]["embedding"]) == 8
    models = await get_json(http, f"{mock.url}/v1/models")
    assert models["models"][0]["capabilities"] == ["completion", "embedding"]

    async with http.post(url, data=b"[") as resp:
        assert resp.status == 400
    bad_bodies: list[object] = [{}, {"input": []}, {"input": [1]}, {"input": ""}]
    for bad in [*bad_bodies, {"input": "x", "encoding_format": "hex"}]:
        error = (await post(http, url, bad, status=400))["error"]
        assert error["type"] == "invalid_request_error"


async def test_embedding_input_beyond_the_context(start_mock: StartMock, http: aiohttp.ClientSession) -> None:
    mock = await start_mock("--embedding", "-c", "16")
    error = (await post(http, f"{mock.url}/v1/embeddings", {"input": ["ok", "y" * 200]}, status=400))["error"]
    assert (error["type"], error["n_prompt_tokens"], error["n_ctx"]) == ("exceed_context_size_error", 50, 16)


async def test_embeddings_need_the_flag(mock: Mock, http: aiohttp.ClientSession) -> None:
    body = await post(http, f"{mock.url}/v1/embeddings", {"input": "hello"}, status=501)
    assert body == {
        "error": {
            "code": 501,
            "message": "This server does not support embeddings. Start it with `--embeddings`",
            "type": "not_supported_error",
        }
    }
    models = await get_json(http, f"{mock.url}/v1/models")
    assert models["models"][0]["capabilities"] == ["completion"]
    async with http.post(f"{mock.url}/mock/control", json={"embedding": True}) as resp:
        assert resp.status == 400
