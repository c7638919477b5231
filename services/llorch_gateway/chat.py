"""The one path of every compatible API: admit a task through the scheduler, then follow its log.

The OpenAI routes (chat, completions, embeddings), Anthropic's Messages and the Responses API all
admit through :meth:`ChatRunner.admit`, the same scheduler call as ``POST /v1/tasks`` (queue, priorities,
sessions, budgets, token throttles, placement), and read the task's event log as :data:`Piece` values
through :meth:`ChatRunner.pieces`. Each API only formats pieces in its own wire shape.

While the client waits, :meth:`ChatRunner.pieces` yields :class:`Waiting` on every queue change and at
least every :data:`KEEPALIVE_S`, so a stream can tell its client where it stands and keep proxies from
closing an idle connection. A client that goes away before the terminal event cancels its task through
the scheduler's race-free cancel (:meth:`ChatRunner.follow` as a context manager), queued or running.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from llorch.errors import Code, OrchestratorError, invalid
from llorch.events import TERMINAL, EventName
from llorch.ids import is_valid_id
from llorch.store import Event, Store
from llorch.v1 import scheduler_pb2

from .feed import EventFeed, Tail
from .scheduler_client import SchedulerClient
from .sse import log_stream_ended, open_event_stream

log = logging.getLogger(__name__)

KEEPALIVE_S: Final = 5.0
"""The longest a waiting client goes without a byte (a comment, a ping) on a streamed answer."""
DISCONNECT_POLL_S: Final = 1.0
"""How often a silent wait checks whether its client is still connected."""

FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, slots=True)
class Waiting:
    """The task waits: its place in the queue and when it should start (``loading`` while its model
    is being loaded). Also sent as a keepalive while a started task is silent (``running``)."""

    queue_position: int
    predicted_start_ms: int
    phase: Literal["queued", "loading", "running"] = "queued"


@dataclass(frozen=True, slots=True)
class Text:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCalls:
    """One streamed tool-call delta, exactly as the engine sent it: OpenAI ``delta.tool_calls`` items
    (``index``; ``id``, ``type`` and ``function.name`` on the first delta of a call; then pieces of
    ``function.arguments``)."""

    items: list[dict[str, object]]


@dataclass(frozen=True, slots=True)
class Done:
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    embeddings: list[list[float]] | None = None


@dataclass(frozen=True, slots=True)
class Failed:
    error: OrchestratorError


Piece = Waiting | Text | ToolCalls | Done | Failed


class Frames(Protocol):
    """One compatible API's stream format: its opening bytes, then the bytes of each piece."""

    def start(self) -> bytes: ...

    def feed(self, piece: Piece) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ChatCall:
    """What a compatible API asks for, in the engine's OpenAI chat shape.

    ``workload`` is ``chat`` (``body`` holds ``messages`` and the pass-through fields the engine's
    chat endpoint gets: tools, tool_choice, response_format, stop, seed, temperature, top_p),
    ``completion`` (``prompt``) or ``embedding`` (``inputs``).
    """

    model: str
    workload: Literal["chat", "completion", "embedding"]
    body: dict[str, object] = field(default_factory=dict)
    prompt: str | None = None
    inputs: tuple[str, ...] = ()
    max_tokens: int | None = None
    seed: int | None = None


@dataclass
class Result:
    """A whole answer, assembled from its pieces (the non-streamed responses)."""

    text: str = ""
    tool_calls: list[dict[str, object]] = field(default_factory=list)
    finish_reason: FinishReason = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    embeddings: list[list[float]] = field(default_factory=list)

    def add(self, piece: Piece) -> None:
        if isinstance(piece, Text):
            self.text += piece.text
        elif isinstance(piece, ToolCalls):
            for item in piece.items:
                _merge_tool_call(self.tool_calls, item)
        elif isinstance(piece, Done):
            self.finish_reason = piece.finish_reason
            self.prompt_tokens = piece.prompt_tokens
            self.completion_tokens = piece.completion_tokens
            self.embeddings = piece.embeddings or []
        elif isinstance(piece, Failed):
            raise piece.error


