"""OpenTelemetry tracing (SPEC §5.11): off unless ``telemetry.otlp_endpoint`` is set.

One trace per task: the gateway's HTTP span → the scheduler's ``Admit`` → ``dispatch`` (scheduler) →
the pool manager's ``Start`` → ``engine`` (the request to the engine). A task waits in the queue
between Admit and its dispatch, so admission stores the Admit span's ``traceparent`` in the task record
and the dispatch span is started from it. The gateway's requests on one task (its stream, status and
cancel) also join the task's trace, so a cancel's ``Cancel`` and ``Abort`` carry the task's trace id.
W3C trace context travels in gRPC metadata (``traceparent``) and in the engine request's headers.

Without an endpoint nothing is installed: OTel's API answers with its no-op tracer, so a span here
costs a context-variable lookup, nothing is exported and log lines carry no ``trace_id``.

Composition roots call :func:`traced` once, which installs OTel's process-wide tracer provider (the
API's own seam); the helpers below use OTel's proxy tracer, which follows whatever was installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeAlias, cast
from urllib.parse import urlsplit, urlunsplit

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from llorch.errors import OrchestratorError

if TYPE_CHECKING:  # aiohttp is imported where the gateway asks for its middleware: logs stay light
    from aiohttp import web
    from aiohttp.typedefs import Handler, Middleware
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

Attr = str | int | float | bool
TraceParentOf: TypeAlias = "Callable[[web.Request], Awaitable[str]]"
"""The traceparent a request should continue when its client sent none ('' for a new trace)."""

TRACEPARENT: Final = "traceparent"
TRACES_PATH: Final = "/v1/traces"
ENV_ENDPOINT: Final = "OTEL_EXPORTER_OTLP_ENDPOINT"
EXPORT_TIMEOUT_S: Final = 2.0
"""One export's deadline, retries included; it also bounds the flush at shutdown."""
PREFIX: Final = "llorch."
"""Span attributes of ours are ``llorch.<log field name>`` (``llorch.task_id``, ``llorch.pool_id``)."""

_PROPAGATION: Final = TraceContextTextMapPropagator()
_FIELDS: Final = frozenset(_PROPAGATION.fields)  # the propagator builds a new set per access
# Like a module's logger: a proxy that delegates to the provider `traced` installs later (or no-op).
_tracer: Final = trace.get_tracer("llorch")


def endpoint_of(configured: str | None) -> str | None:
    """``telemetry.otlp_endpoint``, else the standard ``OTEL_EXPORTER_OTLP_ENDPOINT``; None: off."""
    return configured or os.environ.get(ENV_ENDPOINT) or None


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of an endpoint: a collector's base URL (``http://host:4318``) gets
    ``/v1/traces``; a URL already ending with it is used as is."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("telemetry.otlp_endpoint must be an http:// or https:// URL (OTLP/HTTP)")
    path = parts.path.rstrip("/")
    if not path.endswith(TRACES_PATH):
        path += TRACES_PATH
    return urlunsplit(parts._replace(path=path))


def provider_for(endpoint: str | None, service: str, instance: str = "") -> TracerProvider | None:
    """A tracer provider that batches spans to ``endpoint`` over OTLP/HTTP; None without an endpoint.

    The batch processor honours the standard ``OTEL_BSP_*`` variables (``OTEL_BSP_SCHEDULE_DELAY``).
    """
    if endpoint is None:
        return None
    # Imported here: a process without an endpoint never loads the SDK or the exporter.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=EXPORT_TIMEOUT_S)
    attributes = {"service.name": service, "service.namespace": "llorch"}
    if instance:
        attributes["service.instance.id"] = instance
    provider = TracerProvider(resource=Resource.create(attributes))
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


@contextlib.asynccontextmanager
async def traced(endpoint: str | None, service: str, instance: str = "") -> AsyncIterator[bool]:
    """Install this process's tracer provider (composition roots only) and flush it on the way out.

    Yields whether spans are exported. ``service`` becomes the resource's ``service.name``.
    """
    provider = provider_for(endpoint_of(endpoint), service, instance)
    if provider is None:
        yield False
        return
    trace.set_tracer_provider(provider)
    _Installed.exporting = True
    log.info("tracing on", extra={"event": "tracing_started", "what": "otlp/http"})
    try:
        yield True
    finally:
        # Exports what is still queued; blocking (requests), so off the loop. Bounded by EXPORT_TIMEOUT_S.
        await asyncio.to_thread(provider.shutdown)


