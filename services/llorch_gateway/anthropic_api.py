"""Anthropic's Messages API (``POST /v1/messages``, ``POST /v1/messages/count_tokens``) on the chat path.

Enough of it for Claude Code and the ``anthropic`` SDK. A request becomes an OpenAI chat body
(:func:`chat_body`) admitted through the one queue (:class:`.chat.ChatRunner`); the answer's pieces
become a ``message`` (:func:`message_body`) or Anthropic's stream events (:class:`MessageFrames`).

- **Honoured**: ``model``, ``max_tokens``, ``messages`` (``text``, ``tool_use`` and ``tool_result``
  blocks), ``system``, ``stop_sequences`` (→ ``stop``), ``temperature``, ``top_p``, ``top_k`` (passed
  to the engine as ``top_k``, which llama-server's and vLLM's chat endpoints take), ``stream``, custom
  ``tools``, ``tool_choice`` (``auto``, ``any`` → ``required``, ``tool`` → a named function, ``none``;
  ``disable_parallel_tool_use`` → ``parallel_tool_calls: false``).
- **Ignored**: ``metadata`` (only a user id), ``cache_control`` on any block (the engine's KV cache
  is the prompt cache), ``thinking``/``redacted_thinking`` blocks of earlier assistant turns (Anthropic
  drops them from the context too), and top-level fields this API does not know.
- **Refused** (400 naming the field): image, document and any other block type, server tools (web
  search, bash, text editor...), ``thinking`` other than ``disabled``.
- **Not reported**: which stop sequence ended a turn (engines do not say: ``end_turn``, and
  ``stop_sequence`` is always null); cache usage.

Converting: ``system`` → a system message; an assistant's ``tool_use`` blocks → its ``tool_calls``
(``input`` as the ``arguments`` JSON); a user's ``tool_result`` blocks → ``tool`` messages, before
the user's text (Anthropic puts them first); an ``is_error`` result's text starts ``Error: ``.
Text blocks of a user message are joined with a blank line, an assistant's with nothing.

Streams start with ``message_start`` at once; while the task waits, each queue change or keepalive
is an SSE comment with the queue position and an ``event: ping``. A run-time failure is
``event: error`` with Anthropic's error body. ``X-Task-Id`` names the task on every answer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from typing import Annotated, Final, Literal

from aiohttp import web
from pydantic import BeforeValidator, Field, StringConstraints, model_validator

from llorch.errors import Code, OrchestratorError, invalid

from .chat import (
    ChatCall,
    ChatRunner,
    Done,
    Failed,
    FinishReason,
    Lenient,
    Piece,
    Result,
    Text,
    ToolCalls,
    Waiting,
    call_fields,
    json_response,
    waiting_comment,
)
from .dialects import anthropic_error
from .models import parse_json_object, parse_model

Model = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Unit = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]

_MESSAGE_BLOCKS: Final = frozenset({"text", "tool_use", "tool_result", "thinking", "redacted_thinking"})
_TEXT_ONLY: Final = frozenset({"text"})
_STOP_REASONS: Final[dict[FinishReason, str]] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
}


def _blocks(kinds: frozenset[str]) -> Callable[[object], object]:
    """A string becomes one text block; a block of a type not in ``kinds`` is refused by name."""

    def check(value: object) -> object:
        if isinstance(value, str):
            return [{"type": "text", "text": value}]
        if isinstance(value, list):
            for item in value:
                kind = item.get("type") if isinstance(item, dict) else None
                if isinstance(kind, str) and kind not in kinds:
                    allowed = ", ".join(sorted(kinds - {"thinking", "redacted_thinking"}))
                    raise ValueError(f"{kind} blocks are not supported here (only {allowed})")
        return value

    return check


class TextBlock(Lenient):
    type: Literal["text"]
    text: str


class ToolUseBlock(Lenient):
    type: Literal["tool_use"]
    id: Name
    name: Name
    input: dict[str, object]


class ToolResultBlock(Lenient):
    type: Literal["tool_result"]
    tool_use_id: Name
    content: Annotated[list[TextBlock], BeforeValidator(_blocks(_TEXT_ONLY))] = []
    is_error: bool = False


class ThinkingBlock(Lenient):
    type: Literal["thinking", "redacted_thinking"]


Block = Annotated[TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock, Field(discriminator="type")]


class Message(Lenient):
    role: Literal["user", "assistant"]
    content: Annotated[list[Block], BeforeValidator(_blocks(_MESSAGE_BLOCKS))]


class Tool(Lenient):
    type: Literal["custom"] | None = None
    name: Name
    description: str | None = None
    input_schema: dict[str, object]

    @model_validator(mode="before")
    @classmethod
    def _custom_only(cls, data: object) -> object:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind not in (None, "custom"):
            raise ValueError(
                f"tools of type {kind!r} are not supported (only custom tools: name, description, "
                "input_schema)"
            )
        return data


class ToolChoice(Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: Name | None = None
    disable_parallel_tool_use: bool | None = None


class Thinking(Lenient):
    type: str

    @model_validator(mode="after")
    def _disabled_only(self) -> Thinking:
        if self.type != "disabled":
            raise ValueError("extended thinking is not supported: leave thinking out or send type disabled")
        return self


class CountTokensRequest(Lenient):
    """What ``count_tokens`` takes: the prompt's part of a Messages request."""

    model: Model
    messages: Annotated[list[Message], Field(min_length=1)]
    system: Annotated[list[TextBlock] | None, BeforeValidator(_blocks(_TEXT_ONLY))] = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[int, Field(ge=1, le=1_048_576)]
    stop_sequences: list[str] | None = None
    temperature: Unit | None = None
    top_p: Unit | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    stream: bool = False
    metadata: dict[str, object] | None = None  # a user id for Anthropic's abuse checks; not used


