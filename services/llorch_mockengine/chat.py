"""``POST /v1/chat/completions``: llama-server's OpenAI chat route, on the shared decode loop.

The messages are rendered with the built-in ChatML template and the rendered prompt drives the same
deterministic words, slots, pacing and fault knobs as ``/completion``. A tool call or a JSON answer
(``structured``) is streamed in small pieces that count as tokens. Stream framing follows llama-server:
a role chunk, one chunk per token, a chunk with the ``finish_reason``, the usage chunk when asked for,
then ``data: [DONE]`` (also after an in-stream error).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from llorch_mockengine.completion import DEFAULT_N_PREDICT, int_field, parse_seed
from llorch_mockengine.decode import ClientGone, EngineFault, Run, generate, serve_in_slot
from llorch_mockengine.engine import ANY_SLOT, Engine, Slot
from llorch_mockengine.generation import (
    WORDS,
    apply_chatml,
    message_text,
    prompt_tokens,
    sse_event,
    word_indices,
)
from llorch_mockengine.replies import bad_request, json_response
from llorch_mockengine.structured import Plan, Structured, ToolCall, plan_answer, sample_answer

DONE: Final = b"data: [DONE]\n\n"
_LIMIT_KEYS: Final = ("max_completion_tokens", "max_tokens", "n_predict")


@dataclass(frozen=True, slots=True)
class ChatParams:
    prompt: str
    n_predict: int
    seed: int
    stream: bool
    include_usage: bool
    ignore_eos: bool
    id_slot: int
    plan: Plan | None


def _flag(body: dict[str, object], key: str) -> bool:
    value = body.get(key)
    if value is not None and not isinstance(value, bool):
        raise ValueError(f"'{key}' must be a boolean")
    return bool(value)


def _check_optional(body: dict[str, object]) -> None:
    """Fields the mock accepts without using them still have to be well-formed."""
    for key in ("temperature", "top_p"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ValueError(f"'{key}' must be a number")
    stop = body.get("stop")
    words = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
        raise ValueError("'stop' must be a string or an array of strings")


def parse_chat(body: object) -> ChatParams:
    """The chat request fields the mock honours or checks; unknown fields are ignored."""
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' is required and must be a non-empty array")
    prompt = apply_chatml(messages)
    _check_optional(body)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ValueError("'stream_options' must be an object")
    last_user: dict[str, object] = next((m for m in reversed(messages) if m["role"] == "user"), {})
    plan = plan_answer(body, message_text(last_user.get("content")))
    # Free text is endless, so it gets /completion's default; a structured answer ends by itself.
    default = DEFAULT_N_PREDICT if plan is None else -1
    limit_key = next((key for key in _LIMIT_KEYS if body.get(key) is not None), None)
    return ChatParams(
        prompt=prompt,
        n_predict=default if limit_key is None else int_field(body, limit_key, default),
        seed=parse_seed(body),
        stream=_flag(body, "stream"),
        include_usage=_flag(options or {}, "include_usage"),
        ignore_eos=_flag(body, "ignore_eos"),
        id_slot=int_field(body, "id_slot", ANY_SLOT),
        plan=plan,
    )


class _Answer:
    """One chat answer's identity and its wire shapes (llama-server's key order)."""

    def __init__(self, engine: Engine, params: ChatParams) -> None:
        knobs = engine.knobs
        self.engine = engine
        self.params = params
        self.id = "chatcmpl-" + secrets.token_hex(16)
        self.created = int(time.time())
        self.model = knobs.alias or knobs.model or "mock"
        self.fingerprint = knobs.build_info
        self.structured: Structured | None = None
        if params.plan is not None:
            self.structured = sample_answer(params.plan, engine.model_digest, params.prompt, params.seed)

    @property
    def tool(self) -> ToolCall | None:
        plan = self.structured.plan if self.structured is not None else None
        return plan if isinstance(plan, ToolCall) else None

    def tokens(self) -> Iterator[str]:
        if self.structured is not None:
            return iter(self.structured.pieces)
        words = word_indices(self.engine.model_digest, self.params.prompt, self.params.seed)
        return (" " + WORDS[word] for word in words)

    def finish_reason(self, run: Run) -> str:
        if run.stop_type == "limit":
            return "length"
        return "tool_calls" if self.tool is not None else "stop"

    def envelope(self, kind: str, choices: list[dict[str, object]]) -> dict[str, object]:
        return {
            "choices": choices,
            "created": self.created,
            "id": self.id,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "object": kind,
        }

    def usage(self, run: Run) -> dict[str, object]:
        """``usage`` and ``timings``, or nothing while the ``chat_usage`` knob is off."""
        if not self.engine.knobs.chat_usage:
            return {}
        counts = {
            "completion_tokens": run.n_out,
            "prompt_tokens": run.n_prompt,
            "total_tokens": run.n_prompt + run.n_out,
        }
        return {"usage": counts, "timings": run.timings()}

    def chunk(self, delta: dict[str, object], finish_reason: str | None = None) -> bytes:
        choice: dict[str, object] = {"finish_reason": finish_reason, "index": 0, "delta": delta}
        return sse_event(self.envelope("chat.completion.chunk", [choice]))

    def opening(self) -> bytes:
        """The role chunk and, for a tool call, the call's header (name and id, empty arguments)."""
        head = self.chunk({"role": "assistant", "content": None})
        tool = self.tool
        if tool is None or self.structured is None:
            return head
        call = {"index": 0, "id": self.structured.call_id, "type": "function"}
        return head + self.chunk({"tool_calls": [call | {"function": {"name": tool.name, "arguments": ""}}]})

    def token(self, piece: str) -> bytes:
        if self.tool is None:
            return self.chunk({"content": piece})
        return self.chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})

    def message(self, text: str) -> dict[str, object]:
        tool = self.tool
        if tool is None or self.structured is None:
            return {"role": "assistant", "content": text}
        function = {"name": tool.name, "arguments": text}
        call = {"type": "function", "function": function, "id": self.structured.call_id}
        return {"role": "assistant", "content": None, "tool_calls": [call]}


