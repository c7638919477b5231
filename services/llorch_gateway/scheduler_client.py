"""The gateway's client of the scheduler: deadlines on every call, one gRPC→domain mapper.

Admissions go over one long-lived ``AdmitStream`` per gateway process (:class:`AdmitChannel`), each
message carrying the admissions that gathered while the previous one was written: at most one message
each way per admission, instead of a unary call each, which costs both sides several times more CPU
(issue 16). Every other call is unary.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc.aio

from llorch import tracing
from llorch.config import GrpcTlsConfig
from llorch.errors import OrchestratorError
from llorch.grpc_tls import open_channel
from llorch.logs import correlation_id_var
from llorch.rpc import (
    CORRELATION_KEY,
    DEFAULT_DEADLINE_S,
    from_envelope,
    from_rpc_error,
    metadata,
    unreachable,
)
from llorch.v1 import scheduler_pb2, scheduler_pb2_grpc

T = TypeVar("T")
RELOAD_DEADLINE_S = 620.0
"""A reload waits for the new engine's preload and self-test (the scheduler allows 600 s)."""
CATALOG_DEADLINE_S = 120.0
"""Verify hashes the model file: minutes for a big one on a slow disk."""


class SchedulerClient:
    def __init__(self, address: str, token: str, tls: GrpcTlsConfig | None = None) -> None:
        self.channel = open_channel(address, tls)
        self.stub = scheduler_pb2_grpc.SchedulerStub(self.channel)
        self.token = token
        self.admissions = AdmitChannel(self.stub, token)
        self.located: Callable[[str, str], None] = lambda _task_id, _rs: None
        """Told each admitted task's replica set (the store's locator cache: its stream saves a lookup)."""

    async def aclose(self) -> None:
        await self.admissions.aclose()
        await self.channel.close(None)

    async def _call(self, call: Awaitable[T], what: str) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, what) from None

    async def admit(self, request: scheduler_pb2.AdmitRequest) -> scheduler_pb2.AdmitResponse:
        reply = await self.admissions.admit(request)
        if reply.replica_set_id:
            self.located(reply.task_id, reply.replica_set_id)
        return reply

    async def cancel(self, task_id: str) -> scheduler_pb2.CancelResponse:
        call = self.stub.Cancel(
            scheduler_pb2.CancelRequest(task_id=task_id),
            metadata=tracing.grpc_metadata(metadata(self.token)),
            timeout=DEFAULT_DEADLINE_S,
        )
        return await self._call(call, "the scheduler")

    async def get_task(self, task_id: str) -> scheduler_pb2.TaskStatus:
        call = self.stub.GetTask(
            scheduler_pb2.GetTaskRequest(task_id=task_id),
            metadata=metadata(self.token),
            timeout=DEFAULT_DEADLINE_S,
        )
        return await self._call(call, "the scheduler")

    async def list_pools(self, timeout_s: float = DEFAULT_DEADLINE_S) -> scheduler_pb2.ListPoolsResponse:
        call = self.stub.ListPools(
            scheduler_pb2.ListPoolsRequest(), metadata=metadata(self.token), timeout=timeout_s
        )
        return await self._call(call, "the scheduler")

    async def get_session(self, session_id: str) -> scheduler_pb2.SessionInfo:
        call = self.stub.GetSession(
            scheduler_pb2.SessionRequest(session_id=session_id),
            metadata=metadata(self.token),
            timeout=DEFAULT_DEADLINE_S,
        )
        return await self._call(call, "the scheduler")

    async def delete_session(self, session_id: str) -> scheduler_pb2.DeleteSessionResponse:
        call = self.stub.DeleteSession(
            scheduler_pb2.SessionRequest(session_id=session_id),
            metadata=metadata(self.token),
            timeout=DEFAULT_DEADLINE_S,
        )
        return await self._call(call, "the scheduler")

    async def replica_sets(self) -> scheduler_pb2.ListReplicaSetsResponse:
        call = self.stub.ListReplicaSets(
            scheduler_pb2.ListReplicaSetsRequest(), metadata=metadata(self.token), timeout=DEFAULT_DEADLINE_S
        )
        return await self._call(call, "the scheduler")

    async def capabilities(self) -> scheduler_pb2.CapabilitiesResponse:
        call = self.stub.Capabilities(
            scheduler_pb2.CapabilitiesRequest(), metadata=metadata(self.token), timeout=DEFAULT_DEADLINE_S
        )
        return await self._call(call, "the scheduler")

    async def pool_control(
        self, pool_id: str, action: str, deadline_ms: int = 0, new_model_ref: str = ""
    ) -> scheduler_pb2.PoolControlResponse:
        request = scheduler_pb2.PoolControlRequest(
            pool_id=pool_id, action=action, deadline_ms=deadline_ms, new_model_ref=new_model_ref
        )
        timeout = RELOAD_DEADLINE_S if action == "reload" else DEFAULT_DEADLINE_S
        call = self.stub.PoolControl(request, metadata=metadata(self.token), timeout=timeout)
        return await self._call(call, "the scheduler")

    async def gpus(self) -> scheduler_pb2.GpusReply:
        """The VRAM ledger per device and its residents (issue 13)."""
        call = self.stub.Gpus(
            scheduler_pb2.GpusRequest(), metadata=metadata(self.token), timeout=DEFAULT_DEADLINE_S
        )
        return await self._call(call, "the scheduler")

    async def catalog(self, request: scheduler_pb2.CatalogRequest) -> scheduler_pb2.CatalogReply:
        call = self.stub.Catalog(request, metadata=metadata(self.token), timeout=CATALOG_DEADLINE_S)
        return await self._call(call, "the scheduler")