def chat_body(req: CountTokensRequest) -> dict[str, object]:
    """The OpenAI chat request body the engine gets for ``req``; INVALID_PARAMS where the messages
    or the tool choice do not fit together."""
    messages: list[dict[str, object]] = []
    if req.system and (system := "\n\n".join(block.text for block in req.system)):
        messages.append({"role": "system", "content": system})
    for index, message in enumerate(req.messages):
        if message.role == "user":
            messages.extend(_user(message.content, index))
        else:
            messages.append(_assistant(message.content, index))
    body: dict[str, object] = {"messages": messages}
    if req.tools:
        body["tools"] = [_tool(tool) for tool in req.tools]
    if req.tool_choice is not None:
        body.update(_tool_choice(req.tool_choice, req.tools or []))
    if isinstance(req, MessagesRequest):
        if req.stop_sequences:
            body["stop"] = req.stop_sequences
        for name in ("temperature", "top_p", "top_k"):
            if (value := getattr(req, name)) is not None:
                body[name] = value
    return body


def chat_call(req: MessagesRequest) -> ChatCall:
    """What to admit for ``req``: a chat of at most ``max_tokens``."""
    return ChatCall(model=req.model, workload="chat", body=chat_body(req), max_tokens=req.max_tokens)


def prompt_estimate(body: dict[str, object]) -> int:
    """SPEC §2.2's ``prompt_est`` of a chat, as admission computes it: ceil(UTF-8 bytes of the body's
    compact JSON / 4). An estimate, not the model's tokenizer count. Also refuses text that cannot
    be encoded (lone surrogates from ``\\ud800`` escapes), which admission could not send."""
    try:
        size = len(json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode())
    except UnicodeEncodeError:
        raise invalid("messages", "text must be valid Unicode (no lone surrogates)") from None
    return math.ceil(size / 4)


def _user(blocks: list[Block], index: int) -> list[dict[str, object]]:
    results: list[dict[str, object]] = []
    texts: list[str] = []
    for block in blocks:
        if isinstance(block, ToolResultBlock):
            text = "\n\n".join(part.text for part in block.content)
            content = f"Error: {text}" if block.is_error else text
            results.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": content})
        elif isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            raise invalid(f"messages.{index}.content", "tool_use blocks belong in assistant messages")
    if texts or not results:
        results.append({"role": "user", "content": "\n\n".join(texts)})
    return results