async def _respond_stream(request: web.Request, answer: _Answer, slot: Slot, run: Run) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})

    async def open_stream() -> None:
        if not resp.prepared:
            await resp.prepare(request)
            await resp.write(answer.opening())

    async def emit(piece: str, _k: int) -> None:
        await open_stream()
        await resp.write(answer.token(piece))

    try:
        try:
            await generate(answer.engine, slot, run, answer.tokens(), emit, _ignore_eos(answer))
        except EngineFault as fault:
            if not resp.prepared:
                return json_response(fault.body, status=fault.code)
            await resp.write(sse_event(fault.body) + DONE)
            resp.force_close()
            await resp.write_eof()
            return resp
        await open_stream()
        await resp.write(answer.chunk({}, answer.finish_reason(run)))
        usage = answer.usage(run)
        if answer.params.include_usage and usage:
            await resp.write(sse_event(answer.envelope("chat.completion.chunk", []) | usage))
        await resp.write(DONE)
        await resp.write_eof()
    except ConnectionResetError:
        raise ClientGone(resp) from None
    return resp


async def _respond_plain(answer: _Answer, slot: Slot, run: Run) -> web.Response:
    pieces: list[str] = []

    async def emit(piece: str, _k: int) -> None:
        pieces.append(piece)

    try:
        await generate(answer.engine, slot, run, answer.tokens(), emit, _ignore_eos(answer))
    except EngineFault as fault:
        return json_response(fault.body, status=fault.code)
    choice = {
        "finish_reason": answer.finish_reason(run),
        "index": 0,
        "message": answer.message("".join(pieces)),
    }
    return json_response(answer.envelope("chat.completion", [choice]) | answer.usage(run))


def _ignore_eos(answer: _Answer) -> bool:
    # A grammar-constrained answer cannot end before its document does, so ``--eos-after`` spares it.
    return answer.params.ignore_eos or answer.structured is not None


async def handle_chat(request: web.Request, engine: Engine) -> web.StreamResponse:
    try:
        params = parse_chat(await request.json())
    except (ValueError, RecursionError) as exc:  # RecursionError: JSON nested too deep to parse
        return bad_request(str(exc))
    answer = _Answer(engine, params)

    async def respond(slot: Slot, run: Run) -> web.StreamResponse:
        if params.stream:
            return await _respond_stream(request, answer, slot, run)
        return await _respond_plain(answer, slot, run)

    return await serve_in_slot(
        engine, prompt_tokens(params.prompt), params.n_predict, params.id_slot, respond
    )