def _merge_tool_call(calls: list[dict[str, object]], item: dict[str, object]) -> None:
    """Fold one streamed delta into the assembled calls (by ``index``; arguments concatenate)."""
    index = item.get("index", len(calls))
    index = index if isinstance(index, int) and 0 <= index <= len(calls) else len(calls)
    if index == len(calls):
        calls.append({"id": "", "type": "function", "function": {"name": "", "arguments": ""}})
    call = calls[index]
    if isinstance(item.get("id"), str):
        call["id"] = item["id"]
    function = item.get("function")
    target = call["function"]
    if isinstance(function, dict) and isinstance(target, dict):
        if isinstance(function.get("name"), str) and function["name"]:
            target["name"] = function["name"]
        if isinstance(function.get("arguments"), str):
            target["arguments"] = str(target["arguments"]) + function["arguments"]


class Lenient(BaseModel):
    """A compatible API's request model: unknown fields are ignored (SPEC §2.1), known ones are
    type-checked strictly."""

    model_config = ConfigDict(extra="ignore", strict=True)


def call_fields(call: dict[str, object]) -> tuple[str, str]:
    """A tool call's (or its delta's) function name and arguments; empty where absent."""
    function = call.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    arguments = function.get("arguments") if isinstance(function, dict) else None
    return name if isinstance(name, str) else "", arguments if isinstance(arguments, str) else ""


def json_response(payload: object, task_id: str | None = None) -> web.Response:
    """A compact JSON answer; ``X-Task-Id`` names the task behind it."""
    return web.Response(
        text=json.dumps(payload, separators=(",", ":"), ensure_ascii=False),
        content_type="application/json",
        headers={"X-Task-Id": task_id} if task_id else {},
    )


@dataclass(frozen=True, slots=True)
class Admitted:
    task_id: str
    queue_position: int
    predicted_start_ms: int
    backoff_ms: int


class ChatRunner:
    def __init__(self, store: Store, feed: EventFeed, scheduler: SchedulerClient) -> None:
        self.store = store
        self.feed = feed
        self.scheduler = scheduler

    async def admit(self, request: web.Request, call: ChatCall) -> Admitted:
        """Admit ``call`` for the request's client, with ``X-Priority`` and ``X-Session-Id``."""
        field = {"chat": "messages", "completion": "prompt", "embedding": "input"}[call.workload]
        body = json.dumps(call.body, separators=(",", ":"), ensure_ascii=False) if call.body else ""
        for text in (body, call.prompt or "", *call.inputs):
            try:
                text.encode()
            except UnicodeEncodeError:
                raise invalid(field, f"{field} must be valid Unicode (no lone surrogates)") from None
        admit = scheduler_pb2.AdmitRequest(
            workload=call.workload,
            model_ref=call.model,
            priority=_priority(request),
            session_id=_session(request),
            max_tokens=call.max_tokens or 0,
            inputs=list(call.inputs),
            client=request.get("client", ""),
            body_json=body,
        )
        if call.prompt is not None:
            admit.prompt = call.prompt
        if call.seed is not None:
            admit.seed = call.seed
        reply = await self.scheduler.admit(admit)
        return Admitted(reply.task_id, reply.queue_position, reply.predicted_start_ms, reply.backoff_ms)

    @contextlib.asynccontextmanager
    async def follow(self, request: web.Request, task_id: str) -> AsyncIterator[AsyncIterator[Piece]]:
        """The task's pieces; leaving the block before its terminal piece (the client went away, a
        write failed, the handler was cancelled) cancels the task."""
        state = _Following()
        try:
            yield self._pieces(request, task_id, state)
        finally:
            if not state.ended:
                await self._cancel(task_id)

    async def stream(self, request: web.Request, task_id: str, frames: Frames) -> web.StreamResponse:
        """A streamed answer: ``frames.start()`` at once, then each piece in the API's shape."""
        response = await open_sse(request, task_id)
        ending = ("error", Code.INTERNAL.value)  # cut by an error, unless it ends or the client leaves
        try:
            if opening := frames.start():
                await response.write(opening)
            async with self.follow(request, task_id) as pieces:
                async for piece in pieces:
                    if data := frames.feed(piece):
                        await response.write(data)
                    if isinstance(piece, Done | Failed):
                        ending = ("end", "") if isinstance(piece, Done) else ("error", piece.error.code.value)
            await response.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            ending = ("disconnect", "")
            raise
        finally:
            log_stream_ended(task_id, *ending)
        return response

    async def collect(self, request: web.Request, task_id: str) -> Result:
        """Wait for the whole answer (non-streamed routes); raises the task's error."""
        result = Result()
        async with self.follow(request, task_id) as pieces:
            async for piece in pieces:
                result.add(piece)
        return result

    async def _cancel(self, task_id: str) -> None:
        log.info("client went away; canceling", extra={"event": "client_disconnect", "task_id": task_id})
        try:
            await asyncio.shield(self.scheduler.cancel(task_id))
        except OrchestratorError as exc:  # the task ends by its lease or deadline instead
            log.warning(
                "cancel on disconnect failed",
                extra={"event": "cancel_failed", "task_id": task_id, "error": exc.code.value},
            )

    async def _pieces(self, request: web.Request, task_id: str, state: _Following) -> AsyncIterator[Piece]:
        silent_s = 0.0
        waiting: Waiting | None = None
        with self.feed.subscribe(task_id) as sub:
            tail = Tail(self.store, task_id)
            async for batch in tail.batches(sub, DISCONNECT_POLL_S):
                if batch is None:
                    if _gone(request):
                        raise ConnectionResetError("the client went away")
                    silent_s += DISCONNECT_POLL_S
                    if silent_s >= KEEPALIVE_S:
                        silent_s = 0.0
                        yield waiting or Waiting(0, 0, "running")
                    continue
                silent_s = 0.0
                for event in batch:
                    for piece in _pieces_of(event):
                        if isinstance(piece, Waiting):
                            waiting = piece if piece.phase != "running" else None
                            if piece.phase == "running":
                                continue
                        if isinstance(piece, Done | Failed):
                            state.ended = True
                        yield piece
        if not state.ended:  # the log expired under us
            state.ended = True
            yield Failed(OrchestratorError(Code.NOT_FOUND, f"task {task_id} expired"))


