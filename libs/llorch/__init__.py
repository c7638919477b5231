"""llama-orch shared library: config, errors, ids, logging, metrics, store, adapters, gRPC stubs."""
