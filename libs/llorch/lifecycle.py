"""Lifecycle helpers shared by the service composition roots: a gRPC server with internal auth and the
standard health service, a Prometheus endpoint, and background loops that stop with their scope."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry, start_http_server

from llorch.config import GrpcTlsConfig
from llorch.grpc_tls import add_port
from llorch.rpc import AuthInterceptor

SHUTDOWN_GRACE_S = 2.0
LOADABLE_STATES = frozenset({"Stopped", "Preloading", "SelfTest", "Backoff"})
"""Pool states of an on-demand pool that still serves: unloaded, or loading (issue 13). A task for it is
admitted and queued, and the scheduler loads it."""
COMING_STATES = frozenset({"Preloading", "SelfTest", "Backoff", "Starting", "Loading", "Reloading"})
"""Pool states on the way to Ready by themselves (SPEC §4 POOL_UNREADY); the others (Stopped, Drained,
Unavailable with its circuit open, Failed) wait for an operator (POOL_UNAVAILABLE)."""


@asynccontextmanager
async def grpc_server(
    address: str,
    token: str,
    register: Callable[[grpc.aio.Server], None],
    tls: GrpcTlsConfig | None = None,
) -> AsyncIterator[grpc.aio.Server]:
    """Serve on ``address`` (with TLS when ``tls`` is set); on exit stop advertising health first, then
    stop with a grace period."""
    # gRPC sets SO_REUSEPORT by default, which lets a second process bind the same port and silently
    # take half the connections; without it a port clash fails at start.
    server = grpc.aio.server(interceptors=[AuthInterceptor(token)], options=[("grpc.so_reuseport", 0)])
    register(server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    try:
        add_port(server, address, tls)
    except RuntimeError:
        raise SystemExit(
            f"cannot listen on {address}: the port is taken or the address is not local"
        ) from None
    await server.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield server
    finally:
        await health.enter_graceful_shutdown()
        await server.stop(grace=SHUTDOWN_GRACE_S)


@contextmanager
def metrics_endpoint(address: str, registry: CollectorRegistry) -> Iterator[None]:
    """The service's own /metrics on ``host:port`` (the gateway's /metrics is the union)."""
    host, _, port = address.rpartition(":")
    server, thread = start_http_server(int(port), addr=host, registry=registry)
    try:
        yield
    finally:
        server.shutdown()
        thread.join(timeout=SHUTDOWN_GRACE_S)


@asynccontextmanager
async def background(*coros: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run ``coros`` as tasks for the scope; cancel and await them on exit."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        yield
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