@dataclass
class _Following:
    ended: bool = False


def _gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _pieces_of(event: Event) -> Iterator[Piece]:
    data = json.loads(event.data)
    name = event.name
    if name == EventName.TOKEN:
        if tool_calls := data.get("tool_calls"):
            yield ToolCalls(tool_calls)
        if data["t"]:
            yield Text(data["t"])
    elif name == EventName.STARTED:
        loading = data.get("phase") == "loading"
        yield Waiting(data["queue_position"], data["predicted_start_ms"], "loading" if loading else "queued")
    elif name == EventName.METRICS:
        phase = data.get("phase")
        if phase in ("queued", "loading"):
            yield Waiting(data["queue_position"], data["predicted_start_ms"], phase)
        elif phase == "dispatch":
            yield Waiting(0, 0, "running")
    elif name == EventName.END:
        yield Done(
            data.get("finish_reason", "stop"),
            data.get("tokens_in", 0),
            data.get("tokens_out", 0),
            data.get("embeddings"),
        )
    elif name in TERMINAL:
        context = {k: v for k, v in data.items() if k not in ("code", "message", "retriable")}
        yield Failed(OrchestratorError(Code(data["code"]), data["message"], **context))


def _priority(request: web.Request) -> str:
    value = request.headers.get("X-Priority", "interactive").strip().lower()
    if value not in ("interactive", "batch"):
        raise invalid("X-Priority", "X-Priority must be interactive or batch")
    return value


def _session(request: web.Request) -> str:
    value = request.headers.get("X-Session-Id", "").strip()
    if value and not is_valid_id(value):
        raise invalid("X-Session-Id", "X-Session-Id must match ^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$")
    return value


async def open_sse(request: web.Request, task_id: str) -> web.StreamResponse:
    """Start a compatible API's ``text/event-stream`` answer for ``task_id`` (``X-Task-Id`` names the
    task, so the native stream, status and cancel routes work on it)."""
    return await open_event_stream(request, {"X-Task-Id": task_id})


def waiting_comment(piece: Waiting) -> bytes:
    """An SSE comment (clients ignore it) saying where a waiting task stands; also the keepalive."""
    if piece.phase == "running":
        return b": keepalive\n\n"
    return (
        f": {piece.phase} queue_position={piece.queue_position} "
        f"predicted_start_ms={piece.predicted_start_ms}\n\n"
    ).encode()
