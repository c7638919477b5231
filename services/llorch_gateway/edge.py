"""The HTTP edge: correlation ids on every response and the one place errors become responses."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Final

from aiohttp import web

from llorch.errors import Code, OrchestratorError
from llorch.ids import correlation_id
from llorch.logs import correlation_id_var

from .metrics import GatewayMetrics

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CORRELATION_HEADER: Final = "X-Correlation-Id"
MAX_BODY: Final = web.AppKey("max_body_bytes", int)
METRICS: Final = web.AppKey("gateway_metrics", GatewayMetrics)


def error_response(exc: OrchestratorError, request: web.Request) -> web.Response:
    headers = {CORRELATION_HEADER: request.get("correlation_id", "")}
    retry_ms = exc.context.get("retry_after_ms")
    if isinstance(retry_ms, int) and exc.http_status in (429, 503):
        headers["Retry-After"] = str(max(1, math.ceil(retry_ms / 1000)))
        headers["X-Backoff-Ms"] = str(retry_ms)
    if exc.code == Code.UNAUTHENTICATED:
        headers["WWW-Authenticate"] = 'Bearer realm="llorch"'
    allow = exc.context.get("allow")
    if exc.code == Code.METHOD_NOT_ALLOWED and isinstance(allow, str):
        headers["Allow"] = allow
    return web.Response(
        status=exc.http_status,
        text=json.dumps(exc.envelope(), separators=(",", ":")),
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
        limit = request.app[MAX_BODY]
        return OrchestratorError(
            Code.PAYLOAD_TOO_LARGE, f"the body is over the limit of {limit} bytes", limit_bytes=limit
        )
    if isinstance(exc, web.HTTPNotFound):
        return OrchestratorError(Code.NOT_FOUND, f"no route {request.path}")
    return OrchestratorError(Code.INVALID_PARAMS, exc.reason or "bad request", field="request")


@web.middleware
async def edge(request: web.Request, handler: Handler) -> web.StreamResponse:
    cid = correlation_id(request.headers.get(CORRELATION_HEADER))
    request["correlation_id"] = cid
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
        except Exception:  # the edge of the service: never a traceback to a client
            log.exception("unhandled error", extra={"event": "internal_error", "route": request.path})
            response = error_response(
                OrchestratorError(Code.INTERNAL, "internal error; retry shortly"), request
            )
        if not response.prepared:
            response.headers[CORRELATION_HEADER] = cid
        status = response.status
        return response
    finally:
        correlation_id_var.reset(token)
        info = request.match_info.route.resource
        route = info.canonical if info is not None else "unmatched"
        request.app[METRICS].http_requests.labels(route, request.method, str(status)).inc()