StreamCall = Any
"""grpc.aio's StreamStreamCall[AdmitCalls, AdmitResults] (its stubs do not type the generic)."""


class AdmitChannel:
    """Admissions over one ``AdmitStream``, opened on first use and again after it breaks.

    Each admission is a call numbered on this channel carrying what a unary call's metadata would (the
    trace context: the task's trace starts here; the correlation id). One writer sends every call that
    gathered while its previous message was being written as one message (grpc allows one message in
    flight per stream); one reader hands each result to the admission with its number. When the
    stream breaks (the scheduler restarting), every admission waiting on it fails as a unary call
    would, 503 and retriable, and the next admission opens a new stream. No answer within the deadline
    is the same 503 (the admission may still have happened, as after a unary call's deadline)."""

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub, token: str) -> None:
        self._stub = stub
        self._metadata = (("authorization", f"Bearer {token}"),)  # the rest travels in each call
        self._numbers = itertools.count(1)
        self._stream: _Stream | None = None

    async def admit(self, request: scheduler_pb2.AdmitRequest) -> scheduler_pb2.AdmitResponse:
        context = tracing.http_headers()  # the task's trace starts here
        if cid := correlation_id_var.get():
            context[CORRELATION_KEY] = cid
        number = next(self._numbers)
        stream = self._stream if self._stream and not self._stream.failure else self._open()
        answer = stream.send(scheduler_pb2.AdmitCall(call=number, request=request, context=context))
        # A bare timer rather than asyncio.timeout: the context manager's bookkeeping was a visible
        # share of an admission's CPU here.
        late = asyncio.get_running_loop().call_later(DEFAULT_DEADLINE_S, _expire, answer)
        try:
            result = await answer
        finally:
            late.cancel()
            stream.forget(number)
        if result.error_json:
            raise from_envelope(result.error_json)
        return result.reply

    def _open(self) -> _Stream:
        stream = cast(Any, self._stub.AdmitStream)  # no request iterator: messages go by write()
        self._stream = _Stream(stream(metadata=self._metadata))
        return self._stream

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()


def _expire(answer: asyncio.Future[scheduler_pb2.AdmitResult]) -> None:
    if not answer.done():
        answer.set_exception(unreachable("the scheduler", "DEADLINE_EXCEEDED"))


def _broken(exc: grpc.aio.AioRpcError) -> OrchestratorError:
    """A broken stream says nothing about the admissions on it (the scheduler refuses one in its
    result, never by ending the stream): whatever status it ended with (UNAVAILABLE, or INTERNAL when
    the process died mid-write), the scheduler is unreachable: 503, retriable."""
    return unreachable("the scheduler", exc.code().name)


class _Stream:
    """One ``AdmitStream`` call, its writer and its reader."""

    def __init__(self, call: StreamCall) -> None:
        self._call = call
        self._outbox: list[scheduler_pb2.AdmitCall] = []
        self._waiting: dict[int, asyncio.Future[scheduler_pb2.AdmitResult]] = {}
        self._wake = asyncio.Event()
        self.failure: OrchestratorError | None = None
        self._tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]

    def send(self, call: scheduler_pb2.AdmitCall) -> asyncio.Future[scheduler_pb2.AdmitResult]:
        answer: asyncio.Future[scheduler_pb2.AdmitResult] = asyncio.get_running_loop().create_future()
        if self.failure is not None:
            answer.set_exception(self.failure)
            return answer
        self._waiting[call.call] = answer
        self._outbox.append(call)
        self._wake.set()
        return answer

    def forget(self, number: int) -> None:
        self._waiting.pop(number, None)

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                calls, self._outbox = self._outbox, []
                await self._call.write(scheduler_pb2.AdmitCalls(calls=calls))
        except grpc.aio.AioRpcError as exc:
            self._fail(_broken(exc))
        except (asyncio.InvalidStateError, grpc.aio.UsageError):  # the call ended under the writer
            self._fail(unreachable("the scheduler", "stream ended"))

    async def _read(self) -> None:
        try:
            async for message in self._call:
                for result in message.results:
                    answer = self._waiting.pop(result.call, None)
                    if answer is not None and not answer.done():
                        answer.set_result(result)
            self._fail(unreachable("the scheduler", "stream ended"))
        except grpc.aio.AioRpcError as exc:
            self._fail(_broken(exc))

    def _fail(self, failure: OrchestratorError) -> None:
        """Every admission waiting on this stream fails with ``failure``; the next one opens anew."""
        if self.failure is None:
            self.failure = failure
        self._call.cancel()  # nothing when it has ended already
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(self.failure)
        self._waiting.clear()

    async def aclose(self) -> None:
        self._fail(unreachable("the scheduler", "gateway stopping"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
