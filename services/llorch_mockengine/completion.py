"""``POST /completion``: llama-server's streaming and non-streaming completion, on the shared decode loop."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from aiohttp import web

from llorch_mockengine.decode import ClientGone, EngineFault, Run, generate, serve_in_slot
from llorch_mockengine.engine import ANY_SLOT, Engine, Slot
from llorch_mockengine.generation import (
    WORDS,
    prompt_tokens,
    sse_event,
    token_chunk,
    word_indices,
)
from llorch_mockengine.replies import bad_request, json_response

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


@dataclass(frozen=True, slots=True)
class CompletionParams:
    prompt: str
    n_predict: int
    seed: int
    stream: bool
    ignore_eos: bool
    id_slot: int
    settings: dict[str, object]


def int_field(body: dict[str, object], key: str, default: int) -> int:
    """An integer request field (``3.0`` counts, like in llama-server's JSON); absent or null → default."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"'{key}' must be an integer")
    return int(value)


def parse_seed(body: dict[str, object]) -> int:
    """The request's seed; absent, -1 or 0xFFFFFFFF mean a random one, like llama-server's."""
    seed = int_field(body, "seed", -1)
    return int.from_bytes(os.urandom(4), "big") if seed in _SEED_RANDOM else seed


def parse_params(body: object) -> CompletionParams:
    """The request fields the mock honours; the sampler fields are only echoed back."""
    if not isinstance(body, dict):
        raise ValueError("request body must be a JSON object")
    prompt = body.get("prompt")
    if prompt is None:
        raise ValueError("key 'prompt' not found")
    if not isinstance(prompt, str):
        prompt = json.dumps(prompt, separators=(",", ":"))
    seed = parse_seed(body)
    n_predict = int_field(body, "n_predict", int_field(body, "max_tokens", DEFAULT_N_PREDICT))
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
        id_slot=int_field(body, "id_slot", ANY_SLOT),
        settings=settings,
    )


def _final(engine: Engine, slot: Slot, params: CompletionParams, run: Run, content: str) -> dict[str, object]:
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
        "timings": run.timings(),
    }


async def _respond_stream(
    request: web.Request, engine: Engine, slot: Slot, params: CompletionParams, run: Run
) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    n_prompt = run.n_prompt

    async def emit(word: int, k: int) -> None:
        if not resp.prepared:
            await resp.prepare(request)
        await resp.write(token_chunk(word, k, n_prompt))

    words = word_indices(engine.model_digest, params.prompt, params.seed)
    try:
        await generate(engine, slot, run, words, emit, params.ignore_eos)
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


async def _respond_plain(engine: Engine, slot: Slot, params: CompletionParams, run: Run) -> web.Response:
    pieces: list[str] = []

    async def emit(word: int, _k: int) -> None:
        pieces.append(" " + WORDS[word])

    words = word_indices(engine.model_digest, params.prompt, params.seed)
    try:
        await generate(engine, slot, run, words, emit, params.ignore_eos)
    except EngineFault as fault:
        return json_response(fault.body, status=fault.code)
    return json_response(_final(engine, slot, params, run, "".join(pieces)))


async def handle_completion(request: web.Request, engine: Engine) -> web.StreamResponse:
    try:
        params = parse_params(await request.json())
    except ValueError as exc:
        return bad_request(str(exc))
    if engine.knobs.log_requests:
        log.info("completion settings %s", json.dumps(params.settings, sort_keys=True))

    async def respond(slot: Slot, run: Run) -> web.StreamResponse:
        if params.stream:
            return await _respond_stream(request, engine, slot, params, run)
        return await _respond_plain(engine, slot, params, run)

    return await serve_in_slot(
        engine, prompt_tokens(params.prompt), params.n_predict, params.id_slot, respond
    )
