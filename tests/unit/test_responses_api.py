"""The Responses API (stateless subset): request conversion, the response object and the stream
events, checked against the official ``openai`` SDK (its types, and its client over a mocked
transport)."""

from __future__ import annotations

import json
from typing import Any

import httpx2
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from llorch.errors import Code, OrchestratorError
from llorch_gateway.chat import Done, Failed, Piece, Result, Text, ToolCalls, Waiting
from llorch_gateway.models import parse_model
from llorch_gateway.responses_api import (
    ResponseFrames,
    ResponseShape,
    ResponsesRequest,
    chat_body,
    chat_call,
    response_body,
    response_shape,
    stream_frames,
)

SHELL = {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}}}
SHELL_TOOL = {
    "type": "function",
    "name": "shell",
    "description": "Run a command",
    "strict": False,
    "parameters": SHELL,
}
EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def parse(data: dict[str, Any]) -> ResponsesRequest:
    return parse_model(ResponsesRequest, data)


def convert(data: dict[str, Any]) -> dict[str, object]:
    return chat_body(parse(data))


def request(**fields: Any) -> dict[str, Any]:
    return {"model": "m", "input": "hi", **fields}


def shape(**fields: Any) -> ResponseShape:
    return response_shape(parse(request(**fields)), "t1", 1_700_000_000)


def sse(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for frame in body.decode().split("\n\n"):
        lines = [line for line in frame.split("\n") if line and not line.startswith(":")]
        if lines:
            events.append((lines[0].removeprefix("event: "), json.loads(lines[1].removeprefix("data: "))))
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


def result_of(pieces: list[Piece]) -> Result:
    result = Result()
    for piece in pieces:
        result.add(piece)
    return result


TOOL_TURN: list[Piece] = [
    Waiting(2, 800),
    Text("Listing "),
    Text("files."),
    tool_call(0, "call_a", "shell"),
    arguments(0, '{"command":'),
    arguments(0, ' ["ls"]}'),
    Done("tool_calls", 30, 12),
]


# --- request conversion ---------------------------------------------------------------------------


def test_a_codex_style_conversation_becomes_the_openai_chat_body() -> None:
    body = convert(
        {
            "model": "m",
            "instructions": "You are a coding agent.",
            "input": [
                {
                    "type": "message",
                    "role": "developer",
                    "content": [{"type": "input_text", "text": "Sandbox: on."}],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "<env>"},
                        {"type": "input_text", "text": "List files"},
                    ],
                },
                {"type": "reasoning", "id": "rs_1", "summary": []},
                {
                    "type": "message",
                    "role": "assistant",
                    "content": [{"type": "output_text", "text": "Sure."}],
                },
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "name": "shell",
                    "arguments": '{"command":["ls"]}',
                },
                {
                    "type": "function_call",
                    "call_id": "call_2",
                    "name": "shell",
                    "arguments": '{"command":["pwd"]}',
                },
                {"type": "function_call_output", "call_id": "call_1", "output": "a.py"},
                {
                    "type": "function_call_output",
                    "call_id": "call_2",
                    "output": [{"type": "input_text", "text": "/w"}],
                },
                {"role": "developer", "content": "Later note."},
            ],
            "tools": [SHELL_TOOL],
            "tool_choice": "auto",
            "parallel_tool_calls": False,
            "temperature": 0.3,
            "top_p": 0.95,
            "max_output_tokens": 500,
            "store": False,
            "stream": True,
            "reasoning": {"effort": "medium"},
            "include": ["reasoning.encrypted_content"],
            "prompt_cache_key": "abc",
        }
    )
    assert body == {
        "messages": [
            {"role": "system", "content": "You are a coding agent.\n\nSandbox: on."},
            {"role": "user", "content": "<env>\n\nList files"},
            {
                "role": "assistant",
                "content": "Sure.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "shell", "arguments": '{"command":["ls"]}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "shell", "arguments": '{"command":["pwd"]}'},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "a.py"},
            {"role": "tool", "tool_call_id": "call_2", "content": "/w"},
            {"role": "system", "content": "Later note."},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "shell",
                    "parameters": SHELL,
                    "description": "Run a command",
                    "strict": False,
                },
            }
        ],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "temperature": 0.3,
        "top_p": 0.95,
    }


def test_a_string_input_is_one_user_message() -> None:
    assert convert(request()) == {"messages": [{"role": "user", "content": "hi"}]}


