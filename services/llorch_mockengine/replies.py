"""JSON answers and llama-server's error objects, shared by every route of the mock engine."""

from __future__ import annotations

from aiohttp import web

from llorch_mockengine.generation import compact_json


def json_response(body: object, status: int = 200) -> web.Response:
    """Compact JSON like llama-server's (no spaces after separators)."""
    return web.json_response(body, status=status, dumps=compact_json)


def error_body(code: int, message: str, kind: str, **extra: object) -> dict[str, object]:
    return {"error": {"code": code, "message": message, "type": kind, **extra}}


def error_response(code: int, message: str, kind: str, **extra: object) -> web.Response:
    return json_response(error_body(code, message, kind, **extra), status=code)


def bad_request(message: str) -> web.Response:
    """llama-server's answer to a body it cannot use: 400 ``invalid_request_error``."""
    return error_response(400, message, "invalid_request_error")


def context_exceeded(n_prompt: int, n_ctx: int) -> web.Response | None:
    """llama-server's 400 for a prompt that does not fit the slot (it needs room for one token), else None."""
    if n_prompt < n_ctx:
        return None
    message = (
        f"request ({n_prompt} tokens) exceeds the available context size ({n_ctx} tokens), try increasing it"
    )
    return error_response(400, message, "exceed_context_size_error", n_prompt_tokens=n_prompt, n_ctx=n_ctx)
