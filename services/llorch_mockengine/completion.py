"""``POST /completion``: llama-server's streaming and non-streaming completion, with the fault knobs.

The loop re-reads the knobs before every token, so ``POST /mock/control`` also steers streams in flight.
Faults before the first token are answered with an HTTP status (llama-server reports the first result's
error that way); later ones as an in-stream ``data: {"error": ...}`` event followed by the end of stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from llorch_mockengine.engine import ANY_SLOT, Engine, Slot
from llorch_mockengine.generation import (
    WORDS,
    compact_json,
    prompt_tokens,
    sse_event,
    token_chunk,
    word_indices,
)

log = logging.getLogger(__name__)

DEFAULT_N_PREDICT = 16
_SEED_RANDOM = (-1, 0xFFFFFFFF)
_SAMPLER_DEFAULTS: dict[str, float] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "repeat_penalty": 1.0,
}

Emit = Callable[[int, int], Awaitable[None]]


def json_response(body: object, status: int = 200) -> web.Response:
    """Compact JSON like llama-server's (no spaces after separators)."""
    return web.json_response(body, status=status, dumps=compact_json)


def error_body(code: int, message: str, kind: str, **extra: object) -> dict[str, object]:
    return {"error": {"code": code, "message": message, "type": kind, **extra}}


def error_response(code: int, message: str, kind: str, **extra: object) -> web.Response:
    return json_response(error_body(code, message, kind, **extra), status=code)


@dataclass(frozen=True, slots=True)
class CompletionParams:
    prompt: str
    n_predict: int
    seed: int
    stream: bool
    ignore_eos: bool
    id_slot: int
    settings: dict[str, object]


def _int_field(body: dict[str, object], key: str, default: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"'{key}' must be an integer")
    return int(value)


def parse_params(body: object) -> CompletionParams:
    """The request fields the mock honours; the sampler fields are only echoed back."""
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    prompt = body.get("prompt")
    if prompt is None:
        raise ValueError("key 'prompt' not found")
    if not isinstance(prompt, str):
        prompt = json.dumps(prompt, separators=(",", ":"))
    seed = _int_field(body, "seed", -1)
    if seed in _SEED_RANDOM:
        seed = int.from_bytes(os.urandom(4), "big")
    n_predict = _int_field(body, "n_predict", _int_field(body, "max_tokens", DEFAULT_N_PREDICT))
    settings: dict[str, object] = {"seed": seed, "n_predict": n_predict}
    for key, default in _SAMPLER_DEFAULTS.items():
        value = body.get(key, default)
        settings[key] = value if isinstance(value, int | float) and not isinstance(value, bool) else default
    settings["ignore_eos"] = bool(body.get("ignore_eos", False))
    settings["stream"] = bool(body.get("stream", False))
    return CompletionParams(
        prompt=prompt,
        n_predict=n_predict,
        seed=seed,
        stream=bool(body.get("stream", False)),
        ignore_eos=bool(body.get("ignore_eos", False)),
        id_slot=_int_field(body, "id_slot", ANY_SLOT),
        settings=settings,
    )


class ClientGone(Exception):
    """The client closed the connection while a token was being written."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client closed the stream")
        self.response = response


class EngineFault(Exception):
    """The ``--fail-after-tokens`` fault: an engine error object with llama-server's fields."""

    def __init__(self, fail_code: str, after: int) -> None:
        if fail_code == "oom":
            code, kind = 500, "server_error"
            message = (
                f"CUDA out of memory: failed to allocate compute buffer (mock fault after {after} tokens)"
            )
        elif fail_code == "503":
            code, kind = 503, "unavailable_error"
            message = f"Service temporarily unavailable (mock fault after {after} tokens)"
        else:
            code, kind = 500, "server_error"
            message = f"Internal server error (mock fault after {after} tokens)"
        super().__init__(message)
        self.code = code
        self.body = error_body(code, message, kind)


@dataclass(slots=True)
class _Run:
    """One completion's progress and timing, for the final chunk and the counters."""

    n_prompt: int
    limit: int
    truncated: bool
    t_start: float
    t_first: float = 0.0
    t_end: float = 0.0
    n_out: int = 0
    stop_type: str = "limit"


async def _generate(engine: Engine, slot: Slot, params: CompletionParams, run: _Run, emit: Emit) -> None:
    """Produce tokens into ``emit`` until a stop condition; faults raise, crash exits, hang waits."""
    words = word_indices(engine.model_digest, params.prompt, params.seed)
    counters = engine.counters
    while True:
        knobs = engine.knobs
        k = run.n_out
        if k >= run.limit:
            run.stop_type = "limit"
            break
        if not params.ignore_eos and knobs.eos_after is not None and k >= knobs.eos_after:
            run.stop_type = "eos"
            break
        if knobs.fail_after_tokens is not None and k >= knobs.fail_after_tokens:
            raise EngineFault(knobs.fail_code, k)
        if knobs.crash_after_tokens is not None and k >= knobs.crash_after_tokens:
            log.error("crashing after %d tokens (--crash-after-tokens)", k)
            os._exit(knobs.crash_exit_code)
        if knobs.hang_after_tokens is not None and k >= knobs.hang_after_tokens:
            await engine.knobs_changed()  # hangs until a control change (or the client leaves)
            continue
        delay_ms = knobs.first_token_delay_ms if k == 0 else knobs.token_delay_ms
        await asyncio.sleep(delay_ms / 1000)
        if k == 0:
            run.t_first = time.monotonic()
            counters.prompt_seconds_total += run.t_first - run.t_start
        run.n_out = k + 1
        slot.n_decoded = k + 1
        slot.n_remain = run.limit - k - 1
        counters.tokens_predicted_total += 1
        counters.n_decode_total += 1
        await emit(next(words), k + 1)
    run.t_end = time.monotonic()
    if run.n_out == 0:
        run.t_first = run.t_end
    counters.tokens_predicted_seconds_total += run.t_end - run.t_first
    counters.n_tokens_max = max(counters.n_tokens_max, run.n_prompt + run.n_out)


