"""gRPC edges shared by every service: internal auth, correlation ids, domain-error translation.

A domain error crosses gRPC as a status (code by HTTP class) plus trailing metadata ``x-llorch-error``
carrying the SPEC §4 envelope as JSON; :func:`from_rpc_error` turns it back into the same
:class:`OrchestratorError` on the caller's side. Anything else becomes ``INTERNAL``.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final, TypeVar, cast

import grpc
import grpc.aio
from redis.exceptions import RedisError

from llorch.errors import Code, OrchestratorError, store_unavailable
from llorch.logs import correlation_id_var

log = logging.getLogger(__name__)

ERROR_KEY: Final = "x-llorch-error"
CORRELATION_KEY: Final = "x-correlation-id"
DEFAULT_DEADLINE_S: Final = 10.0

_STATUS_BY_HTTP: Final = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.ALREADY_EXISTS,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    503: grpc.StatusCode.UNAVAILABLE,
}


def load_internal_token(state_dir: Path, token_file: Path | None = None, create: bool = False) -> str:
    """The internal gRPC token: ``LLORCH_INTERNAL_TOKEN``, else the token file (created when asked)."""
    from_env = os.environ.get("LLORCH_INTERNAL_TOKEN")
    if from_env:
        return from_env
    path = token_file or state_dir / "internal.token"
    if not path.exists():
        if not create:
            raise OrchestratorError(
                Code.INTERNAL, f"internal token file {path} is missing; start with llorch up"
            )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def metadata(token: str, correlation_id: str | None = None) -> tuple[tuple[str, str], ...]:
    """Call metadata: the internal bearer token and the correlation id of the request being served."""
    cid = correlation_id or correlation_id_var.get()
    base = auth_metadata(token)
    return (*base, (CORRELATION_KEY, cid)) if cid else base


def auth_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """The internal bearer token alone: a long-lived stream's metadata (each call carries the rest)."""
    return (("authorization", f"Bearer {token}"),)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Rejects calls without the internal token (health checks excepted)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        method = handler_call_details.method or ""
        if method.startswith("/grpc.health.v1.Health/"):
            return await continuation(handler_call_details)
        offered = b""
        for key, value in handler_call_details.invocation_metadata or ():
            if key == "authorization":
                offered = value.encode() if isinstance(value, str) else value
        if not hmac.compare_digest(offered, self._expected):
            return _deny_handler(method, "internal token missing" if not offered else "internal token wrong")
        return await continuation(handler_call_details)


def _deny_handler(method: str, reason: str) -> grpc.RpcMethodHandler[Any, Any]:
    """Refuse the call, and log it (never the offered value) with the peer, so a misconfigured pool
    manager on another host shows up in this service's log."""

    async def deny(_request: object, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        event = "poolmgr_refused" if method.endswith("/RegisterPoolManager") else "rpc_refused"
        fields = {"event": event, "reason": reason, "path": method, "address": context.peer()}
        log.warning("internal call refused", extra=fields)
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "internal token missing or wrong")

    return grpc.unary_unary_rpc_method_handler(deny)


T = TypeVar("T")
Servicer = TypeVar("Servicer")


def unary(
    method: Callable[[Servicer, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[T]],
) -> Callable[[Servicer, Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[T]]:
    """Decorate a unary servicer method: bind the caller's correlation id, translate domain errors."""

    @functools.wraps(method)
    async def wrapper(self: Servicer, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> T:
        bind_correlation(context)
        try:
            return await method(self, request, context)
        except OrchestratorError as exc:
            await abort_with(context, exc)
            raise  # abort() raises; this line keeps type checkers honest
        except RedisError as exc:  # Redis is away (restarting): the caller should retry, not give up
            await abort_with(context, store_unavailable(exc))
            raise

    return wrapper


def bind_correlation(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    for key, value in _pairs(context.invocation_metadata()):
        if key == CORRELATION_KEY:
            correlation_id_var.set(str(value))


async def abort_with(context: grpc.aio.ServicerContext[Any, Any], exc: OrchestratorError) -> None:
    status = _STATUS_BY_HTTP.get(exc.http_status, grpc.StatusCode.INTERNAL)
    context.set_trailing_metadata(((ERROR_KEY, envelope_json(exc)),))
    await context.abort(status, exc.message)


def envelope_json(exc: OrchestratorError) -> str:
    """A domain error as it crosses gRPC (in ``x-llorch-error``, or in a stream's result)."""
    return json.dumps(exc.envelope())


def from_envelope(text: str | bytes) -> OrchestratorError:
    """The domain error :func:`envelope_json` wrote."""
    envelope = json.loads(text)
    code = Code(envelope.pop("code"))
    message = envelope.pop("message")
    envelope.pop("retriable", None)
    return OrchestratorError(code, message, **envelope)


def from_rpc_error(exc: grpc.aio.AioRpcError, what: str) -> OrchestratorError:
    """The gateway's one gRPC→domain mapper."""
    for key, value in _pairs(exc.trailing_metadata()):
        if key == ERROR_KEY:
            return from_envelope(value)
    log.warning("rpc failed", extra={"event": "rpc_failed", "code": exc.code().name, "reason": what})
    if exc.code() in UNREACHABLE:
        return unreachable(what, exc.code().name)
    return OrchestratorError(Code.INTERNAL, f"{what} is unavailable ({exc.code().name}); retry shortly")


def unreachable(what: str, why: str) -> OrchestratorError:
    """A service not answering (restarting, or too slow): 503, retriable."""
    return OrchestratorError(
        Code.POOL_UNREADY,
        f"{what} is unreachable ({why}); retry after {UNREACHABLE_RETRY_MS} ms",
        retry_after_ms=UNREACHABLE_RETRY_MS,
    )


UNREACHABLE: Final = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
"""gRPC statuses with no envelope that mean "cannot be reached now"."""
UNREACHABLE_RETRY_MS: Final = 1000
"""The Retry-After while a service is unreachable (a supervised restart takes about a second)."""


def _pairs(md: object) -> list[tuple[str, str | bytes]]:
    """Metadata as (key, value) pairs; the grpc stubs disagree with the runtime about its shape."""
    return [(str(item[0]), item[1]) for item in cast(Any, md) or ()]
