"""The gateway's client of the scheduler: deadlines on every call, one gRPC→domain mapper."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import grpc.aio

from llorch import tracing
from llorch.config import GrpcTlsConfig
from llorch.grpc_tls import open_channel
from llorch.rpc import DEFAULT_DEADLINE_S, from_rpc_error, metadata
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

    async def aclose(self) -> None:
        await self.channel.close(None)

    async def _call(self, call: Awaitable[T], what: str) -> T:
        try:
            return await call
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, what) from None

    async def admit(self, request: scheduler_pb2.AdmitRequest) -> scheduler_pb2.AdmitResponse:
        md = tracing.grpc_metadata(metadata(self.token))  # the task's trace starts here
        call = self.stub.Admit(request, metadata=md, timeout=DEFAULT_DEADLINE_S)
        return await self._call(call, "the scheduler")

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