def _final(
    engine: Engine, slot: Slot, params: CompletionParams, run: _Run, content: str
) -> dict[str, object]:
    prompt_ms = (run.t_first - run.t_start) * 1000
    predicted_ms = (run.t_end - run.t_first) * 1000
    knobs = engine.knobs
    return {
        "index": 0,
        "content": content,
        "tokens": [],
        "id_slot": slot.id,
        "stop": True,
        "model": knobs.alias or knobs.model or "mock",
        "tokens_predicted": run.n_out,
        "tokens_evaluated": run.n_prompt,
        "generation_settings": params.settings,
        "prompt": params.prompt,
        "has_new_line": False,
        "truncated": run.truncated and run.stop_type == "limit",
        "stop_type": run.stop_type,
        "stopping_word": "",
        "tokens_cached": run.n_prompt + run.n_out,
        "timings": {
            "cache_n": 0,
            "prompt_n": run.n_prompt,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / run.n_prompt,
            "prompt_per_second": run.n_prompt / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
            "predicted_n": run.n_out,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / run.n_out if run.n_out else 0.0,
            "predicted_per_second": run.n_out / predicted_ms * 1000 if predicted_ms > 0 else 0.0,
        },
    }


async def _respond_stream(
    request: web.Request, engine: Engine, slot: Slot, params: CompletionParams, run: _Run
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    n_prompt = run.n_prompt

    async def emit(word: int, k: int) -> None:
        if not resp.prepared:
            await resp.prepare(request)
        await resp.write(token_chunk(word, k, n_prompt))

    try:
        await _generate(engine, slot, params, run, emit)
    except ConnectionResetError:
        raise ClientGone(resp) from None
    except EngineFault as fault:
        if not resp.prepared:
            return json_response(fault.body, status=fault.code)
        await resp.write(sse_event(fault.body))
        resp.force_close()
        await resp.write_eof()
        return resp
    if not resp.prepared:
        await resp.prepare(request)
    await resp.write(sse_event(_final(engine, slot, params, run, "")))
    await resp.write_eof()
    return resp


async def _respond_plain(engine: Engine, slot: Slot, params: CompletionParams, run: _Run) -> web.Response:
    pieces: list[str] = []

    async def emit(word: int, _k: int) -> None:
        pieces.append(" " + WORDS[word])

    try:
        await _generate(engine, slot, params, run, emit)
    except EngineFault as fault:
        return json_response(fault.body, status=fault.code)
    return json_response(_final(engine, slot, params, run, "".join(pieces)))


async def handle_completion(request: web.Request, engine: Engine) -> web.StreamResponse:
    try:
        params = parse_params(await request.json())
    except ValueError as exc:
        return error_response(400, str(exc), "invalid_request_error")
    n_prompt = prompt_tokens(params.prompt)
    n_ctx = engine.knobs.n_ctx_slot
    if n_prompt >= n_ctx:
        message = (
            f"request ({n_prompt} tokens) exceeds the available context size ({n_ctx} tokens), "
            "try increasing it"
        )
        return error_response(
            400, message, "exceed_context_size_error", n_prompt_tokens=n_prompt, n_ctx=n_ctx
        )
    want = params.id_slot if engine.slots.valid(params.id_slot) else ANY_SLOT
    counters = engine.counters
    counters.requests_total += 1
    counters.active += 1
    completed = False
    try:
        slot = await engine.slots.acquire(want)
        try:
            room = n_ctx - n_prompt
            limit = params.n_predict if 0 <= params.n_predict <= room else room
            truncated = not 0 <= params.n_predict <= room
            run = _Run(n_prompt=n_prompt, limit=limit, truncated=truncated, t_start=time.monotonic())
            slot.id_task, slot.n_prompt_tokens, slot.n_decoded, slot.n_remain = (
                engine.next_task_id(),
                n_prompt,
                0,
                limit,
            )
            counters.prompt_tokens_total += n_prompt
            if params.stream:
                response = await _respond_stream(request, engine, slot, params, run)
            else:
                response = await _respond_plain(engine, slot, params, run)
            completed = True
            slot.n_cached = run.n_prompt + run.n_out
            return response
        finally:
            engine.slots.release(slot)
    except ClientGone as gone:
        # aiohttp copes with returning the half-written response of a closed connection.
        return gone.response
    finally:
        counters.active -= 1
        if not completed:
            counters.aborted_total += 1
