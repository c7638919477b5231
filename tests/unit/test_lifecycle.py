"""gRPC servers refuse a port another server holds, instead of silently sharing it (SO_REUSEPORT off)."""

from __future__ import annotations

import grpc.aio
import pytest

from llorch.lifecycle import grpc_server


async def test_a_taken_port_fails_at_start_with_a_clear_message() -> None:
    async with grpc_server("127.0.0.1:0", "t", lambda _server: None) as first:
        port = first.add_insecure_port("127.0.0.1:0")  # a second listening port of the first server
        with pytest.raises(SystemExit, match=f"cannot listen on 127.0.0.1:{port}"):
            async with grpc_server(f"127.0.0.1:{port}", "t", lambda _server: None):
                pass


async def test_a_plain_grpc_server_cannot_share_the_port_either() -> None:
    async with grpc_server("127.0.0.1:0", "t", lambda _server: None) as first:
        port = first.add_insecure_port("127.0.0.1:0")
        other = grpc.aio.server()
        with pytest.raises(RuntimeError):
            other.add_insecure_port(f"127.0.0.1:{port}")