class _Installed:
    exporting = False  # set once, by traced(): OTel's global provider is set once per process too


def enabled() -> bool:
    """Whether :func:`traced` installed an exporting provider in this process. A flag, not a look
    at OTel's global provider: that reads the environment on every call, and spans start on every
    admission and dispatch."""
    return _Installed.exporting


@contextlib.contextmanager
def span(
    name: str, kind: SpanKind = SpanKind.INTERNAL, parent: str = "", **attributes: Attr
) -> Iterator[Span]:
    """A span, current inside the block. ``parent`` (a traceparent) makes it a child of that span
    instead of the current one; exceptions leaving the block are recorded on it."""
    with _start(name, kind, {TRACEPARENT: parent} if parent else None, _ours(attributes)) as current:
        yield current


@contextlib.contextmanager
def server_span(name: str, metadata: object, **attributes: Attr) -> Iterator[Span]:
    """A gRPC handler's span: a child of the caller's span named in the call's metadata
    (``context.invocation_metadata()``), or a new trace when it names none."""
    with _start(name, SpanKind.SERVER, _carrier(metadata), _ours(attributes)) as current:
        yield current


def annotate(**attributes: Attr) -> None:
    """Set attributes (``llorch.<name>``) on the current span; nothing outside a recording span."""
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes(_ours(attributes))


def mark_failed(code: str) -> None:
    """Mark the current span failed with an error code (SPEC §4), for failures that are results
    rather than exceptions."""
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attribute(PREFIX + "code", code)
        current.set_status(StatusCode.ERROR, code)


def grpc_metadata(base: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    """Call metadata ``base`` plus the current span's trace context (``base`` itself outside a span)."""
    carrier = http_headers()
    return (*base, *carrier.items()) if carrier else base


def http_headers() -> dict[str, str]:
    """The current span's trace context as headers (``traceparent``); empty outside a span."""
    carrier: dict[str, str] = {}
    _PROPAGATION.inject(carrier)
    return carrier


def current_traceparent() -> str:
    """The current span's ``traceparent`` ('' outside a span): what a task record keeps."""
    return http_headers().get(TRACEPARENT, "")


def current_trace_id() -> str | None:
    """The current trace id as 32 hex digits, for log lines; None outside a span."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


def http_middleware(parent_of: TraceParentOf | None = None) -> Middleware:
    """The gateway's server span per request: a child of the client's ``traceparent``, else of
    ``parent_of(request)``, else a new trace. Placed inside the error edge, it records a domain
    error's HTTP status as the edge will answer it."""
    from aiohttp import web

    @web.middleware
    async def traced_request(request: web.Request, handler: Handler) -> web.StreamResponse:
        carrier = {key: value for key in _FIELDS if (value := request.headers.get(key))}
        if TRACEPARENT not in carrier and parent_of is not None and (parent := await parent_of(request)):
            carrier = {TRACEPARENT: parent}
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        attributes: dict[str, Attr] = {"http.request.method": request.method, "http.route": route}
        with _start(f"{request.method} {route}", SpanKind.SERVER, carrier, attributes) as current:
            try:
                response = await handler(request)
            except OrchestratorError as exc:
                current.set_attribute("http.response.status_code", exc.http_status)
                raise
            current.set_attribute("http.response.status_code", response.status)
            if response.status >= 500:
                current.set_status(StatusCode.ERROR)
            return response

    return traced_request


@contextlib.contextmanager
def _start(
    name: str, kind: SpanKind, carrier: Mapping[str, str] | None, attributes: Mapping[str, Attr]
) -> Iterator[Span]:
    if not carrier and not enabled():
        # What OTel's no-op tracer would do, without its context switch: the current span stays.
        yield trace.get_current_span()
        return
    context = _PROPAGATION.extract(carrier) if carrier else None
    with _tracer.start_as_current_span(name, context=context, kind=kind, attributes=attributes) as current:
        yield current


def _ours(attributes: Mapping[str, Attr]) -> dict[str, Attr]:
    return {PREFIX + key: value for key, value in attributes.items()}


def _carrier(metadata: object) -> dict[str, str]:
    """The trace-context entries of gRPC metadata (pairs; the stubs disagree about their shape)."""
    out: dict[str, str] = {}
    for key, value in cast(Any, metadata) or ():
        if key in _FIELDS:
            out[str(key)] = value.decode() if isinstance(value, bytes) else str(value)
    return out
