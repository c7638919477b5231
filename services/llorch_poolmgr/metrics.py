"""The pool manager's metric families (SPEC §6: it owns them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from llorch.metrics import LATENCY_BUCKETS_MS

_REPLICA = ("engine", "engine_version", "pool_id", "replica_id")
_POOL_PRIORITY = ("engine", "engine_version", "pool_id", "priority")
_GPU = ("pool_id", "device")


class PoolMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tasks_started = Counter(
            "tasks_started_total", "Tasks dispatched to a slot", [*_REPLICA, "priority"], registry=registry
        )
        self.tokens_in = Counter(
            "tokens_in_total", "Prompt tokens (engine count)", _REPLICA, registry=registry
        )
        self.tokens_out = Counter("tokens_out_total", "Generated tokens", _REPLICA, registry=registry)
        self.first_token = Histogram(
            "latency_first_token_ms",
            "Admission to first token (ms)",
            _POOL_PRIORITY,
            buckets=LATENCY_BUCKETS_MS,
            registry=registry,
        )
        self.decode = Histogram(
            "latency_decode_ms",
            "Dispatch to end of successful tasks (ms)",
            _POOL_PRIORITY,
            buckets=LATENCY_BUCKETS_MS,
            registry=registry,
        )
        self.kv_usage = Gauge("kv_cache_usage_ratio", "Share of KV in use", _REPLICA, registry=registry)
        self.gpu_utilization = Gauge(
            "gpu_utilization", "GPU utilization percent", [*_REPLICA, "device"], registry=registry
        )
        self.vram_used = Gauge(
            "vram_used_bytes", "VRAM used by the replica", [*_REPLICA, "device"], registry=registry
        )
        self.drain_events = Counter(
            "drain_events_total",
            "Pool drains: started, completed (idle), deadline (tasks cut off), resumed",
            ["pool_id", "reason"],
            registry=registry,
        )
        self.pool_ready = Gauge("pool_ready", "1 when the pool is Ready", ["pool_id"], registry=registry)
        self.engine_restarts = Counter(
            "engine_restarts_total", "Engine restarts", ["pool_id", "reason"], registry=registry
        )
        self.preload_outcomes = Counter(
            "preload_outcomes_total", "Preload outcomes", ["pool_id", "outcome"], registry=registry
        )
        self.driver_resets = Counter(
            "driver_resets_total", "Driver or CUDA faults", ["pool_id", "device"], registry=registry
        )
        self.circuit_open = Gauge(
            "pool_circuit_open", "1 while a replica's circuit breaker is open", ["pool_id"], registry=registry
        )
        self.tasks_failed = Counter(
            "tasks_failed_total", "Tasks ended by an error", ["engine", "pool_id", "code"], registry=registry
        )
        # Whole devices as the GPU probe reads them (every process on the GPU, unlike vram_used_bytes).
        # Labelled by the pool that uses the GPU: pools of two managers may share one, and pool_id keeps
        # their series apart. CPU pools have none.
        self.gpu_vram_total = Gauge(
            "gpu_device_vram_total_bytes", "Total memory of the GPU", _GPU, registry=registry
        )
        self.gpu_vram_used = Gauge(
            "gpu_device_vram_used_bytes", "Memory in use on the GPU, all processes", _GPU, registry=registry
        )
        self.gpu_device_utilization = Gauge(
            "gpu_device_utilization", "GPU utilization percent, whole device", _GPU, registry=registry
        )
