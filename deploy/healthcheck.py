"""Container health probe: exit 0 when the service answers, 1 when it does not (with the reason on stderr).

    python /opt/llorch/healthcheck.py http URL        200 from URL (the gateway's /healthz or /readyz)
    python /opt/llorch/healthcheck.py grpc HOST:PORT  SERVING from the standard gRPC health service
                                                      (scheduler, pool manager; no token needed)

Compose has no gRPC probe of its own and the slim image has no curl, hence this file (the image copies it
to /opt/llorch, whose python has grpcio); Kubernetes uses its built-in httpGet and grpc probes instead.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Final

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

TIMEOUT_S: Final = 3.0
USAGE: Final = "usage: healthcheck.py http URL | grpc HOST:PORT"


def http_ok(url: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """None when ``url`` answers 200, else why not."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            return None if resp.status == 200 else f"HTTP {resp.status}"
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return f"unreachable: {exc}"


def grpc_serving(address: str, timeout_s: float = TIMEOUT_S) -> str | None:
    """None when the gRPC server at ``address`` reports SERVING, else why not."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            return f"gRPC {code.name if code else 'error'}"
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"gRPC health {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2 or args[0] not in ("http", "grpc"):
        print(USAGE, file=sys.stderr)
        return 2
    kind, target = args
    problem = http_ok(target) if kind == "http" else grpc_serving(target)
    if problem is not None:
        print(f"{target}: {problem}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
