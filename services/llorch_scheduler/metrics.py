"""The scheduler's metric families (it owns them; SPEC §6)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

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
