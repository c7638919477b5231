"""The HTTP edge: correlation ids on every response and the one place errors become responses.

Every rejection carries the SPEC §2.1 envelope and ``X-Correlation-Id``: the ones our handlers raise
(:func:`edge`), and the ones aiohttp's HTTP parser makes before any handler runs (folded headers, a
header line over 8 KB, Content-Length with Transfer-Encoding, a duplicate Content-Length...), through
:class:`EdgeRequestHandler`, a thin subclass of aiohttp's protocol that overrides its one error hook.

Slow and idle clients are bounded:

- **Request head and idle connections**: ``api.keepalive_timeout_s`` (15). aiohttp runs one timer per
  connection, from the moment it opens and again from the end of each response; a connection whose
  next request head is not complete by then is closed (no response: none was asked for yet).
- **Request body**: ``api.body_timeout_s`` (15). The whole body must arrive within this time of the
  head, else 400 ``INVALID_PARAMS`` (``field: body``) with ``Connection: close`` (a chunked body that
  never ends, a body shorter than its Content-Length). :func:`read_body` reads it after auth, before
  the handlers, which get it from memory; an unauthenticated client never makes us read a body.
- **After a rejection**: :data:`LINGER_S`, the most time spent draining the rest of an unread body
  before the connection is closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web
from aiohttp.web_protocol import RequestHandler
from redis.exceptions import RedisError

from llorch.errors import Code, OrchestratorError, store_unavailable
from llorch.ids import correlation_id
from llorch.logs import correlation_id_var

from .dialects import dialect_of, error_body
from .metrics import GatewayMetrics

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CORRELATION_HEADER: Final = "X-Correlation-Id"
MAX_BODY: Final = web.AppKey("max_body_bytes", int)
LARGE_BODIES: Final = web.AppKey("large_bodies", dict[str, int])
"""Routes (by path) whose body limit is above ``api.max_body_bytes``: the artifacts upload
(``artifacts.max_bytes`` plus 64 KiB for the envelope, SPEC §5.8)."""


def body_limit(request: web.Request) -> int:
    """The body limit of ``request``'s route: ``api.max_body_bytes`` unless the route is a large one."""
    return request.app[LARGE_BODIES].get(request.path, request.app[MAX_BODY])


BODY_TIMEOUT: Final = web.AppKey("body_timeout_s", float)
METRICS: Final = web.AppKey("gateway_metrics", GatewayMetrics)
CORRELATION_ID: Final = web.RequestKey("correlation_id", str)  # set by :func:`edge` on every request

LINGER_S: Final = 2.0
"""After a response to a request whose body was not read, drain it at most this long, then close."""
MAX_LINE_BYTES: Final = 8190
"""The longest request line or header line accepted (aiohttp's default, stated)."""


def route_template(request: web.Request) -> str:
    """The matched route's template (``/v1/tasks/{task_id}``), for logs and metrics: never the raw
    path, which may carry anything a client put in it, a token included."""
    info = request.match_info.route.resource
    return info.canonical if info is not None else "unmatched"


def error_response(exc: OrchestratorError, request: web.BaseRequest) -> web.Response:
    """The error response of ``exc``, in the route's dialect (:mod:`.dialects`)."""
    headers = {CORRELATION_HEADER: request.get(CORRELATION_ID, "")}
    retry_ms = exc.context.get("retry_after_ms")
    if isinstance(retry_ms, int) and exc.http_status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(retry_ms / 1000)))
        headers["X-Backoff-Ms"] = str(retry_ms)
    if exc.code == Code.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = 'Bearer realm="llorch"'
    allow = exc.context.get("allow")
    if exc.code == Code.METHOD_NOT_ALLOWED and isinstance(allow, str):
        headers["Allow"] = allow
    body = error_body(exc, dialect_of(request.path))
    return web.Response(
        status=exc.http_status,
        text=json.dumps(body, separators=(",", ":")),
        content_type="application/json",
        headers=headers,
    )


def _from_http(exc: web.HTTPException, request: web.Request) -> OrchestratorError:
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allow = ", ".join(sorted(exc.allowed_methods))
        return OrchestratorError(
            Code.METHOD_NOT_ALLOWED,
            f"{request.method} is not allowed on {request.path}; use {allow}",
            allow=allow,
        )
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        limit = body_limit(request)
        return OrchestratorError(
            Code.PAYLOAD_TOO_LARGE, f"the body is over the limit of {limit} bytes", limit_bytes=limit
        )
    if isinstance(exc, web.HTTPNotFound):
        return OrchestratorError(Code.NOT_FOUND, f"no route {request.path}")
    return OrchestratorError(Code.INVALID_PARAMS, exc.reason or "bad request", field="request")


