"""Benchmarks (BENCH.md): side-by-side ratios of llama-orch against the bare engine on this machine."""
