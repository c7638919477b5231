"""The one place an error becomes each API's own error body: native (SPEC §2.1), OpenAI or Anthropic.

The route decides the dialect (:func:`dialect_of`), so errors raised before any handler runs (auth,
size limits, unknown fields, a malformed body) already reach an SDK in the shape it parses. The HTTP
status, ``Retry-After`` and ``X-Backoff-Ms`` are the same in every dialect (:mod:`.edge`).

- OpenAI: ``{error: {message, type, code, param}}``; ``type`` by status (SPEC §2.4), ``code`` the
  SPEC §4 code, except a prompt over the context: ``context_length_exceeded`` (what OpenAI's own API
  and clients such as aider look for).
- Anthropic: ``{type: "error", error: {type, message}}`` with Anthropic's error types.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

from llorch.errors import Code, JsonValue, OrchestratorError


class Dialect(StrEnum):
    NATIVE = "native"
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


_OPENAI_PATHS: Final = ("/v1/chat/", "/v1/completions", "/v1/embeddings", "/v1/models", "/v1/responses")
_ANTHROPIC_PATHS: Final = ("/v1/messages",)

_OPENAI_TYPES: Final[dict[int, str]] = {
    401: "authentication_error",
    403: "permission_error",
    429: "rate_limit_error",
    499: "request_canceled",
}
_ANTHROPIC_TYPES: Final[dict[int, str]] = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
CONTEXT_LENGTH_EXCEEDED: Final = "context_length_exceeded"


def dialect_of(path: str) -> Dialect:
    if path.startswith(_ANTHROPIC_PATHS):
        return Dialect.ANTHROPIC
    if path.startswith(_OPENAI_PATHS):
        return Dialect.OPENAI
    return Dialect.NATIVE


def error_body(exc: OrchestratorError, dialect: Dialect) -> dict[str, JsonValue]:
    if dialect == Dialect.OPENAI:
        return {"error": openai_error(exc)}
    if dialect == Dialect.ANTHROPIC:
        return anthropic_error(exc)
    return exc.envelope()


def is_context_overflow(exc: OrchestratorError) -> bool:
    return exc.code == Code.INVALID_PARAMS and "context_length" in exc.context


def openai_error(exc: OrchestratorError) -> dict[str, JsonValue]:
    """The ``error`` object, also what a stream sends as ``data: {"error": ...}``."""
    status = exc.http_status
    kind = _OPENAI_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    message = exc.message
    code: str = exc.code.value
    param = exc.context.get("field")
    if is_context_overflow(exc):
        code = CONTEXT_LENGTH_EXCEEDED
        param = "messages"
        message = (
            f"This model's maximum context length is {exc.context['context_length']} tokens, but the "
            f"request needs {exc.context.get('prompt_tokens')} prompt tokens ({exc.message})"
        )
    body: dict[str, JsonValue] = {"message": message, "type": kind, "code": code, "param": param}
    if "retry_after_ms" in exc.context:
        body["retry_after_ms"] = exc.context["retry_after_ms"]
    return body


def anthropic_error(exc: OrchestratorError) -> dict[str, JsonValue]:
    status = exc.http_status
    kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    message = exc.message
    if is_context_overflow(exc):
        message = (
            f"prompt is too long: {exc.context.get('prompt_tokens')} tokens > "
            f"{exc.context['context_length']} maximum ({exc.message})"
        )
    return {"type": "error", "error": {"type": kind, "message": message, "code": exc.code.value}}
