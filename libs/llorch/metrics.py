"""Metric conventions shared by the services (SPEC §6): bucket boundaries and label budgets."""

from __future__ import annotations

from typing import Final

LATENCY_BUCKETS_MS: Final = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)
QUEUE_REPLICA: Final = "-"
"""`replica_id` of queue-level series, whose `pool_id` holds the replica-set id."""
