"""Tracing across the three services (SPEC §5.11): with ``telemetry.otlp_endpoint`` set, each process
exports its spans over OTLP/HTTP to a receiver this test runs, and one task is one trace:

gateway ``POST /v1/tasks`` → scheduler ``Admit`` → scheduler ``dispatch`` → pool manager ``Start`` →
pool manager ``engine``; the task's stream and its cancel (→ ``Cancel`` → ``Abort``) join the same trace.
Log lines written inside a span carry its ``trace_id``.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from tests.support.procs import wait_until
from tests.support.stack import Client, Stack, mock_pool

ADMIT = ("scheduler", "llorch.v1.Scheduler/Admit")
SUBMIT = ("gateway", "POST /v1/tasks")
STREAM = ("gateway", "GET /v1/tasks/{task_id}/stream")
DISPATCH = ("scheduler", "dispatch")
START = ("poolmgr", "llorch.v1.PoolManager/Start")
ENGINE = ("poolmgr", "engine")
CANCEL_HTTP = ("gateway", "POST /v1/tasks/{task_id}/cancel")
CANCEL = ("scheduler", "llorch.v1.Scheduler/Cancel")
ABORT = ("poolmgr", "llorch.v1.PoolManager/Abort")


@dataclass(frozen=True)
class Got:
    """One exported span, decoded."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_id: str  # '' for a root
    kind: int
    attributes: dict[str, object]

    @property
    def key(self) -> tuple[str, str]:
        return self.service, self.name


def _attributes(items: Any) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        assert isinstance(item, KeyValue)
        which = item.value.WhichOneof("value")
        out[item.key] = getattr(item.value, which) if which else None
    return out


class Receiver:
    """An OTLP/HTTP traces endpoint: what the services' real exporters send, decoded and kept."""

    def __init__(self) -> None:
        self.spans: list[Got] = []
        self.url = ""

    async def export(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        message = ExportTraceServiceRequest.FromString(body)
        for resource_spans in message.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes)["service.name"])
            for scope in resource_spans.scope_spans:
                self.spans.extend(_got(service, span) for span in scope.spans)
        reply = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=reply, content_type="application/x-protobuf")

    async def one(self, match: Callable[[Got], bool], what: str) -> Got:
        """The first span that matches, once it has arrived."""

        async def arrived() -> bool:
            return any(match(s) for s in self.spans)

        await wait_until(arrived, 60, what)
        return next(s for s in self.spans if match(s))

    async def trace(self, trace_id: str, *needed: tuple[str, str]) -> dict[tuple[str, str], Got]:
        """The spans of one trace by (service, name), once all of ``needed`` have arrived."""

        async def complete() -> bool:
            have = {s.key for s in self.spans if s.trace_id == trace_id}
            return set(needed) <= have

        await wait_until(complete, 60, f"spans {needed} in trace {trace_id}")
        return {s.key: s for s in self.spans if s.trace_id == trace_id}


def _got(service: str, span: Span) -> Got:
    return Got(
        service,
        span.name,
        span.trace_id.hex(),
        span.span_id.hex(),
        span.parent_span_id.hex(),
        span.kind,
        _attributes(span.attributes),
    )


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    got = Receiver()
    app = web.Application()
    app.router.add_post("/v1/traces", got.export)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    got.url = f"http://{host}:{port}"  # the exporter adds /v1/traces to a base URL
    yield got
    await runner.cleanup()


def _traced_stack(
    stack_factory: Any, receiver: Receiver, delay_ms: int = 100, token_delay_ms: int = 5
) -> Stack:
    stack: Stack = stack_factory(
        pools=[mock_pool(args=["--token-delay-ms", str(token_delay_ms)])],
        extra={"telemetry": {"otlp_endpoint": receiver.url}},
    )
    stack.env["OTEL_BSP_SCHEDULE_DELAY"] = str(delay_ms)  # the standard knob of the batch processor
    return stack


def _log_lines(stack: Stack) -> list[dict[str, Any]]:
    lines = []
    for raw in stack.logs().splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))
    return lines


async def _logged(stack: Stack, event: str, task_id: str) -> dict[str, Any]:
    """The first log line of ``event`` for ``task_id``, once a process has written it."""

    def find() -> dict[str, Any] | None:
        return next(
            (x for x in _log_lines(stack) if x.get("event") == event and x.get("task_id") == task_id), None
        )

    async def written() -> bool:
        return find() is not None

    await wait_until(written, 30, f"a {event} log line for {task_id}")
    line = find()
    assert line is not None
    return line


def _admit_of(task_id: str) -> Callable[[Got], bool]:
    return lambda s: s.key == ADMIT and s.attributes.get("llorch.task_id") == task_id


