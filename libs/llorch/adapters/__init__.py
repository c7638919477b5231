"""Engine adapters: one per wire protocol, each yielding normalized events; no Redis, no gRPC."""