def _assistant(blocks: list[Block], index: int) -> dict[str, object]:
    texts: list[str] = []
    calls: list[dict[str, object]] = []
    for block in blocks:
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            arguments = json.dumps(block.input, ensure_ascii=False)
            calls.append(
                {"id": block.id, "type": "function", "function": {"name": block.name, "arguments": arguments}}
            )
        elif isinstance(block, ToolResultBlock):
            raise invalid(f"messages.{index}.content", "tool_result blocks belong in user messages")
    message: dict[str, object] = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
    }
    if calls:
        message["tool_calls"] = calls
    return message


def _tool(tool: Tool) -> dict[str, object]:
    function: dict[str, object] = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _tool_choice(choice: ToolChoice, tools: list[Tool]) -> dict[str, object]:
    fields: dict[str, object] = {}
    if choice.type in ("any", "tool") and not tools:
        raise invalid("tool_choice", f"tool_choice {choice.type} needs tools")
    if choice.type == "tool":
        if choice.name is None:
            raise invalid("tool_choice.name", "tool_choice of type tool needs name")
        if choice.name not in {tool.name for tool in tools}:
            raise invalid("tool_choice.name", f"tool_choice names {choice.name!r}, which is not in tools")
        fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        fields["tool_choice"] = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    if choice.disable_parallel_tool_use:
        fields["parallel_tool_calls"] = False
    return fields


def _stop_reason(finish_reason: FinishReason, called: bool) -> str:
    """A turn that called tools asks for their results, whatever the engine's finish_reason says."""
    if finish_reason == "stop" and called:
        return "tool_use"
    return _STOP_REASONS[finish_reason]


def _tool_use_id(call_id: object, message_id: str, index: int) -> str:
    return call_id if isinstance(call_id, str) and call_id else f"toolu_{message_id}_{index}"


