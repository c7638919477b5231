"""The OpenAI-compatible routes (SPEC §2.4, as extended by the APIs issue): chat, completions,
embeddings and models, through the same admission queue as ``POST /v1/tasks``.

- **Chat** goes to the engine's own chat endpoint (workload ``chat``), so the model's chat template
  applies. ``tools``, ``tool_choice``, ``response_format``, ``stop``, ``temperature``, ``top_p``,
  ``frequency_penalty``, ``presence_penalty`` and ``parallel_tool_calls`` pass through unchanged;
  streamed tool-call deltas are relayed unchanged.
- **Refused**: ``n`` > 1, ``logprobs``/``top_logprobs``, ``echo``, ``suffix``, ``best_of`` > 1, and
  non-text message parts (images, audio) get a 400 naming the field. Fields this API does not know
  are ignored, as SPEC §2.1 says of the OpenAI API; ``user``, ``metadata`` and ``store`` are among
  them (we keep nothing).
- **Usage** is always in a non-streamed answer and, with ``stream_options.include_usage``, in a last
  chunk; where an engine omits it, the pool manager's own counts stand in.
- **Streams** start at once: while the task is queued the client gets SSE comments with its
  ``queue_position`` and ``predicted_start_ms``, and a comment at least every 5 s. A run-time error is
  ``data: {"error": {...}}``; every stream ends with ``data: [DONE]``. A client that disconnects, queued
  or running, cancels its task.
- ``X-Task-Id`` names the task on every answer, so the native status, stream and cancel routes work.
"""

from __future__ import annotations

import base64
import json
import struct
import time
from typing import Annotated, Any, Final, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from llorch.ids import SEED_MAX
from llorch.lifecycle import COMING_STATES
from llorch.v1 import scheduler_pb2

from .chat import (
    ChatCall,
    ChatRunner,
    Done,
    Lenient,
    Piece,
    Result,
    Text,
    ToolCalls,
    Waiting,
    json_response,
    waiting_comment,
)
from .dialects import openai_error
from .models import parse_json_object, parse_model
from .scheduler_client import SchedulerClient

OWNER = "llorch"
DONE_FRAME = b"data: [DONE]\n\n"
_PASS_THROUGH = (
    "tools",
    "tool_choice",
    "response_format",
    "stop",
    "temperature",
    "top_p",
    "frequency_penalty",
    "presence_penalty",
    "parallel_tool_calls",
)
_SAMPLING = ("temperature", "top_p", "stop")

Model = Annotated[str, StringConstraints(min_length=1, max_length=256)]
Tokens = Annotated[int, Field(ge=1, le=1_048_576)]
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]


class _TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class _Function(Lenient):
    name: Annotated[str, StringConstraints(min_length=1, max_length=256)]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class _Tool(Lenient):
    type: Literal["function"]
    function: _Function


class _ToolCallFunction(Lenient):
    name: str
    arguments: str


class _ToolCall(Lenient):
    id: str
    type: Literal["function"] = "function"
    function: _ToolCallFunction