def test_a_function_call_with_no_assistant_text_opens_an_assistant_message() -> None:
    body = convert(
        request(
            input=[
                {"role": "user", "content": "go"},
                {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
            ]
        )
    )
    messages = body["messages"]
    assert isinstance(messages, list)
    assert messages[1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ({"format": {"type": "text"}, "verbosity": "low"}, None),
        ({"format": {"type": "json_object"}}, {"type": "json_object"}),
        (
            {
                "format": {
                    "type": "json_schema",
                    "name": "answer",
                    "schema": {"type": "object"},
                    "strict": True,
                }
            },
            {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
            },
        ),
    ],
)
def test_text_format_becomes_response_format(text: dict[str, Any], expected: object) -> None:
    assert convert(request(text=text)).get("response_format") == expected


def test_a_named_tool_choice_maps_to_openai_chat() -> None:
    body = convert(request(tools=[SHELL_TOOL], tool_choice={"type": "function", "name": "shell"}))
    assert body["tool_choice"] == {"type": "function", "function": {"name": "shell"}}


def test_chat_call_admits_a_chat_with_max_output_tokens() -> None:
    call = chat_call(parse(request(max_output_tokens=77)))
    assert (call.model, call.workload, call.max_tokens) == ("m", "chat", 77)
    assert chat_call(parse(request())).max_tokens is None


