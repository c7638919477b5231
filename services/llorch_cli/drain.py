"""Drain pools through the API and follow them until they settle (SPEC §5.6): used by `llorch pools
drain`, `llorch down` and the stop of `llorch up`.

A pool has settled when nothing runs on it and it is in no serving state: ``Drained``, or a state in
which it serves nothing anyway (``Stopped``, ``Preloading``, ``Backoff``, ``Unavailable``, ...). The
pool manager cuts tasks still running at the deadline (``POOL_UNAVAILABLE``), so a follow waits the
deadline plus :data:`CUT_MARGIN_S` for those cut tasks to write their end.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .api import Api, ApiError, JsonObject, quoted
from .display import table

SERVING: Final = frozenset({"Ready", "Draining", "Reloading"})
CUT_MARGIN_S: Final = 5.0
POLL_S: Final = 0.25


@dataclass(frozen=True)
class PoolRow:
    pool_id: str
    state: str
    running: int
    draining: bool

    @classmethod
    def of(cls, health: JsonObject) -> PoolRow:
        metrics = health.get("metrics")
        running = metrics.get("tasks_running") if isinstance(metrics, dict) else None
        return cls(
            pool_id=str(health.get("pool_id", "?")),
            state=str(health.get("state", "?")),
            running=running if isinstance(running, int) else 0,
            draining=health.get("draining") is True,
        )

    @property
    def settled(self) -> bool:
        return self.state not in SERVING and self.running == 0


def rows_text(rows: list[PoolRow]) -> str:
    return table(["  POOL", "STATE", "RUNNING"], [[f"  {r.pool_id}", r.state, str(r.running)] for r in rows])


@dataclass
class DrainOutcome:
    pools: list[PoolRow]  # their last seen state, the refused ones left out
    refused: dict[str, str] = field(default_factory=dict)  # pool id -> why its drain was refused

    @property
    def unsettled(self) -> list[PoolRow]:
        return [p for p in self.pools if not p.settled]


def follow(
    api: Api,
    pool_ids: list[str],
    within_s: float,
    show: Callable[[list[PoolRow]], None],
    cancelled: Callable[[], bool] = lambda: False,
) -> list[PoolRow]:
    """Poll the pools until all have settled, ``within_s`` has passed or ``cancelled()``; the last rows.

    ``show`` gets the rows on every poll (its display skips repeats). Raises ApiError."""
    end = time.monotonic() + within_s
    wanted = set(pool_ids)
    while True:
        if len(wanted) == 1:
            rows = [PoolRow.of(api.obj("GET", f"/v1/pools/{quoted(pool_ids[0])}/health"))]
        else:
            rows = [PoolRow.of(h) for h in api.objects("/v1/pools")]
            rows = [r for r in rows if r.pool_id in wanted]
        show(rows)
        if all(r.settled for r in rows) or time.monotonic() >= end or cancelled():
            return rows
        time.sleep(POLL_S)


def drain_all(
    api: Api,
    deadline_s: float,
    show: Callable[[list[PoolRow]], None],
    cancelled: Callable[[], bool] = lambda: False,
) -> DrainOutcome:
    """Drain every pool not draining yet (one already draining keeps its deadline), then follow them.

    Raises ApiError when the pools cannot be listed."""
    pools = [PoolRow.of(h) for h in api.objects("/v1/pools")]
    refused: dict[str, str] = {}
    for pool in pools:
        if pool.draining:
            continue
        try:
            api.call(
                "POST", f"/v1/pools/{quoted(pool.pool_id)}/drain", {"deadline_ms": int(deadline_s * 1000)}
            )
        except ApiError as exc:
            refused[pool.pool_id] = str(exc)
    ids = [p.pool_id for p in pools if p.pool_id not in refused]
    if not ids:
        return DrainOutcome([], refused)
    rows = follow(api, ids, deadline_s + CUT_MARGIN_S, show, cancelled)
    return DrainOutcome(rows, refused)
