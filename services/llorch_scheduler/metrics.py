"""The scheduler's metric families (it owns them; SPEC §6)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_TASK = ("engine", "engine_version", "pool_id", "replica_id")


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tasks_enqueued = Counter(
            "tasks_enqueued_total", "Tasks admitted to a queue", [*_TASK, "priority"], registry=registry
        )
        self.tasks_canceled = Counter(
            "tasks_canceled_total",
            "Tasks ended by cancel, watchdog, deadline or drain",
            [*_TASK, "reason"],
            registry=registry,
        )
        self.tasks_rejected = Counter(
            "tasks_rejected_total",
            "Admission rejections and evictions",
            ["engine", "reason"],
            registry=registry,
        )
        self.catalog_verifications = Counter(
            "catalog_verifications_total",
            "Catalog verification outcomes",
            ["result", "reason", "engine"],
            registry=registry,
        )
        self.model_state = Gauge(
            "model_state",
            "1 for a catalog entry's current lifecycle state, 0 for its other states",
            ["model_id", "state"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "queue_depth",
            "Queued tasks per replica set and class",
            ["engine", "engine_version", "pool_id", "priority"],
            registry=registry,
        )
        self.backpressure = Counter(
            "admission_backpressure_events_total",
            "429s and evictions",
            ["engine", "policy"],
            registry=registry,
        )
        # On-demand residency (issue 13): loads by reason (demand, failed), evictions by reason (idle,
        # swap), and how long a load took (Resume sent -> pool Ready).
        self.model_loads = Counter(
            "model_loads_total", "On-demand model loads", ["model", "reason"], registry=registry
        )
        self.model_evictions = Counter(
            "model_evictions_total", "On-demand model unloads", ["model", "reason"], registry=registry
        )
        self.model_load_ms = Histogram(
            "model_load_ms",
            "On-demand load time, Resume to Ready",
            ["model"],
            buckets=(250, 500, 1000, 2000, 5000, 10_000, 20_000, 40_000, 80_000, 160_000, 320_000),
            registry=registry,
        )