@pytest.mark.parametrize(
    ("fields", "field", "words"),
    [
        ({"model": 5}, "model", "valid string"),
        ({"input": 5}, "input", "valid list"),
        ({"input": []}, "input", "at least 1"),
        (
            {"input": [{"role": "tool", "content": "x"}]},
            "input.0.message.role",
            "'user', 'assistant', 'system' or 'developer'",
        ),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
            "input.0.message.content",
            "input_image parts are not supported",
        ),
        (
            {"input": [{"type": "item_reference", "id": "msg_1"}]},
            "input",
            "item_reference items are not supported",
        ),
        (
            {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
            "input.0.function_call.call_id",
            "required",
        ),
        (
            {"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]},
            "input.0.function_call_output.output",
            "valid list",
        ),
        ({"tools": [{"type": "web_search"}]}, "tools.0", "'web_search'"),
        ({"tools": [{"type": "custom", "name": "apply_patch"}]}, "tools.0", "'custom'"),
        ({"tool_choice": "any"}, "tool_choice", "auto, none, required"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice", "'file_search'"),
        ({"store": True}, "store", "stateless"),
        ({"previous_response_id": "resp_1"}, "previous_response_id", "stateless"),
        ({"background": True}, "background", "not supported"),
        ({"max_output_tokens": 0}, "max_output_tokens", "greater than or equal to 1"),
        ({"temperature": 3}, "temperature", "less than or equal to 2"),
        ({"stream": 1}, "stream", "valid boolean"),
        (
            {"text": {"format": {"type": "yaml"}}},
            "text.format.type",
            "'text', 'json_object' or 'json_schema'",
        ),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema", "needs schema"),
        (
            {"tool_choice": {"type": "function", "name": "nope"}, "tools": [SHELL_TOOL]},
            "tool_choice.name",
            "not in tools",
        ),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ],
)
def test_bad_requests_are_invalid_params_naming_the_field(
    fields: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(OrchestratorError) as caught:
        convert(request(**fields))
    assert caught.value.code == Code.INVALID_PARAMS
    assert caught.value.context["field"] == field
    assert words in caught.value.message


def test_store_false_is_accepted() -> None:
    assert convert(request(store=False)) == {"messages": [{"role": "user", "content": "hi"}]}


# --- the non-streamed answer ----------------------------------------------------------------------


def test_the_response_body_is_an_sdk_response() -> None:
    body = response_body(shape(tools=[SHELL_TOOL], instructions="Be brief."), result_of(TOOL_TURN))
    response = Response.model_validate(body)
    assert (response.id, response.object, response.status, response.model) == (
        "resp_t1",
        "response",
        "completed",
        "m",
    )
    assert response.created_at == 1_700_000_000
    assert response.incomplete_details is None
    assert response.output_text == "Listing files."
    assert [item.model_dump(exclude_none=True) for item in response.output] == [
        {
            "type": "message",
            "id": "msg_t1_0",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Listing files.", "annotations": []}],
        },
        {
            "type": "function_call",
            "id": "fc_t1_1",
            "call_id": "call_a",
            "name": "shell",
            "arguments": '{"command": ["ls"]}',
            "status": "completed",
        },
    ]
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (
        30,
        12,
        42,
    )
    assert response.tools[0].type == "function" and response.tools[0].name == "shell"
    assert (response.tool_choice, response.instructions, response.parallel_tool_calls) == (
        "auto",
        "Be brief.",
        True,
    )


def test_a_response_cut_by_max_output_tokens_is_incomplete() -> None:
    body = response_body(shape(max_output_tokens=5), result_of([Text("abc"), Done("length", 3, 5)]))
    response = Response.model_validate(body)
    assert response.status == "incomplete"
    assert (
        response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    )
    assert response.output[0].status == "incomplete"
    assert response.max_output_tokens == 5


# --- the stream -----------------------------------------------------------------------------------


def test_the_stream_follows_the_responses_event_sequence() -> None:
    body = stream_frames(ResponseFrames(shape()), TOOL_TURN)
    assert b": queued queue_position=2 predicted_start_ms=800\n\n" in body
    events = sse(body)
    assert [(name, data.get("output_index")) for name, data in events] == [
        ("response.created", None),
        ("response.in_progress", None),
        ("response.output_item.added", 0),
        ("response.content_part.added", 0),
        ("response.output_text.delta", 0),
        ("response.output_text.delta", 0),
        ("response.output_text.done", 0),
        ("response.content_part.done", 0),
        ("response.output_item.done", 0),
        ("response.output_item.added", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.delta", 1),
        ("response.function_call_arguments.done", 1),
        ("response.output_item.done", 1),
        ("response.completed", None),
    ]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    for name, data in events:
        assert data["type"] == name
        EVENTS.validate_python(data)
    assert events[0][1]["response"]["status"] == "in_progress"
    assert events[6][1]["text"] == "Listing files."
    assert events[9][1]["item"] == {
        "type": "function_call",
        "id": "fc_t1_1",
        "call_id": "call_a",
        "name": "shell",
        "arguments": "",
        "status": "in_progress",
    }
    assert events[12][1]["arguments"] == '{"command": ["ls"]}'
    final = events[-1][1]["response"]
    assert final == response_body(shape(), result_of(TOOL_TURN))


def test_a_streamed_response_cut_by_max_output_tokens_ends_incomplete() -> None:
    events = sse(stream_frames(ResponseFrames(shape()), [Text("ab"), Done("length", 1, 2)]))
    name, data = events[-1]
    assert name == "response.incomplete"
    assert data["response"]["status"] == "incomplete"
    assert data["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2][1]["item"]["status"] == "incomplete"
    EVENTS.validate_python(data)


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (OrchestratorError(Code.WORKER_RESET, "engine died"), "server_error"),
        (OrchestratorError(Code.QUEUE_FULL_DROP_LRU, "dropped"), "rate_limit_exceeded"),
        (OrchestratorError(Code.INVALID_PARAMS, "bad", field="messages"), "invalid_prompt"),
    ],
)
def test_a_failure_is_response_failed_and_nothing_follows(error: OrchestratorError, code: str) -> None:
    frames = ResponseFrames(shape())
    events = sse(stream_frames(frames, [Text("par"), Failed(error)]))
    assert frames.ended and frames.feed(Text("more")) == b""
    name, data = events[-1]
    assert name == "response.failed"
    assert data["response"]["status"] == "failed"
    assert data["response"]["error"] == {"code": code, "message": error.message}
    EVENTS.validate_python(data)


def test_a_context_overflow_fails_with_the_code_codex_looks_for() -> None:
    overflow = OrchestratorError(
        Code.INVALID_PARAMS, "too long", field="prompt", context_length=4096, prompt_tokens=5000
    )
    events = sse(stream_frames(ResponseFrames(shape()), [Failed(overflow)]))
    error = events[-1][1]["response"]["error"]
    assert error["code"] == "context_length_exceeded"
    assert "4096" in error["message"]


def test_a_keepalive_is_a_comment() -> None:
    assert ResponseFrames(shape()).feed(Waiting(0, 0, "running")) == b": keepalive\n\n"


# --- the official SDK as the client ---------------------------------------------------------------


def sdk(body: bytes, content_type: str) -> openai.OpenAI:
    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=body, headers={"content-type": content_type})

    transport = httpx2.MockTransport(answer)
    return openai.OpenAI(
        api_key="k",
        base_url="http://gateway/v1",
        http_client=httpx2.Client(transport=transport),
        max_retries=0,
    )


def test_the_sdk_stream_helper_assembles_the_response() -> None:
    client = sdk(stream_frames(ResponseFrames(shape()), TOOL_TURN), "text/event-stream")
    with client.responses.stream(model="m", input="list files") as stream:
        deltas = [event.delta for event in stream if event.type == "response.output_text.delta"]
        response = stream.get_final_response()
    assert "".join(deltas) == "Listing files."
    assert response.output_text == "Listing files."
    call = response.output[1]
    assert call.type == "function_call"
    assert (call.call_id, call.name, json.loads(call.arguments)) == ("call_a", "shell", {"command": ["ls"]})


def test_the_sdk_parses_the_response_body() -> None:
    body = json.dumps(response_body(shape(), result_of(TOOL_TURN))).encode()
    response = sdk(body, "application/json").responses.create(model="m", input="list files")
    assert response.status == "completed"
    assert response.output_text == "Listing files."
