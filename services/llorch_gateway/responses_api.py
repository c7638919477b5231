"""OpenAI's Responses API (``POST /v1/responses``), the stateless subset, on the chat path.

Enough of it for Codex CLI and the ``openai`` SDK's ``client.responses``. A request becomes an OpenAI
chat body (:func:`chat_body`) admitted through the one queue (:class:`.chat.ChatRunner`); the pieces
become a ``response`` object (:func:`response_body`) or the Responses stream events
(:class:`ResponseFrames`), each with its ``sequence_number``.

- **Honoured**: ``model``, ``input`` (a string, or ``message`` items with ``input_text`` /
  ``output_text`` parts, ``function_call`` and ``function_call_output`` items), ``instructions`` (the
  first system message), function ``tools``, ``tool_choice``, ``parallel_tool_calls``,
  ``max_output_tokens``, ``temperature``, ``top_p``, ``text.format`` (→ ``response_format``),
  ``stream``.
- **Stateless**: nothing is ever stored. ``store: true`` and ``previous_response_id`` are refused
  (400), so a client that needs either learns at once; ``store`` absent or false is accepted.
  ``background: true`` is refused too.
- **Refused** (400 naming the field): tools other than ``function`` (web search, file search,
  custom, local shell...), input items or parts other than the ones above (images, files,
  ``item_reference``...), ``tool_choice`` other than auto / none / required / a named function.
- **Ignored**: ``reasoning`` (the model's chat template decides; no reasoning items are returned),
  ``reasoning`` items in ``input`` (we never send any), ``include``, ``metadata``, ``user``,
  ``prompt_cache_key``, ``truncation``, ``service_tier``, ``text.verbosity`` and fields this API does
  not know.

Converting: ``system`` and ``developer`` messages become system messages, merged into one while no
other message precedes them (many chat templates take one system message, first); consecutive
``function_call`` items join the assistant message before them as its ``tool_calls``;
``function_call_output`` → a ``tool`` message. Parts of a message are joined with a blank line
(an assistant's with nothing).

A response cut by ``max_output_tokens`` is ``incomplete`` (``incomplete_details.reason``
``max_output_tokens``; streamed, it ends with ``response.incomplete``). A run-time failure ends the
stream with ``response.failed`` whose ``error.code`` is ``context_length_exceeded``,
``rate_limit_exceeded``, ``invalid_prompt`` or ``server_error``. While the task waits the stream
carries SSE comments with its queue position. ``X-Task-Id`` names the task on every answer.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Final, Literal

from aiohttp import web
from pydantic import (
    BeforeValidator,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from llorch.errors import OrchestratorError, invalid

from .chat import (
    ChatCall,
    ChatRunner,
    Done,
    Failed,
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
from .dialects import is_context_overflow, openai_error
from .models import parse_json_object, parse_model

Model = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Name = Annotated[str, StringConstraints(min_length=1, max_length=256)]

_ITEMS: Final = frozenset({"message", "function_call", "function_call_output", "reasoning"})
_PARTS: Final = frozenset({"input_text", "output_text"})
_CHOICES: Final = ("auto", "none", "required")
_STATEFUL: Final = {  # parse_model puts the field's name first
    "store": "must be false or absent: this server is stateless and keeps no responses",
    "previous_response_id": "not supported: this server is stateless; send the whole conversation",
    "background": "not supported: responses run in the foreground",
}


def _parts(value: object) -> object:
    """A string becomes one ``input_text`` part; parts of other types are refused by name."""
    if isinstance(value, str):
        return [{"type": "input_text", "text": value}]
    if isinstance(value, list):
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(kind, str) and kind not in _PARTS:
                raise ValueError(f"{kind} parts are not supported (only input_text and output_text)")
    return value


def _items(value: object) -> object:
    """A string is one user message; an item with a role and no type is a message."""
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list):
        return value
    items: list[object] = []
    for raw in value:
        item = (
            {**raw, "type": "message"}
            if isinstance(raw, dict) and "type" not in raw and "role" in raw
            else raw
        )
        kind = item.get("type") if isinstance(item, dict) else None
        if isinstance(kind, str) and kind not in _ITEMS:
            raise ValueError(
                f"{kind} items are not supported (only message, function_call and function_call_output)"
            )
        items.append(item)
    return items


def _choice(value: object) -> object:
    if isinstance(value, str) and value not in _CHOICES:
        raise ValueError("tool_choice must be auto, none, required or {type: function, name}")
    if isinstance(value, dict) and value.get("type") != "function":
        raise ValueError(f"tool_choice of type {value.get('type')!r} is not supported (only function)")
    return value


class Part(Lenient):
    type: Literal["input_text", "output_text"]
    text: str


Parts = Annotated[list[Part], BeforeValidator(_parts)]


class MessageItem(Lenient):
    type: Literal["message"]
    role: Literal["user", "assistant", "system", "developer"]
    content: Parts


class FunctionCallItem(Lenient):
    type: Literal["function_call"]
    call_id: Name
    name: Name
    arguments: str


class FunctionCallOutputItem(Lenient):
    type: Literal["function_call_output"]
    call_id: Name
    output: Parts


class ReasoningItem(Lenient):
    type: Literal["reasoning"]


Item = Annotated[
    MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem, Field(discriminator="type")
]


class FunctionTool(Lenient):
    type: Literal["function"]
    name: Name
    description: str | None = None
    parameters: dict[str, object] | None = None
    strict: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _function_only(cls, data: object) -> object:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind != "function":
            raise ValueError(f"tools of type {kind!r} are not supported (only function tools)")
        return data


class NamedFunction(Lenient):
    type: Literal["function"]
    name: Name


class Format(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    name: Name | None = None
    description: str | None = None
    schema_: dict[str, object] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(Lenient):
    format: Format | None = None


class ResponsesRequest(Lenient):
    model: Model
    input: Annotated[list[Item], Field(min_length=1), BeforeValidator(_items)]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Annotated[
        Literal["auto", "none", "required"] | NamedFunction | None, BeforeValidator(_choice)
    ] = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=1_048_576)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    text: TextConfig | None = None
    stream: bool = False
    store: bool | None = None
    previous_response_id: str | None = None
    background: bool | None = None

    @field_validator(*_STATEFUL)
    @classmethod
    def _stateless(cls, value: object, info: ValidationInfo) -> object:
        if value:
            raise ValueError(_STATEFUL[str(info.field_name)])
        return value


def chat_body(req: ResponsesRequest) -> dict[str, object]:
    """The OpenAI chat request body the engine gets for ``req``; INVALID_PARAMS where the tool
    choice or the text format do not fit."""
    messages: list[dict[str, object]] = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    for item in req.input:
        if isinstance(item, MessageItem):
            _add_message(messages, item)
        elif isinstance(item, FunctionCallItem):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is None or last["role"] != "assistant":
                last = {"role": "assistant", "content": None}
                messages.append(last)
            calls = last.setdefault("tool_calls", [])
            assert isinstance(calls, list)
            calls.append(call)
        elif isinstance(item, FunctionCallOutputItem):
            content = "\n\n".join(part.text for part in item.output)
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": content})
    body: dict[str, object] = {"messages": messages}
    if req.tools:
        body["tools"] = [{"type": "function", "function": _function(tool)} for tool in req.tools]
    if req.tool_choice is not None:
        body["tool_choice"] = _tool_choice(req.tool_choice, req.tools or [])
    if req.text is not None and req.text.format is not None and req.text.format.type != "text":
        body["response_format"] = _response_format(req.text.format)
    for name in ("parallel_tool_calls", "temperature", "top_p"):
        if (value := getattr(req, name)) is not None:
            body[name] = value
    return body


def chat_call(req: ResponsesRequest) -> ChatCall:
    """What to admit for ``req``: a chat of at most ``max_output_tokens`` (else the default)."""
    return ChatCall(model=req.model, workload="chat", body=chat_body(req), max_tokens=req.max_output_tokens)


def _add_message(messages: list[dict[str, object]], item: MessageItem) -> None:
    role = "system" if item.role in ("system", "developer") else item.role
    text = ("" if role == "assistant" else "\n\n").join(part.text for part in item.content)
    if role == "system" and len(messages) == 1 and messages[0]["role"] == "system":
        messages[0]["content"] = f"{messages[0]['content']}\n\n{text}"
    else:
        messages.append({"role": role, "content": text})


def _function(tool: FunctionTool) -> dict[str, object]:
    function: dict[str, object] = {
        "name": tool.name,
        "parameters": tool.parameters
        if tool.parameters is not None
        else {"type": "object", "properties": {}},
    }
    if tool.description is not None:
        function["description"] = tool.description
    if tool.strict is not None:
        function["strict"] = tool.strict
    return function


def _tool_choice(choice: str | NamedFunction, tools: list[FunctionTool]) -> object:
    if isinstance(choice, str):
        if choice == "required" and not tools:
            raise invalid("tool_choice", "tool_choice required needs tools")
        return choice
    if choice.name not in {tool.name for tool in tools}:
        raise invalid("tool_choice.name", f"tool_choice names {choice.name!r}, which is not in tools")
    return {"type": "function", "function": {"name": choice.name}}


def _response_format(fmt: Format) -> dict[str, object]:
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise invalid("text.format.schema", "text.format of type json_schema needs schema")
    schema: dict[str, object] = {"name": fmt.name or "response", "schema": fmt.schema_}
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    if fmt.description is not None:
        schema["description"] = fmt.description
    return {"type": "json_schema", "json_schema": schema}


@dataclass(frozen=True, slots=True)
class ResponseShape:
    """What every ``response`` object of one request repeats: ids, model, creation time and the
    request's settings echoed back (``tools``, ``tool_choice`` ...: required by the SDK's type)."""

    task_id: str
    model: str
    created_at: int
    echo: dict[str, object]

    @property
    def id(self) -> str:
        return f"resp_{self.task_id}"

    def message_id(self, output_index: int) -> str:
        return f"msg_{self.task_id}_{output_index}"

    def call_ids(self, output_index: int, call_id: object) -> tuple[str, str]:
        """The function_call item's ``id`` and its ``call_id`` (the engine's, else one made here)."""
        made = call_id if isinstance(call_id, str) and call_id else f"call_{self.task_id}_{output_index}"
        return f"fc_{self.task_id}_{output_index}", made

    def response(
        self,
        status: str,
        output: list[dict[str, object]],
        usage: dict[str, object] | None = None,
        error: dict[str, object] | None = None,
    ) -> dict[str, object]:
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.model,
            "output": output,
            "usage": usage,
            "error": error,
            "incomplete_details": incomplete,
            **self.echo,
        }


def response_shape(req: ResponsesRequest, task_id: str, created_at: int) -> ResponseShape:
    tools = [{"type": "function", **_function(tool)} for tool in req.tools or []]
    choice = req.tool_choice
    echo: dict[str, object] = {
        "instructions": req.instructions,
        "tools": tools,
        "tool_choice": choice.model_dump() if isinstance(choice, NamedFunction) else choice or "auto",
        "parallel_tool_calls": req.parallel_tool_calls is not False,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "max_output_tokens": req.max_output_tokens,
        "previous_response_id": None,
    }
    return ResponseShape(task_id, req.model, created_at, echo)


def _usage(prompt: int, completion: int) -> dict[str, object]:
    details = {"cached_tokens": 0, "cache_write_tokens": 0}
    return dict(
        input_tokens=prompt,
        input_tokens_details=details,
        output_tokens=completion,
        output_tokens_details={"reasoning_tokens": 0},
        total_tokens=prompt + completion,
    )


def _text_part(text: str) -> dict[str, object]:
    return {"type": "output_text", "text": text, "annotations": []}


def _message_item(item_id: str, status: str, content: list[dict[str, object]]) -> dict[str, object]:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant", "content": content}


def _call_item(ids: tuple[str, str], name: str, arguments: str, status: str) -> dict[str, object]:
    item_id, call_id = ids
    return dict(
        type="function_call", id=item_id, call_id=call_id, name=name, arguments=arguments, status=status
    )


def _error(exc: OrchestratorError) -> dict[str, object]:
    """A failed response's ``error``: the codes Codex and the SDK know."""
    if is_context_overflow(exc):
        code = "context_length_exceeded"
    elif exc.http_status == 429:
        code = "rate_limit_exceeded"
    elif exc.http_status < 500:
        code = "invalid_prompt"
    else:
        code = "server_error"
    return {"code": code, "message": openai_error(exc)["message"]}