class _Message(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[_TextPart] | None = None
    name: str | None = None
    tool_calls: list[_ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content(self) -> _Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self


class _NamedChoice(Lenient):
    type: Literal["function"]
    function: dict[str, str]


class _JsonSchema(Lenient):
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class _ResponseFormat(Lenient):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: _JsonSchema | None = None

    @model_validator(mode="after")
    def _schema(self) -> _ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs json_schema")
        return self


class _StreamOptions(Lenient):
    include_usage: bool = False


class _Sampling(Lenient):
    """The fields chat and completions share."""

    model: Model
    max_tokens: Tokens | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)] | None = None
    seed: Seed | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] = 1
    logprobs: bool | int | None = None
    top_logprobs: int | None = None

    @field_validator("n")
    @classmethod
    def _one(cls, value: int) -> int:
        if value != 1:
            raise ValueError("n must be 1: each request yields one choice; send n requests instead")
        return value

    @field_validator("logprobs", "top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | int | None) -> bool | int | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value


class ChatRequest(_Sampling):
    messages: Annotated[list[_Message], Field(min_length=1)]
    max_completion_tokens: Tokens | None = None
    tools: list[_Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | _NamedChoice | None = None
    response_format: _ResponseFormat | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(_Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=1)] | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (fill-in-the-middle) is not supported")
        return value


class EmbeddingRequest(Lenient):
    model: Model
    input: str | Annotated[list[str], Field(min_length=1, max_length=64)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None

    @field_validator("dimensions")
    @classmethod
    def _no_dimensions(cls, value: int | None) -> int | None:
        if value is not None:
            raise ValueError("dimensions is not supported: the model's own size is returned")
        return value


class OpenAIApi:
    def __init__(self, runner: ChatRunner, scheduler: SchedulerClient) -> None:
        self.runner = runner
        self.scheduler = scheduler

    async def chat(self, request: web.Request) -> web.StreamResponse:
        raw = parse_json_object(await request.read())
        req = parse_model(ChatRequest, raw)
        body = {"messages": raw["messages"], **{k: raw[k] for k in _PASS_THROUGH if raw.get(k) is not None}}
        call = ChatCall(
            model=req.model,
            workload="chat",
            body=body,
            max_tokens=req.max_completion_tokens or req.max_tokens,
            seed=req.seed,
        )
        return await self._generate(request, call, req, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        raw = parse_json_object(await request.read())
        req = parse_model(CompletionRequest, raw)
        prompt = req.prompt if isinstance(req.prompt, str) else req.prompt[0]
        call = ChatCall(
            model=req.model,
            workload="completion",
            body={k: raw[k] for k in _SAMPLING if raw.get(k) is not None},
            prompt=prompt,
            max_tokens=req.max_tokens,
            seed=req.seed,
        )
        return await self._generate(request, call, req, chat=False)

    async def embeddings(self, request: web.Request) -> web.Response:
        req = parse_model(EmbeddingRequest, parse_json_object(await request.read()))
        inputs = (req.input,) if isinstance(req.input, str) else tuple(req.input)
        admitted = await self.runner.admit(
            request, ChatCall(model=req.model, workload="embedding", inputs=inputs)
        )
        result = await self.runner.collect(request, admitted.task_id)
        payload = {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _encoded(vector, req.encoding_format)}
                for i, vector in enumerate(result.embeddings)
            ],
            "model": req.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        }
        return json_response(payload, admitted.task_id)

    async def models(self, request: web.Request) -> web.Response:
        """Every served model: ``status`` ready / loading / unloaded (an on-demand model not loaded
        now: a request loads it) / unavailable, its ``residency`` (always / on-demand),
        ``context_length`` and ``replica_set``; one entry per model, from its set nearest to serving
        (ready, then loading, then unloaded; by id among equals)."""
        reply = await self.scheduler.replica_sets()
        pools = {view.state.pool_id: view.state.state for view in (await self.scheduler.list_pools()).pools}
        statuses = {view.id: _status(view, pools) for view in reply.sets}
        entries: dict[str, dict[str, object]] = {}
        for view in sorted(reply.sets, key=lambda v: (_MODEL_STATUS_RANK[statuses[v.id]], v.id)):
            if view.model_id in entries:
                continue
            status = statuses[view.id]
            entries[view.model_id] = {
                "id": view.model_id,
                "object": "model",
                "created": _STARTED,
                "owned_by": OWNER,
                "status": status,
                "residency": view.residency or "always",
                "context_length": view.ctx,
                "replica_set": view.id,
            }
        return json_response({"object": "list", "data": list(entries.values())})

    async def _generate(
        self, request: web.Request, call: ChatCall, req: _Sampling, chat: bool
    ) -> web.StreamResponse:
        admitted = await self.runner.admit(request, call)
        include_usage = req.stream_options is not None and req.stream_options.include_usage
        chunks = _Chunks(admitted.task_id, req.model, chat, include_usage)
        if not req.stream:
            result = await self.runner.collect(request, admitted.task_id)
            return json_response(chunks.whole(result), admitted.task_id)
        return await self.runner.stream(request, admitted.task_id, chunks)


_STARTED = int(time.time())
_MODEL_STATUS_RANK: Final = {"ready": 0, "loading": 1, "unloaded": 2, "unavailable": 3}


def _status(view: scheduler_pb2.ReplicaSetView, pool_states: dict[str, str]) -> str:
    """A set's /v1/models status: its pools' states tell a start under way even where the scheduler
    does not (a restart, a reload); ``unloaded`` only for an on-demand set the scheduler says is not
    loaded (a request loads it), never for a stopped ``always`` one (nothing would)."""
    if view.ready:
        return "ready"
    if view.status == "loading" or {pool_states.get(p, "") for p in view.pools} & COMING_STATES:
        return "loading"
    if view.status == "unloaded" and view.residency == "on-demand":
        return "unloaded"
    return "unavailable"


class _Chunks:
    """One answer in OpenAI's shapes: ``chat.completion(.chunk)`` or ``text_completion``."""

    def __init__(self, task_id: str, model: str, chat: bool, include_usage: bool) -> None:
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{task_id}"
        self.model = model
        self.chat = chat
        self.include_usage = include_usage
        self.created = int(time.time())

    def whole(self, result: Result) -> dict[str, object]:
        usage = _usage(result.prompt_tokens, result.completion_tokens)
        choice: dict[str, object] = {"index": 0, "finish_reason": result.finish_reason, "logprobs": None}
        if self.chat:
            message: dict[str, object] = {"role": "assistant", "content": result.text or None}
            if result.tool_calls:
                message["tool_calls"] = result.tool_calls
            elif not result.text:
                message["content"] = ""
            choice["message"] = message
        else:
            choice["text"] = result.text
        return {
            "id": self.id,
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage,
        }

    def start(self) -> bytes:
        """A chat stream opens with the assistant's role (a completion has no opening)."""
        if self.chat:
            return self._frame([{"index": 0, "delta": {"role": "assistant", "content": ""}}])
        return b""

    def feed(self, piece: Piece) -> bytes:
        if isinstance(piece, Waiting):
            return waiting_comment(piece)
        if isinstance(piece, Text):
            return self._frame([self._choice({"content": piece.text}, piece.text)])
        if isinstance(piece, ToolCalls):
            return self._frame([self._choice({"tool_calls": piece.items}, "")])
        if isinstance(piece, Done):
            last = self._choice({}, "")
            last["finish_reason"] = piece.finish_reason
            usage = _usage(piece.prompt_tokens, piece.completion_tokens)
            tail = self._frame([], usage=usage) if self.include_usage else b""
            return self._frame([last]) + tail + DONE_FRAME
        return _data({"error": openai_error(piece.error)}) + DONE_FRAME

    def _choice(self, delta: dict[str, object], text: str) -> dict[str, object]:
        if self.chat:
            return {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
        return {"index": 0, "text": text, "finish_reason": None, "logprobs": None}

    def _frame(self, choices: list[dict[str, object]], usage: dict[str, int] | None = None) -> bytes:
        chunk: dict[str, object] = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return _data(chunk)


def _encoded(vector: list[float], encoding: str) -> list[float] | str:
    """``base64``: little-endian float32, what the official SDKs ask for by default."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
    return vector


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _data(payload: object) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def add_routes(app: web.Application, runner: ChatRunner, scheduler: SchedulerClient) -> None:
    api = OpenAIApi(runner, scheduler)
    app.router.add_post("/v1/chat/completions", api.chat)
    app.router.add_post("/v1/completions", api.completions)
    app.router.add_post("/v1/embeddings", api.embeddings)
    app.router.add_get("/v1/models", api.models)
