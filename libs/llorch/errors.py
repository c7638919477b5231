"""One error tree for every service (SPEC §4).

Services raise :class:`OrchestratorError` with a :class:`Code`; the edges (one aiohttp middleware, one
gRPC decorator, one gRPC→domain mapper) translate it. HTTP status and retriability are fixed per code
and kept equal to ``contracts/error-codes.json`` by a test.
"""

from __future__ import annotations

import logging
from enum import StrEnum
from typing import Final

log = logging.getLogger(__name__)


class Code(StrEnum):
    INVALID_PARAMS = "INVALID_PARAMS"
    DEADLINE_UNMET = "DEADLINE_UNMET"
    UNTRUSTED_ARTIFACT = "UNTRUSTED_ARTIFACT"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"
    MODEL_NOT_ACTIVE = "MODEL_NOT_ACTIVE"
    MODEL_DEPRECATED = "MODEL_DEPRECATED"
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
    POLICY_DENIED = "POLICY_DENIED"
    NOT_FOUND = "NOT_FOUND"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    TASK_EXISTS = "TASK_EXISTS"
    MODEL_EXISTS = "MODEL_EXISTS"
    RELOAD_FAILED = "RELOAD_FAILED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    ADMISSION_REJECT = "ADMISSION_REJECT"
    QUEUE_FULL_DROP_LRU = "QUEUE_FULL_DROP_LRU"
    CANCELED = "CANCELED"
    INTERNAL = "INTERNAL"
    DECODE_TIMEOUT = "DECODE_TIMEOUT"
    WORKER_RESET = "WORKER_RESET"
    POOL_UNREADY = "POOL_UNREADY"
    POOL_UNAVAILABLE = "POOL_UNAVAILABLE"
    REPLICA_EXHAUSTED = "REPLICA_EXHAUSTED"


HTTP_STATUS: Final[dict[Code, int]] = {
    Code.INVALID_PARAMS: 400,
    Code.DEADLINE_UNMET: 400,
    Code.UNTRUSTED_ARTIFACT: 400,
    Code.UNAUTHENTICATED: 401,
    Code.FORBIDDEN: 403,
    Code.MODEL_NOT_ACTIVE: 403,
    Code.MODEL_DEPRECATED: 403,
    Code.BUDGET_EXHAUSTED: 403,
    Code.POLICY_DENIED: 403,
    Code.NOT_FOUND: 404,
    Code.METHOD_NOT_ALLOWED: 405,
    Code.TASK_EXISTS: 409,
    Code.MODEL_EXISTS: 409,
    Code.RELOAD_FAILED: 409,
    Code.PAYLOAD_TOO_LARGE: 413,
    Code.ADMISSION_REJECT: 429,
    Code.QUEUE_FULL_DROP_LRU: 429,
    Code.CANCELED: 499,
    Code.INTERNAL: 500,
    Code.DECODE_TIMEOUT: 500,
    Code.WORKER_RESET: 500,
    Code.POOL_UNREADY: 503,
    Code.POOL_UNAVAILABLE: 503,
    Code.REPLICA_EXHAUSTED: 503,
}

RETRIABLE: Final[frozenset[Code]] = frozenset(
    {
        Code.ADMISSION_REJECT,
        Code.QUEUE_FULL_DROP_LRU,
        Code.INTERNAL,
        Code.DECODE_TIMEOUT,
        Code.WORKER_RESET,
        Code.POOL_UNREADY,
        Code.REPLICA_EXHAUSTED,
    }
)

JsonScalar = str | int | float | bool | None
JsonValue = JsonScalar | list["JsonValue"] | dict[str, "JsonValue"]


class OrchestratorError(Exception):
    """A domain error with a SPEC §4 code; ``context`` holds the code's extra envelope fields."""

    def __init__(self, code: Code, message: str, **context: JsonValue) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.context: dict[str, JsonValue] = context

    @property
    def retriable(self) -> bool:
        return self.code in RETRIABLE

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def envelope(self) -> dict[str, JsonValue]:
        """The SPEC §2.1 error envelope: ``{code, message, retriable, ...context}``."""
        body: dict[str, JsonValue] = {
            "code": self.code.value,
            "message": self.message,
            "retriable": self.retriable,
        }
        body.update(self.context)
        return body

    def __repr__(self) -> str:
        return f"OrchestratorError({self.code.value}, {self.message!r})"


def store_unavailable(cause: BaseException | None = None) -> OrchestratorError:
    """What a request that needed Redis while it was away answers: 503, retriable, with a backoff
    (a store restart is as transient as a pool not Ready yet). ``cause``, the Redis error met, is
    logged here (its type only) for every edge that answers so."""
    if cause is not None:
        fields = {"event": "store_unavailable", "error": type(cause).__name__}
        log.warning("store unavailable", extra=fields)
    return OrchestratorError(
        Code.POOL_UNREADY, "the task store (Redis) is unavailable; retry shortly", retry_after_ms=1000
    )


def invalid(field: str, message: str, **context: JsonValue) -> OrchestratorError:
    """Shorthand for the most common error: 400 INVALID_PARAMS naming the field."""
    return OrchestratorError(Code.INVALID_PARAMS, message, field=field, **context)
