"""The mock engine's HTTP surface: the llama-server subset plus ``/mock/*`` (SPEC §8 "Mock engine")."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from aiohttp import web

from llorch_mockengine.chat import handle_chat
from llorch_mockengine.completion import handle_completion
from llorch_mockengine.embeddings import handle_embeddings
from llorch_mockengine.engine import Engine
from llorch_mockengine.generation import (
    BOS_TOKEN,
    CHATML_TEMPLATE,
    EOS_TOKEN,
    TOKEN_ID_BASE,
    WORDS,
    apply_chatml,
    tokenize,
)
from llorch_mockengine.knobs import ControlError, validate_control
from llorch_mockengine.replies import error_response, json_response

ENGINE = web.AppKey("engine", Engine)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_METRICS: tuple[tuple[str, str, str], ...] = (
    ("prompt_tokens_total", "counter", "Number of prompt tokens processed, excluding cached tokens"),
    ("prompt_seconds_total", "counter", "Total time spent processing prompts"),
    ("tokens_predicted_total", "counter", "Number of generation tokens processed"),
    ("tokens_predicted_seconds_total", "counter", "Total time spent generating tokens"),
    ("n_decode_total", "counter", "Total number of llama_decode() calls"),
    ("n_tokens_max", "counter", "Largest observed sequence length (prompt + generation)"),
    ("prompt_tokens_seconds", "gauge", "Average prompt throughput in tokens/s"),
    ("predicted_tokens_seconds", "gauge", "Average generation throughput in tokens/s"),
    ("requests_processing", "gauge", "Number of requests processing"),
    ("requests_deferred", "gauge", "Number of requests deferred"),
)


@web.middleware
async def loading_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """While "loading", every llama-server route answers 503 like the real server; ``/mock/*`` works."""
    if request.app[ENGINE].loading() and not request.path.startswith("/mock/"):
        return error_response(503, "Loading model", "unavailable_error")
    return await handler(request)


def _engine(request: web.Request) -> Engine:
    return request.app[ENGINE]


async def _json_body(request: web.Request) -> dict[str, object]:
    try:
        body = await request.json()
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text="request body must be a JSON object")
    return body


async def health(request: web.Request) -> web.Response:
    if _engine(request).knobs.preload_fail == "health":
        return json_response({"status": "error"}, status=500)
    return json_response({"status": "ok"})


async def props(request: web.Request) -> web.Response:
    knobs = _engine(request).knobs
    model_path = knobs.model or "mock"
    return json_response(
        {
            "default_generation_settings": {
                "n_ctx": knobs.n_ctx_slot,
                "params": {
                    "seed": 0xFFFFFFFF,
                    "temperature": 0.8,
                    "top_k": 40,
                    "top_p": 0.95,
                    "n_predict": -1,
                },
            },
            "total_slots": knobs.parallel,
            "model_alias": knobs.alias or model_path,
            "model_path": model_path,
            "chat_template": CHATML_TEMPLATE,
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "build_info": knobs.build_info,
            "endpoint_slots": True,
            "endpoint_metrics": True,
        }
    )


async def slots(request: web.Request) -> web.Response:
    engine = _engine(request)
    n_ctx = engine.knobs.n_ctx_slot
    return json_response([slot.as_json(n_ctx) for slot in engine.slots.slots])


async def slot_action(request: web.Request) -> web.Response:
    engine = _engine(request)
    try:
        slot_id = int(request.match_info["id"])
    except ValueError:
        slot_id = -1
    if not 0 <= slot_id < engine.knobs.parallel:
        return error_response(400, "Invalid slot ID", "invalid_request_error")
    if request.query.get("action") != "erase":
        return error_response(400, "Invalid action (the mock supports only erase)", "invalid_request_error")
    slot = await engine.slots.acquire(slot_id)  # llama-server defers the erase while the slot works
    try:
        erased, slot.n_cached = slot.n_cached, 0
    finally:
        engine.slots.release(slot)
    return json_response({"id_slot": slot_id, "n_erased": erased})


async def completion(request: web.Request) -> web.StreamResponse:
    return await handle_completion(request, _engine(request))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await handle_chat(request, _engine(request))


async def embeddings(request: web.Request) -> web.Response:
    return await handle_embeddings(request, _engine(request))


async def tokenize_route(request: web.Request) -> web.Response:
    body = await _json_body(request)
    content = body.get("content", "")
    if not isinstance(content, str):
        return error_response(400, "'content' must be a string", "invalid_request_error")
    pieces = tokenize(content)
    if body.get("with_pieces"):
        return json_response({"tokens": [{"id": tid, "piece": piece} for tid, piece in pieces]})
    return json_response({"tokens": [tid for tid, _ in pieces]})


async def apply_template(request: web.Request) -> web.Response:
    body = await _json_body(request)
    try:
        prompt = apply_chatml(body.get("messages"))
    except ValueError as exc:
        return error_response(400, str(exc), "invalid_request_error")
    return json_response({"prompt": prompt})


def render_metrics(engine: Engine) -> str:
    c = engine.counters
    values: dict[str, int | float] = {
        "prompt_tokens_total": c.prompt_tokens_total,
        "prompt_seconds_total": c.prompt_seconds_total,
        "tokens_predicted_total": c.tokens_predicted_total,
        "tokens_predicted_seconds_total": c.tokens_predicted_seconds_total,
        "n_decode_total": c.n_decode_total,
        "n_tokens_max": c.n_tokens_max,
        "prompt_tokens_seconds": _rate(c.prompt_tokens_total, c.prompt_seconds_total),
        "predicted_tokens_seconds": _rate(c.tokens_predicted_total, c.tokens_predicted_seconds_total),
        "requests_processing": engine.slots.processing,
        "requests_deferred": engine.slots.deferred,
    }
    lines: list[str] = []
    for name, kind, help_text in _METRICS:
        lines += [
            f"# HELP llamacpp:{name} {help_text}",
            f"# TYPE llamacpp:{name} {kind}",
            f"llamacpp:{name} {values[name]!r}",
        ]
    return "\n".join(lines) + "\n"


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


async def metrics(request: web.Request) -> web.Response:
    return web.Response(text=render_metrics(_engine(request)), content_type="text/plain", charset="utf-8")


async def models(request: web.Request) -> web.Response:
    engine = _engine(request)
    knobs = engine.knobs
    name = knobs.alias or knobs.model or "mock"
    meta = {
        "vocab_type": 2,
        "n_vocab": TOKEN_ID_BASE + len(WORDS),
        "n_ctx": knobs.ctx,
        "n_ctx_train": knobs.ctx,
        "n_embd": knobs.embedding_dim,
    }
    capabilities = ["completion", "embedding"] if knobs.embedding else ["completion"]
    return json_response(
        {
            "models": [{"name": name, "model": name, "type": "model", "capabilities": capabilities}],
            "object": "list",
            "data": [
                {
                    "id": name,
                    "aliases": [name],
                    "object": "model",
                    "created": int(engine.started_at),
                    "owned_by": "llamacpp",
                    "meta": meta,
                }
            ],
        }
    )


async def control_get(request: web.Request) -> web.Response:
    return json_response(_engine(request).knobs.as_json())


async def control_post(request: web.Request) -> web.Response:
    engine = _engine(request)
    try:
        body = json.loads(await request.read() or b"{}")
        if not isinstance(body, dict):
            raise ControlError("body must be a JSON object of knobs")
        changes = validate_control(body)
    except ValueError as exc:  # ControlError is a ValueError, and so is bad JSON
        return json_response({"error": str(exc)}, status=400)
    engine.apply(changes)
    return json_response(engine.knobs.as_json())


async def stats(request: web.Request) -> web.Response:
    return json_response(_engine(request).stats())


async def telemetry(request: web.Request) -> web.Response:
    knobs = _engine(request).knobs
    return json_response(
        {
            "vram_used_bytes": knobs.vram_used_bytes,
            "vram_total_bytes": knobs.vram_total_bytes,
            "gpu_util": knobs.gpu_util,
        }
    )


def build_app(engine: Engine) -> web.Application:
    app = web.Application(middlewares=[loading_gate], client_max_size=64 * 1024 * 1024)
    app[ENGINE] = engine
    app.router.add_get("/health", health)
    app.router.add_get("/props", props)
    app.router.add_get("/slots", slots)
    app.router.add_post("/slots/{id}", slot_action)
    app.router.add_post("/completion", completion)
    app.router.add_post("/completions", completion)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/chat/completions", chat_completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/embeddings", embeddings)
    app.router.add_post("/tokenize", tokenize_route)
    app.router.add_post("/apply-template", apply_template)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/models", models)
    app.router.add_get("/mock/control", control_get)
    app.router.add_post("/mock/control", control_post)
    app.router.add_get("/mock/stats", stats)
    app.router.add_get("/mock/telemetry", telemetry)
    return app
