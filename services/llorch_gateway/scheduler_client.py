"""The gateway's client of the scheduler: deadlines on every call, one gRPC→domain mapper.

Admissions go over one long-lived ``AdmitStream`` per gateway process (:class:`AdmitChannel`), each
message carrying the admissions that gathered while the previous one was written: at most one message
each way per admission, instead of a unary call each, which costs both sides several times more CPU
(issue 16). Every other call is unary.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import grpc.aio

from llorch import tracing
from llorch.callstream import CallChannel, call_context
from llorch.config import GrpcTlsConfig
from llorch.grpc_tls import open_channel
from llorch.rpc import (
    DEFAULT_DEADLINE_S,
    auth_metadata,
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


class AdmitChannel:
    """Admissions over one ``AdmitStream`` (:class:`llorch.callstream.CallChannel`).

    Each admission carries what a unary call's metadata would: the trace context (the task's trace
    starts here) and the correlation id. When the stream breaks (the scheduler restarting), every
    admission waiting on it fails as a unary call would, 503 and retriable, whatever status the stream
    ended with: a broken stream says nothing about the admissions on it (the scheduler refuses one in
    its result, never by ending the stream); the next admission opens a new stream."""

    def __init__(self, stub: scheduler_pb2_grpc.SchedulerStub, token: str) -> None:
        auth = auth_metadata(token)
        stream = cast(Any, stub.AdmitStream)
        self._channel: CallChannel[scheduler_pb2.AdmitCall, scheduler_pb2.AdmitResult] = CallChannel(
            lambda: stream(metadata=auth),
            lambda calls: scheduler_pb2.AdmitCalls(calls=calls),
            lambda message: message.results,
            lambda why: unreachable("the scheduler", why),
        )

    async def admit(self, request: scheduler_pb2.AdmitRequest) -> scheduler_pb2.AdmitResponse:
        call = scheduler_pb2.AdmitCall(
            request=request, context=call_context()
        )  # the task's trace starts here
        result = await self._channel.call(call)
        if result.error_json:
            raise from_envelope(result.error_json)
        return result.reply

    async def aclose(self) -> None:
        await self._channel.aclose()