async def test_a_task_is_one_trace_across_the_three_services(
    receiver: Receiver, stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = _traced_stack(stack_factory, receiver)
    await stack.start()
    client = Client(stack, http)
    task_id = await client.admit(max_tokens=4)
    events = await client.events(task_id)
    assert events[-1].event == "end"
    tokens = sum(1 for e in events if e.event == "token")

    admit = await receiver.one(_admit_of(task_id), f"the Admit span of {task_id}")
    spans = await receiver.trace(admit.trace_id, SUBMIT, ADMIT, DISPATCH, START, ENGINE, STREAM)
    submit, dispatch, start, engine = spans[SUBMIT], spans[DISPATCH], spans[START], spans[ENGINE]
    assert submit.parent_id == ""  # the client sent no traceparent: the gateway starts the trace
    assert admit.parent_id == submit.span_id
    # The dispatch happened after the task waited in its queue: it continues the stored context.
    assert dispatch.parent_id == admit.span_id
    assert start.parent_id == dispatch.span_id
    assert engine.parent_id == start.span_id
    assert engine.kind == Span.SpanKind.SPAN_KIND_CLIENT
    assert spans[STREAM].parent_id == admit.span_id  # the task's stream joins the task's trace
    for span in (dispatch, start, engine):
        assert span.attributes["llorch.task_id"] == task_id
        assert span.attributes["llorch.pool_id"] == "mock-a"
        assert str(span.attributes["llorch.replica_id"]).startswith("mock-a")
    assert engine.attributes["llorch.model"] == "mock-tiny"
    assert engine.attributes["llorch.tokens_out"] == tokens
    assert admit.attributes["llorch.model"] == "mock-tiny"
    assert submit.attributes["http.response.status_code"] == 202

    # The SPEC §5.11 events, each in its service's span of this trace.
    dispatched = await _logged(stack, "dispatched", task_id)
    assert dispatched["service"] == "scheduler" and dispatched["trace_id"] == admit.trace_id
    assert dispatched["pool_id"] == "mock-a"
    assert dispatched["replica_id"] == engine.attributes["llorch.replica_id"]
    first = await _logged(stack, "first_token", task_id)
    assert first["service"] == "pool-manager" and first["trace_id"] == admit.trace_id
    assert first["first_token_ms"] >= 0
    ended = await _logged(stack, "stream_ended", task_id)
    assert ended["service"] == "gateway" and ended["trace_id"] == admit.trace_id
    assert ended["reason"] == "end"
    assert "hello" not in json.dumps([dispatched, first, ended])  # never the prompt


async def test_a_cancel_joins_the_task_trace_through_cancel_and_abort(
    receiver: Receiver, stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = _traced_stack(stack_factory, receiver, token_delay_ms=20)
    await stack.start()
    client = Client(stack, http)
    task_id = await client.admit(max_tokens=2000)
    async for event in client.follow(task_id):
        if event.event == "token":  # running on its replica: the cancel must abort the engine
            break
    assert await client.cancel(task_id) == 204

    admit = await receiver.one(_admit_of(task_id), f"the Admit span of {task_id}")
    spans = await receiver.trace(admit.trace_id, CANCEL_HTTP, CANCEL, ABORT, ENGINE)
    cancel_http, cancel, abort = spans[CANCEL_HTTP], spans[CANCEL], spans[ABORT]
    assert cancel_http.parent_id == admit.span_id  # the cancel continues the task's own trace
    assert cancel.parent_id == cancel_http.span_id
    assert abort.parent_id == cancel.span_id
    assert cancel.attributes["llorch.task_id"] == abort.attributes["llorch.task_id"] == task_id
    canceled = await _logged(stack, "task_canceled", task_id)
    assert canceled["trace_id"] == admit.trace_id


async def test_spans_still_queued_are_flushed_at_shutdown(
    receiver: Receiver, stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    # A batch delay far past the test: spans can only arrive through the flush on a clean stop.
    stack = _traced_stack(stack_factory, receiver, delay_ms=3_600_000)
    await stack.start()
    client = Client(stack, http)
    task_id = await client.admit(max_tokens=2)
    assert (await client.events(task_id))[-1].event == "end"
    assert not [s for s in receiver.spans if s.attributes.get("llorch.task_id") == task_id]
    await asyncio.to_thread(stack.stop)  # SIGTERM; the receiver answers on this loop meanwhile
    admit = next((s for s in receiver.spans if _admit_of(task_id)(s)), None)
    assert admit is not None, "the scheduler did not flush its spans at shutdown"
    have = {s.key for s in receiver.spans if s.trace_id == admit.trace_id}
    assert {SUBMIT, ADMIT, DISPATCH, START, ENGINE} <= have