def response_body(shape: ResponseShape, result: Result) -> dict[str, object]:
    """The non-streamed answer: a message item with the text (if any), then one function_call item
    per tool call."""
    status = "incomplete" if result.finish_reason == "length" else "completed"
    output: list[dict[str, object]] = []
    if result.text:
        output.append(_message_item(shape.message_id(0), status, [_text_part(result.text)]))
    for call in result.tool_calls:
        output.append(_call_item(shape.call_ids(len(output), call.get("id")), *call_fields(call), status))
    return shape.response(status, output, _usage(result.prompt_tokens, result.completion_tokens))


class ResponseFrames:
    """The Responses stream events of one answer, one piece at a time (pure: no I/O, no clock).

    Output items are numbered in the order they start: text opens a message item (one
    ``output_text`` part), each engine tool call (by its ``index``) a function_call item. An item is
    done when the next one starts or the answer ends. Nothing is emitted after the terminal piece.
    """

    def __init__(self, shape: ResponseShape) -> None:
        self.shape = shape
        self.ended = False
        self._seq = 0
        self._output: list[dict[str, object]] = []  # items done, and the open one last
        self._open: int | None = None  # the output index of the item that is open
        self._text = ""  # the open message item's text
        self._calls: dict[int, int] = {}  # the engine's tool-call index → its output index
        self._arguments: dict[int, str] = {}  # output index → the arguments so far

    def start(self) -> bytes:
        """``response.created`` and ``response.in_progress``."""
        shell = self.shape.response("in_progress", [])
        return self._event("response.created", {"response": shell}) + self._event(
            "response.in_progress", {"response": shell}
        )

    def feed(self, piece: Piece) -> bytes:
        """The bytes to write for ``piece`` (possibly none)."""
        if self.ended:
            return b""
        if isinstance(piece, Waiting):
            return waiting_comment(piece)
        if isinstance(piece, Text):
            return self._text_delta(piece.text)
        if isinstance(piece, ToolCalls):
            return b"".join(self._call_delta(item) for item in piece.items)
        self.ended = True
        if isinstance(piece, Failed):
            failed = self.shape.response("failed", self._output, error=_error(piece.error))
            return self._event("response.failed", {"response": failed})
        return self._done(piece)

    def _text_delta(self, text: str) -> bytes:
        if not text:
            return b""
        out = b""
        if self._open is None or self._output[self._open]["type"] != "message":
            out = self._close("completed")
            out += self._add(_message_item(self.shape.message_id(len(self._output)), "in_progress", []))
            out += self._event("response.content_part.added", {**self._where(), "part": _text_part("")})
        self._text += text
        return out + self._event(
            "response.output_text.delta", {**self._where(), "delta": text, "logprobs": []}
        )

    def _call_delta(self, item: dict[str, object]) -> bytes:
        index = item.get("index")
        index = index if isinstance(index, int) and not isinstance(index, bool) else len(self._calls)
        name, arguments = call_fields(item)
        out = b""
        if index not in self._calls:
            out = self._close("completed")
            ids = self.shape.call_ids(len(self._output), item.get("id"))
            self._calls[index] = len(self._output)
            out += self._add(_call_item(ids, name, "", "in_progress"))
        if arguments:
            # A later delta of an earlier call (engines stream calls one after another) still
            # names that call's item.
            at = self._calls[index]
            self._arguments[at] = self._arguments.get(at, "") + arguments
            if at != self._open:
                self._output[at] = {**self._output[at], "arguments": self._arguments[at]}
            where = {"item_id": self._output[at]["id"], "output_index": at}
            out += self._event("response.function_call_arguments.delta", {**where, "delta": arguments})
        return out

    def _where(self) -> dict[str, object]:
        """The open message item's text part."""
        assert self._open is not None
        return {"item_id": self._output[self._open]["id"], "output_index": self._open, "content_index": 0}

    def _add(self, item: dict[str, object]) -> bytes:
        self._open = len(self._output)
        self._output.append(item)
        return self._event("response.output_item.added", {"output_index": self._open, "item": item})

    def _close(self, status: str) -> bytes:
        """Finish the open item: its ``.done`` events, then ``response.output_item.done``."""
        if self._open is None:
            return b""
        at = self._open
        item = self._output[at]
        if item["type"] == "message":
            part = _text_part(self._text)
            where = self._where()
            out = self._event("response.output_text.done", {**where, "text": self._text, "logprobs": []})
            out += self._event("response.content_part.done", {**where, "part": part})
            done = _message_item(str(item["id"]), status, [part])
            self._text = ""
        else:
            arguments = self._arguments.get(at, "")
            where = {"item_id": item["id"], "output_index": at}
            out = self._event("response.function_call_arguments.done", {**where, "arguments": arguments})
            done = {**item, "arguments": arguments, "status": status}
        self._output[at] = done
        self._open = None
        return out + self._event("response.output_item.done", {"output_index": at, "item": done})

    def _done(self, piece: Done) -> bytes:
        status = "incomplete" if piece.finish_reason == "length" else "completed"
        out = self._close(status)
        response = self.shape.response(
            status, self._output, _usage(piece.prompt_tokens, piece.completion_tokens)
        )
        name = "response.incomplete" if status == "incomplete" else "response.completed"
        return out + self._event(name, {"response": response})

    def _event(self, name: str, payload: dict[str, object]) -> bytes:
        data = json.dumps(
            {"type": name, "sequence_number": self._seq, **payload}, separators=(",", ":"), ensure_ascii=False
        )
        self._seq += 1
        return f"event: {name}\ndata: {data}\n\n".encode()


def stream_frames(frames: ResponseFrames, pieces: Iterable[Piece]) -> bytes:
    """The whole stream body for ``pieces`` (tests, and any caller that has them all)."""
    return frames.start() + b"".join(frames.feed(piece) for piece in pieces)


class ResponsesApi:
    def __init__(self, runner: ChatRunner, clock: Callable[[], float] = time.time) -> None:
        self.runner = runner
        self.clock = clock

    async def create(self, request: web.Request) -> web.StreamResponse:
        req = parse_model(ResponsesRequest, parse_json_object(await request.read()))
        call = chat_call(req)
        admitted = await self.runner.admit(request, call)
        shape = response_shape(req, admitted.task_id, int(self.clock()))
        if not req.stream:
            result = await self.runner.collect(request, admitted.task_id)
            return json_response(response_body(shape, result), admitted.task_id)
        return await self.runner.stream(request, admitted.task_id, ResponseFrames(shape))


def add_routes(app: web.Application, runner: ChatRunner) -> None:
    app.router.add_post("/v1/responses", ResponsesApi(runner).create)
