"""Anthropic's Messages API: request conversion, the message body and the stream events, checked
against the official ``anthropic`` SDK (its types, and its client over a mocked transport)."""

from __future__ import annotations

import json
import math
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.types import Message, RawMessageStreamEvent
from pydantic import TypeAdapter

from llorch.errors import Code, OrchestratorError
from llorch_gateway.anthropic_api import (
    CountTokensRequest,
    MessageFrames,
    MessagesRequest,
    chat_body,
    chat_call,
    message_body,
    prompt_estimate,
    stream_frames,
)
from llorch_gateway.chat import Done, Failed, Piece, Result, Text, ToolCalls, Waiting
from llorch_gateway.models import parse_model

WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
EVENTS: TypeAdapter[Any] = TypeAdapter(RawMessageStreamEvent)


def convert(data: dict[str, Any]) -> dict[str, object]:
    return chat_body(parse_model(MessagesRequest, data))


def request(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **fields}


def sse(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) of each event in a stream body; comments skipped."""
    events = []
    for frame in body.decode().split("\n\n"):
        lines = [line for line in frame.split("\n") if line and not line.startswith(":")]
        if lines:
            name = lines[0].removeprefix("event: ")
            events.append((name, json.loads(lines[1].removeprefix("data: "))))
    return events


def tool_call(index: int, call_id: str, name: str, arguments: str = "") -> ToolCalls:
    return ToolCalls(
        [
            {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        ]
    )


def arguments(index: int, text: str) -> ToolCalls:
    return ToolCalls([{"index": index, "function": {"arguments": text}}])


TOOL_TURN: list[Piece] = [
    Waiting(3, 1200),
    Text("Let me "),
    Text("check."),
    tool_call(0, "call_a", "weather"),
    arguments(0, '{"city":'),
    arguments(0, ' "Oslo"}'),
    tool_call(1, "call_b", "weather", '{"city": "Rome"}'),
    Done("tool_calls", 42, 17),
]


# --- request conversion ---------------------------------------------------------------------------


def test_a_whole_tool_conversation_becomes_the_openai_chat_body() -> None:
    body = convert(
        request(
            system=[
                {"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "Use tools."},
            ],
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "<reminder>"}, {"type": "text", "text": "Weather?"}],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "s"},
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
                        {"type": "tool_use", "id": "toolu_2", "name": "weather", "input": {"city": "Rome"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "content": [{"type": "text", "text": "no data"}],
                            "is_error": True,
                        },
                        {"type": "text", "text": "And tomorrow?"},
                    ],
                },
            ],
            tools=[
                {
                    "name": "weather",
                    "description": "The weather",
                    "input_schema": WEATHER,
                    "cache_control": {"type": "ephemeral"},
                }
            ],
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            stop_sequences=["END"],
            temperature=0.2,
            top_p=0.9,
            top_k=20,
            metadata={"user_id": "u1"},
            thinking={"type": "disabled"},
            service_tier="auto",
        )
    )
    assert body == {
        "messages": [
            {"role": "system", "content": "Be brief.\n\nUse tools."},
            {"role": "user", "content": "<reminder>\n\nWeather?"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                    },
                    {
                        "id": "toolu_2",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Rome"}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: no data"},
            {"role": "user", "content": "And tomorrow?"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {"name": "weather", "parameters": WEATHER, "description": "The weather"},
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "stop": ["END"],
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 20,
    }


def test_a_plain_request_carries_only_its_messages() -> None:
    assert convert(request(system="Be brief.")) == {
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    }


def test_an_assistant_turn_of_only_tool_calls_has_null_content() -> None:
    body = convert(
        request(
            messages=[
                {"role": "user", "content": "go"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t"}]},
            ],
            tools=[{"name": "f", "input_schema": {"type": "object"}}],
        )
    )
    messages = body["messages"]
    assert isinstance(messages, list)
    assert messages[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "t", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }
    assert messages[2:] == [{"role": "tool", "tool_call_id": "t", "content": ""}]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        ({"type": "any"}, "required"),
        ({"type": "tool", "name": "f"}, {"type": "function", "function": {"name": "f"}}),
    ],
)
def test_tool_choice_maps_to_openai(choice: dict[str, str], expected: object) -> None:
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    assert convert(request(tools=tools, tool_choice=choice))["tool_choice"] == expected


def test_chat_call_admits_a_chat_with_max_tokens() -> None:
    call = chat_call(parse_model(MessagesRequest, request(max_tokens=300)))
    assert (call.model, call.workload, call.max_tokens) == ("m", "chat", 300)
    assert call.body == {"messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"max_tokens": ...}, "max_tokens", "required"),
        ({"max_tokens": "10"}, "max_tokens", "valid integer"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role", "'user' or 'assistant'"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "valid list"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
            "messages.0.content",
            "image blocks are not supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
            "messages.0.content",
            "document blocks are not supported",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image"}]}
                        ],
                    }
                ]
            },
            "messages.0.content.0.tool_result.content",
            "image blocks are not supported",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
            "messages.0.content.0.text.text",
            "required",
        ),
        ({"system": [{"type": "image"}]}, "system", "image blocks are not supported"),
        (
            {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
            "tools.0",
            "'web_search_20250305'",
        ),
        ({"tools": [{"name": "f"}]}, "tools.0.input_schema", "required"),
        ({"tool_choice": {"type": "some"}}, "tool_choice.type", "'auto', 'any', 'tool' or 'none'"),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking", "thinking is not supported"),
        ({"temperature": 1.5}, "temperature", "less than or equal to 1"),
        ({"temperature": True}, "temperature", "valid number"),
        ({"stop_sequences": "END"}, "stop_sequences", "valid list"),
        ({"stream": "yes"}, "stream", "valid boolean"),
    ],
)
def test_bad_requests_are_invalid_params_naming_the_field(
    fields: dict[str, Any], field: str, words: str
) -> None:
    data = {key: value for key, value in request(**fields).items() if value is not ...}  # ...: left out
    with pytest.raises(OrchestratorError) as caught:
        convert(data)
    assert caught.value.code == Code.INVALID_PARAMS
    assert caught.value.context["field"] == field
    assert words in caught.value.message


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        (
            {"tool_choice": {"type": "tool"}, "tools": [{"name": "f", "input_schema": {}}]},
            "tool_choice.name",
            "needs name",
        ),
        (
            {"tool_choice": {"type": "tool", "name": "g"}, "tools": [{"name": "f", "input_schema": {}}]},
            "tool_choice.name",
            "not in tools",
        ),
        ({"tool_choice": {"type": "any"}}, "tool_choice", "needs tools"),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}
                ]
            },
            "messages.0.content",
            "tool_use blocks belong in assistant messages",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]},
            "messages.0.content",
            "tool_result blocks belong in user messages",
        ),
    ],
)
def test_requests_that_do_not_fit_together_are_invalid_params(
    fields: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(OrchestratorError) as caught:
        convert(request(**fields))
    assert caught.value.code == Code.INVALID_PARAMS
    assert caught.value.context["field"] == field
    assert words in caught.value.message


def test_count_tokens_is_admissions_estimate_of_the_converted_body() -> None:
    req = parse_model(CountTokensRequest, {"model": "m", "messages": [{"role": "user", "content": "héllo"}]})
    body = chat_body(req)
    compact = json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()
    assert prompt_estimate(body) == math.ceil(len(compact) / 4) == 13  # 49 bytes ("é" is two)


def test_text_that_cannot_be_encoded_is_invalid_params() -> None:
    body = convert(request(messages=[{"role": "user", "content": "\ud800"}]))
    with pytest.raises(OrchestratorError) as caught:
        prompt_estimate(body)
    assert caught.value.code == Code.INVALID_PARAMS


# --- the non-streamed answer ----------------------------------------------------------------------


def result_of(pieces: list[Piece]) -> Result:
    result = Result()
    for piece in pieces:
        result.add(piece)
    return result


def test_the_message_body_is_an_sdk_message_with_text_then_tool_use() -> None:
    body = message_body("msg_t1", "m", result_of(TOOL_TURN))
    message = Message.model_validate(body)
    assert message.id == "msg_t1"
    assert message.stop_reason == "tool_use"
    assert message.stop_sequence is None
    assert (message.usage.input_tokens, message.usage.output_tokens) == (42, 17)
    assert [block.model_dump(exclude_none=True) for block in message.content] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_a", "name": "weather", "input": {"city": "Oslo"}},
        {"type": "tool_use", "id": "call_b", "name": "weather", "input": {"city": "Rome"}},
    ]


@pytest.mark.parametrize(
    ("pieces", "stop_reason"),
    [
        ([Text("x"), Done("stop", 1, 1)], "end_turn"),
        ([Text("x"), Done("length", 1, 1)], "max_tokens"),
        ([tool_call(0, "c", "f", "{}"), Done("stop", 1, 1)], "tool_use"),  # an engine that says stop
    ],
)
def test_stop_reasons(pieces: list[Piece], stop_reason: str) -> None:
    assert message_body("msg_t", "m", result_of(pieces))["stop_reason"] == stop_reason
    assert (
        sse(stream_frames(MessageFrames("msg_t", "m", 1), pieces))[-2][1]["delta"]["stop_reason"]
        == stop_reason
    )


def test_a_tool_call_cut_by_max_tokens_has_empty_input() -> None:
    body = message_body(
        "msg_t", "m", result_of([tool_call(0, "c", "f", '{"city": "Os'), Done("length", 1, 9)])
    )
    assert Message.model_validate(body).content[0].model_dump(exclude_none=True) == {
        "type": "tool_use",
        "id": "c",
        "name": "f",
        "input": {},
    }
    assert body["stop_reason"] == "max_tokens"


def test_a_finished_tool_call_with_broken_arguments_is_an_internal_error() -> None:
    with pytest.raises(OrchestratorError) as caught:
        message_body("msg_t", "m", result_of([tool_call(0, "c", "f", "[1, 2]"), Done("tool_calls", 1, 9)]))
    assert caught.value.code == Code.INTERNAL


def test_a_tool_call_without_an_id_gets_one() -> None:
    pieces: list[Piece] = [
        ToolCalls([{"index": 0, "function": {"name": "f", "arguments": "{}"}}]),
        Done("tool_calls", 1, 1),
    ]
    assert message_body("msg_t", "m", result_of(pieces))["content"] == [
        {"type": "tool_use", "id": "toolu_msg_t_0", "name": "f", "input": {}}
    ]
    starts = [
        data
        for name, data in sse(stream_frames(MessageFrames("msg_t", "m", 1), pieces))
        if name == "content_block_start"
    ]
    assert starts[0]["content_block"]["id"] == "toolu_msg_t_0"


# --- the stream -----------------------------------------------------------------------------------


def test_the_stream_follows_anthropics_event_sequence() -> None:
    body = stream_frames(MessageFrames("msg_t1", "m", 7), TOOL_TURN)
    assert b": queued queue_position=3 predicted_start_ms=1200\n\n" in body
    events = sse(body)
    assert [(name, data.get("index")) for name, data in events] == [
        ("message_start", None),
        ("ping", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("message_delta", None),
        ("message_stop", None),
    ]
    for name, data in events:
        assert data["type"] == name
        if name != "ping":
            EVENTS.validate_python(data)
    start = events[0][1]["message"]
    assert (start["id"], start["usage"], start["stop_reason"]) == (
        "msg_t1",
        {"input_tokens": 7, "output_tokens": 0},
        None,
    )
    assert events[2][1]["content_block"] == {"type": "text", "text": ""}
    assert events[6][1]["content_block"] == {
        "type": "tool_use",
        "id": "call_a",
        "name": "weather",
        "input": {},
    }
    assert events[7][1]["delta"] == {"type": "input_json_delta", "partial_json": '{"city":'}
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"input_tokens": 42, "output_tokens": 17},
    }


def test_text_after_a_tool_call_opens_a_new_block() -> None:
    pieces: list[Piece] = [tool_call(0, "c", "f", "{}"), Text("done"), Done("stop", 1, 2)]
    events = sse(stream_frames(MessageFrames("msg_t", "m", 1), pieces))
    assert [(name, data.get("index")) for name, data in events][1:6] == [
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
    ]


def test_an_empty_answer_has_no_blocks() -> None:
    events = sse(stream_frames(MessageFrames("msg_t", "m", 1), [Text(""), Done("stop", 1, 0)]))
    assert [name for name, _ in events] == ["message_start", "message_delta", "message_stop"]


def test_a_failure_is_an_error_event_and_nothing_follows() -> None:
    frames = MessageFrames("msg_t", "m", 1)
    failure = Failed(OrchestratorError(Code.POOL_UNREADY, "no pool", retry_after_ms=500))
    body = stream_frames(frames, [Text("par"), failure])
    assert frames.ended
    assert frames.feed(Text("more")) == b"" and frames.feed(Done("stop", 1, 1)) == b""
    name, data = sse(body)[-1]
    assert name == "error"
    assert data == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "no pool", "code": "POOL_UNREADY"},
    }


def test_a_keepalive_is_a_comment_and_a_ping() -> None:
    assert MessageFrames("msg_t", "m", 1).feed(Waiting(0, 0, "running")) == (
        b': keepalive\n\nevent: ping\ndata: {"type":"ping"}\n\n'
    )


# --- the official SDK as the client ---------------------------------------------------------------


def sdk(body: bytes, content_type: str) -> anthropic.Anthropic:
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": content_type})

    transport = httpx2.MockTransport(answer)
    return anthropic.Anthropic(
        api_key="k", base_url="http://gateway", http_client=httpx2.Client(transport=transport), max_retries=0
    )


ASK: dict[str, Any] = {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "weather?"}]}


def test_the_sdk_stream_helper_assembles_the_message() -> None:
    client = sdk(stream_frames(MessageFrames("msg_t1", "m", 7), TOOL_TURN), "text/event-stream")
    with client.messages.stream(**ASK) as stream:
        texts = list(stream.text_stream)
        message = stream.get_final_message()
    assert "".join(texts) == "Let me check."
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (42, 17)
    assert [block.model_dump(exclude_none=True) for block in message.content] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_a", "name": "weather", "input": {"city": "Oslo"}},
        {"type": "tool_use", "id": "call_b", "name": "weather", "input": {"city": "Rome"}},
    ]
    whole = Message.model_validate(message_body("msg_t1", "m", result_of(TOOL_TURN)))
    assert message.model_dump(exclude_none=True) == whole.model_dump(exclude_none=True)


def test_the_sdk_raises_the_streamed_error() -> None:
    failure = Failed(OrchestratorError(Code.INTERNAL, "engine died"))
    client = sdk(stream_frames(MessageFrames("msg_t", "m", 1), [Text("x"), failure]), "text/event-stream")
    with pytest.raises(anthropic.APIStatusError) as caught:
        list(client.messages.create(**ASK, stream=True))
    assert caught.value.body == {
        "type": "error",
        "error": {"type": "api_error", "message": "engine died", "code": "INTERNAL"},
    }


def test_the_sdk_parses_the_message_body() -> None:
    body = json.dumps(message_body("msg_t1", "m", result_of(TOOL_TURN))).encode()
    message = sdk(body, "application/json").messages.create(**ASK)
    assert message.content[1].type == "tool_use"
    assert message.content[1].input == {"city": "Oslo"}