def _input(arguments: str, truncated: bool) -> dict[str, object]:
    """A finished tool call's arguments as ``input``; a call cut by max_tokens may be partial JSON
    (its input is then empty: ``stop_reason`` says it was cut)."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        value = None
    if isinstance(value, dict):
        return value
    if truncated:
        return {}
    raise OrchestratorError(Code.INTERNAL, "the model's tool call arguments are not a JSON object")


def message_body(message_id: str, model: str, result: Result) -> dict[str, object]:
    """The non-streamed answer: a ``message`` (text block first, then one ``tool_use`` per call)."""
    content: list[dict[str, object]] = []
    if result.text:
        content.append({"type": "text", "text": result.text})
    for index, call in enumerate(result.tool_calls):
        name, arguments = call_fields(call)
        call_id = _tool_use_id(call.get("id"), message_id, index)
        tool_input = _input(arguments, result.finish_reason == "length")
        content.append({"type": "tool_use", "id": call_id, "name": name, "input": tool_input})
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": _stop_reason(result.finish_reason, bool(result.tool_calls)),
        "stop_sequence": None,
        "usage": {"input_tokens": result.prompt_tokens, "output_tokens": result.completion_tokens},
    }


def _event(name: str, payload: dict[str, object]) -> bytes:
    data = json.dumps({"type": name, **payload}, separators=(",", ":"), ensure_ascii=False)
    return f"event: {name}\ndata: {data}\n\n".encode()


class MessageFrames:
    """Anthropic's stream events of one answer, one piece at a time (pure: no I/O, no clock).

    Blocks are numbered in the order they start; a text piece after a tool call starts a new text
    block, and each engine tool call (by its ``index``) is one ``tool_use`` block whose arguments
    arrive as ``input_json_delta``. Nothing is emitted after the terminal piece.
    """

    def __init__(self, message_id: str, model: str, input_tokens: int) -> None:
        self.message_id = message_id
        self.model = model
        self.input_tokens = input_tokens
        self.ended = False
        self._blocks = 0  # blocks started so far
        self._open: int | None = None  # the index of the block that is open
        self._text_open = False
        self._tools: dict[int, int] = {}  # the engine's tool-call index → its block index

    def start(self) -> bytes:
        """``message_start``: the message shell, with the prompt estimate as its input tokens."""
        message: dict[str, object] = {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self.input_tokens, "output_tokens": 0},
        }
        return _event("message_start", {"message": message})

    def feed(self, piece: Piece) -> bytes:
        """The bytes to write for ``piece`` (possibly none)."""
        if self.ended:
            return b""
        if isinstance(piece, Waiting):
            return waiting_comment(piece) + _event("ping", {})
        if isinstance(piece, Text):
            return self._text(piece.text)
        if isinstance(piece, ToolCalls):
            return b"".join(self._tool_delta(item) for item in piece.items)
        self.ended = True
        if isinstance(piece, Failed):
            return _event("error", {"error": anthropic_error(piece.error)["error"]})
        return self._done(piece)

    def _text(self, text: str) -> bytes:
        if not text:
            return b""
        out = b""
        if not self._text_open:
            out = self._start({"type": "text", "text": ""})
            self._text_open = True
        assert self._open is not None
        return out + _event(
            "content_block_delta", {"index": self._open, "delta": {"type": "text_delta", "text": text}}
        )

    def _tool_delta(self, item: dict[str, object]) -> bytes:
        index = item.get("index")
        index = index if isinstance(index, int) and not isinstance(index, bool) else len(self._tools)
        name, arguments = call_fields(item)
        out = b""
        if index not in self._tools:
            call_id = _tool_use_id(item.get("id"), self.message_id, index)
            out = self._start({"type": "tool_use", "id": call_id, "name": name, "input": {}})
            self._tools[index] = self._blocks - 1
        if arguments:
            # A later delta of an earlier call (engines stream calls one after another) still
            # names that call's block, which the SDKs accumulate by index.
            delta = {"type": "input_json_delta", "partial_json": arguments}
            out += _event("content_block_delta", {"index": self._tools[index], "delta": delta})
        return out

    def _start(self, block: dict[str, object]) -> bytes:
        out = self._close()
        self._open = self._blocks
        self._blocks += 1
        return out + _event("content_block_start", {"index": self._open, "content_block": block})

    def _close(self) -> bytes:
        if self._open is None:
            return b""
        index, self._open, self._text_open = self._open, None, False
        return _event("content_block_stop", {"index": index})

    def _done(self, piece: Done) -> bytes:
        stop_reason = _stop_reason(piece.finish_reason, bool(self._tools))
        usage = {"input_tokens": piece.prompt_tokens, "output_tokens": piece.completion_tokens}
        delta = {"stop_reason": stop_reason, "stop_sequence": None}
        return (
            self._close()
            + _event("message_delta", {"delta": delta, "usage": usage})
            + _event("message_stop", {})
        )


def stream_frames(frames: MessageFrames, pieces: Iterable[Piece]) -> bytes:
    """The whole stream body for ``pieces`` (tests, and any caller that has them all)."""
    return frames.start() + b"".join(frames.feed(piece) for piece in pieces)


class AnthropicApi:
    def __init__(self, runner: ChatRunner) -> None:
        self.runner = runner

    async def messages(self, request: web.Request) -> web.StreamResponse:
        req = parse_model(MessagesRequest, parse_json_object(await request.read()))
        call = chat_call(req)
        estimate = prompt_estimate(call.body)
        admitted = await self.runner.admit(request, call)
        message_id = f"msg_{admitted.task_id}"
        if not req.stream:
            result = await self.runner.collect(request, admitted.task_id)
            return json_response(message_body(message_id, req.model, result), admitted.task_id)
        frames = MessageFrames(message_id, req.model, estimate)
        return await self.runner.stream(request, admitted.task_id, frames)

    async def count_tokens(self, request: web.Request) -> web.Response:
        """``{input_tokens}``: admission's estimate of the prompt (:func:`prompt_estimate`)."""
        req = parse_model(CountTokensRequest, parse_json_object(await request.read()))
        return json_response({"input_tokens": prompt_estimate(chat_body(req))})


def add_routes(app: web.Application, runner: ChatRunner) -> None:
    api = AnthropicApi(runner)
    app.router.add_post("/v1/messages", api.messages)
    app.router.add_post("/v1/messages/count_tokens", api.count_tokens)
