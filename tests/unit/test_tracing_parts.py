"""llorch.tracing: off by default at no cost, the OTLP endpoint's URL, and W3C propagation through gRPC
metadata, the engine request's headers and log lines.

Spans here come from a local SDK provider: the process-wide one is never installed, so no other test
in this process sees a tracer it did not ask for.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

from llorch import tracing
from llorch.adapters._http import EngineHttp
from llorch.errors import Code, OrchestratorError
from llorch.logs import JsonFormatter

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


@pytest.fixture
def local() -> trace.Tracer:
    """A recording tracer of a provider that exports nothing (and is not the process-wide one)."""
    return TracerProvider().get_tracer("test")


def _hex(span: trace.Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


async def test_without_an_endpoint_no_provider_or_exporter_is_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(tracing.ENV_ENDPOINT, raising=False)
    assert tracing.provider_for(tracing.endpoint_of(None), "gateway") is None
    async with tracing.traced(None, "gateway") as on:
        assert on is False
        assert not tracing.enabled()
        assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
        # The instrumentation is OTel's no-op: nothing recorded, nothing propagated, no trace id.
        with tracing.span("dispatch", task_id="t") as span:
            assert not span.is_recording()
            base = (("authorization", "Bearer x"),)
            assert tracing.grpc_metadata(base) is base
            assert tracing.current_traceparent() == ""
            assert tracing.current_trace_id() is None


def test_an_endpoint_builds_a_batching_otlp_http_provider() -> None:
    provider = tracing.provider_for("http://127.0.0.1:4318", "poolmgr", "pm-0")
    assert provider is not None
    try:
        resource = provider.resource.attributes
        assert resource["service.name"] == "poolmgr" and resource["service.instance.id"] == "pm-0"
        (processor,) = provider._active_span_processor._span_processors
        assert isinstance(processor, BatchSpanProcessor)
        assert isinstance(processor.span_exporter, OTLPSpanExporter)
    finally:
        provider.shutdown()


def test_the_env_endpoint_is_used_when_the_config_has_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tracing.ENV_ENDPOINT, "http://collector:4318")
    assert tracing.endpoint_of(None) == "http://collector:4318"
    assert tracing.endpoint_of("http://mine:4318") == "http://mine:4318"


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
        ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
        ("https://otel.lan/v1/traces", "https://otel.lan/v1/traces"),
        ("http://otel.lan:4318/prefix", "http://otel.lan:4318/prefix/v1/traces"),
    ],
)
def test_traces_url(endpoint: str, url: str) -> None:
    assert tracing.traces_url(endpoint) == url


@pytest.mark.parametrize("endpoint", ["127.0.0.1:4317", "grpc://otel:4317", "http://"])
def test_an_endpoint_that_is_not_an_http_url_is_refused(endpoint: str) -> None:
    with pytest.raises(ValueError, match=r"telemetry\.otlp_endpoint"):
        tracing.traces_url(endpoint)


def test_grpc_metadata_carries_the_current_span_to_the_server_span(local: trace.Tracer) -> None:
    with local.start_as_current_span("client") as client:
        metadata = tracing.grpc_metadata((("authorization", "Bearer x"),))
        stored = tracing.current_traceparent()
    assert metadata[0] == ("authorization", "Bearer x")
    assert dict(metadata)["traceparent"] == stored
    assert stored.split("-")[1] == _hex(client)
    # The server side (here without a provider: OTel's no-op keeps the caller's context current).
    with tracing.server_span("llorch.v1.PoolManager/Start", metadata):
        assert tracing.current_trace_id() == _hex(client)


def test_a_span_with_a_stored_parent_joins_that_trace_not_the_current_one(local: trace.Tracer) -> None:
    with local.start_as_current_span("unrelated"), tracing.span("dispatch", parent=PARENT):
        assert tracing.current_trace_id() == TRACE_ID


def test_grpc_metadata_values_may_be_bytes() -> None:
    with tracing.server_span("llorch.v1.Scheduler/Admit", [("traceparent", PARENT.encode())]):
        assert tracing.current_trace_id() == TRACE_ID


def test_log_lines_carry_the_trace_id_inside_a_span_only(local: trace.Tracer) -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter("test"))
    logger = logging.getLogger("test_tracing.lines")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("outside", extra={"event": "outside"})
        with local.start_as_current_span("inside") as span:
            logger.warning("inside", extra={"event": "inside"})
    finally:
        logger.removeHandler(handler)
    outside, inside = (json.loads(line) for line in out.getvalue().splitlines())
    assert "trace_id" not in outside
    assert inside["trace_id"] == _hex(span)


@pytest.fixture
async def engine() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """A stand-in engine that records the headers of each request."""
    seen: list[dict[str, str]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}", seen
    await runner.cleanup()


def _refused(status: int, body: bytes) -> OrchestratorError:
    return OrchestratorError(Code.INTERNAL, f"HTTP {status}")


async def test_engine_requests_carry_the_current_traceparent(
    engine: tuple[str, list[dict[str, str]]], local: trace.Tracer
) -> None:
    url, seen = engine
    http = EngineHttp("test", None, 5.0)
    try:
        assert await http.probe(f"{url}/health") == 200
        with local.start_as_current_span("engine") as span:
            async with http.open_stream(f"{url}/completion", {"prompt": "p"}, "engine", _refused) as stream:
                assert await stream.reader.next_data() is None  # a JSON answer, no event in it
    finally:
        await http.aclose()
    outside, inside = seen
    assert "traceparent" not in {k.lower() for k in outside}
    assert inside["traceparent"].split("-")[1] == _hex(span)
