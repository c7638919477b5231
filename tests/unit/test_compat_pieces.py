"""The compatible APIs' shared parts: events → pieces, assembled answers, and the error dialects."""

from __future__ import annotations

import pytest

from llorch import events
from llorch.errors import Code, OrchestratorError, invalid
from llorch.store import Event
from llorch_gateway.chat import Done, Failed, Result, Text, ToolCalls, Waiting, _pieces_of, waiting_comment
from llorch_gateway.dialects import Dialect, anthropic_error, dialect_of, error_body, openai_error


def test_events_become_pieces() -> None:
    assert list(_pieces_of(Event(0, "started", events.started("t", 2, 900, 1.0, "batch")))) == [
        Waiting(2, 900)
    ]
    queued = events.queued(queue_position=1, predicted_start_ms=400, queue_depth=3, on_time_probability=1.0)
    assert list(_pieces_of(Event(1, "metrics", queued))) == [Waiting(1, 400)]
    assert list(_pieces_of(Event(2, "token", events.token("hi", 0)))) == [Text("hi")]
    delta = [{"index": 0, "function": {"arguments": '{"a'}}]
    assert list(_pieces_of(Event(3, "token", events.token("", 1, delta)))) == [ToolCalls(delta)]
    end = events.end(
        tokens_out=2,
        decode_ms=5,
        tokens_in=7,
        queue_time_ms=0,
        first_token_ms=1,
        finish_reason="tool_calls",
        pool_id="p",
        replica_id="r",
    )
    assert list(_pieces_of(Event(4, "end", end))) == [Done("tool_calls", 7, 2)]
    error = events.error(OrchestratorError(Code.DECODE_TIMEOUT, "too slow", engine="mock"), 3)
    (failed,) = _pieces_of(Event(5, "error", error))
    assert isinstance(failed, Failed) and failed.error.code == Code.DECODE_TIMEOUT
    assert failed.error.context["engine"] == "mock" and failed.error.context["tokens_out"] == 3


def test_result_assembles_streamed_tool_calls_and_raises_failures() -> None:
    result = Result()
    result.add(ToolCalls([{"index": 0, "id": "call_1", "type": "function", "function": {"name": "f"}}]))
    result.add(ToolCalls([{"index": 0, "function": {"arguments": '{"x":'}}]))
    result.add(ToolCalls([{"index": 1, "id": "call_2", "function": {"name": "g", "arguments": "{}"}}]))
    result.add(ToolCalls([{"index": 0, "function": {"arguments": "1}"}}]))
    result.add(Done("tool_calls", 4, 4))
    assert result.tool_calls == [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"x":1}'}},
        {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    assert (result.finish_reason, result.prompt_tokens) == ("tool_calls", 4)
    with pytest.raises(OrchestratorError, match="gone"):
        result.add(Failed(OrchestratorError(Code.WORKER_RESET, "gone")))


def test_waiting_comment_says_where_the_task_stands() -> None:
    assert waiting_comment(Waiting(3, 1200)) == b": queued queue_position=3 predicted_start_ms=1200\n\n"
    assert waiting_comment(Waiting(0, 0, "running")) == b": keepalive\n\n"


@pytest.mark.parametrize(
    ("path", "dialect"),
    [
        ("/v1/chat/completions", Dialect.OPENAI),
        ("/v1/completions", Dialect.OPENAI),
        ("/v1/embeddings", Dialect.OPENAI),
        ("/v1/models", Dialect.OPENAI),
        ("/v1/responses", Dialect.OPENAI),
        ("/v1/messages", Dialect.ANTHROPIC),
        ("/v1/messages/count_tokens", Dialect.ANTHROPIC),
        ("/v1/tasks", Dialect.NATIVE),
        ("/v1/chatty", Dialect.NATIVE),
    ],
)
def test_the_route_picks_the_dialect(path: str, dialect: Dialect) -> None:
    assert dialect_of(path) == dialect


def test_error_shapes() -> None:
    overflow = invalid("max_tokens", "too long", context_length=2048, prompt_tokens=3000)
    body = openai_error(overflow)
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
    assert "2048" in str(body["message"]) and "3000" in str(body["message"])
    assert body["type"] == "invalid_request_error"
    limited = OrchestratorError(Code.ADMISSION_REJECT, "slow down", retry_after_ms=1500)
    assert openai_error(limited)["type"] == "rate_limit_error"
    assert openai_error(limited)["retry_after_ms"] == 1500
    assert openai_error(OrchestratorError(Code.WORKER_RESET, "x"))["type"] == "server_error"
    assert openai_error(OrchestratorError(Code.CANCELED, "x"))["type"] == "request_canceled"
    assert anthropic_error(OrchestratorError(Code.POOL_UNREADY, "x"))["error"] == {
        "type": "overloaded_error",
        "message": "x",
        "code": "POOL_UNREADY",
    }
    assert "prompt is too long" in str(anthropic_error(overflow)["error"])
    assert error_body(limited, Dialect.NATIVE) == limited.envelope()
