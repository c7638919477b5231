"""llama-orch shared library: config, errors, ids, logging, metrics, store, adapters, gRPC stubs."""

import os

# The services fork only to exec at once (engines, Redis); gRPC's fork handlers, on by default in
# grpcio, would run in every such fork and crash it or its parent while another thread is inside gRPC
# (an engine start failing with SIGSEGV, a pool manager dying silently, seen under load). gRPC's own
# advice for fork-then-exec is to turn them off; it reads this before its first use.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