@web.middleware
async def read_body(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Read the body within ``api.body_timeout_s``, then run the handler; a closing 400 when it cannot
    be read in time or is malformed."""
    if not request.body_exists:
        return await handler(request)
    if (limit := body_limit(request)) != request.app[MAX_BODY]:
        request = request.clone(client_max_size=limit)  # before the read: the limit is the clone's
    limit_s = request.app[BODY_TIMEOUT]
    try:
        async with asyncio.timeout(limit_s):
            await request.read()  # cached: the handler's read() and json() get it from memory
    except TimeoutError:
        log.info("request body timed out", extra={"event": "body_timeout", "route": route_template(request)})
        response = error_response(
            OrchestratorError(
                Code.INVALID_PARAMS,
                f"the request body did not arrive within {limit_s:g} s",
                field="body",
            ),
            request,
        )
    except web.RequestPayloadError as exc:
        log.info("malformed request body", extra={"event": "bad_body", "route": route_template(request)})
        response = error_response(
            OrchestratorError(Code.INVALID_PARAMS, f"the request body is malformed: {exc}", field="body"),
            request,
        )
    else:
        return await handler(request)
    response.force_close()
    return response


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    cid = correlation_id(request.headers.get(CORRELATION_HEADER))
    request[CORRELATION_ID] = cid
    token = correlation_id_var.set(cid)
    status = 500
    try:
        try:
            response = await handler(request)
        except OrchestratorError as exc:
            response = error_response(exc, request)
        except web.HTTPException as exc:
            response = error_response(_from_http(exc, request), request)
        except (ConnectionResetError, TimeoutError):
            raise
        except RedisError as exc:  # Redis is away: tell the client to retry (a stream ends itself)
            if request.writer.output_size > 0:
                raise ConnectionResetError("the response had started; connection closed") from None
            response = error_response(store_unavailable(exc), request)
        except Exception:  # the edge of the service: never a traceback to a client
            if request.writer.output_size > 0:
                # The response has started: a second one would land inside its body. Drop the
                # connection instead (a handler that streams should end its own stream first).
                log.exception("error after the response started", extra={"event": "response_aborted"})
                raise ConnectionResetError("the response had started; connection closed") from None
            log.exception(
                "unhandled error", extra={"event": "internal_error", "route": route_template(request)}
            )
            response = error_response(
                OrchestratorError(Code.INTERNAL, "internal error; retry shortly"), request
            )
        if not response.prepared:
            response.headers[CORRELATION_HEADER] = cid
        status = response.status
        return response
    finally:
        correlation_id_var.reset(token)
        request.app[METRICS].count_request(route_template(request), request.method, str(status))


class EdgeRequestHandler(RequestHandler):
    """aiohttp's HTTP protocol, with its error responses in our envelope.

    aiohttp calls :meth:`handle_error` for requests its parser rejects (status 400, before any
    middleware) and for errors that escape the middlewares (500, or 504 for a TimeoutError). The
    response always closes the connection; once a response has started nothing more is written.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("the response had started; connection closed")
        cid = request.get(CORRELATION_ID) or correlation_id(None)
        request[CORRELATION_ID] = cid
        if status < 500:
            reason = (message or type(exc).__name__).encode("ascii", "backslashreplace").decode()[:200]
            log.info(
                "malformed request rejected",
                extra={"event": "http_rejected", "reason": reason, "correlation_id": cid},
            )
            error = OrchestratorError(
                Code.INVALID_PARAMS, f"malformed HTTP request: {reason}", field="request"
            )
        else:
            log.error(
                "error outside the handlers",
                extra={"event": "internal_error", "status": status, "error": type(exc).__name__},
            )
            error = OrchestratorError(Code.INTERNAL, "internal error; retry shortly")
        response = error_response(error, request)
        response.force_close()
        return response


class _EdgeServer(web.Server):
    def __call__(self) -> RequestHandler:
        return EdgeRequestHandler(self, loop=self._loop, **self._kwargs)


class EdgeRunner(web.AppRunner):
    """An AppRunner whose connections use :class:`EdgeRequestHandler` and the edge's limits."""

    def __init__(self, app: web.Application, keepalive_timeout_s: float) -> None:
        super().__init__(
            app,
            access_log=None,
            shutdown_timeout=2,
            keepalive_timeout=keepalive_timeout_s,
            lingering_time=LINGER_S,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_LINE_BYTES,
        )

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _EdgeServer  # the same object; only the protocol it builds changes
        return server
