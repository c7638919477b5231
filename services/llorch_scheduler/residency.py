"""On-demand residency (issue 13): the VRAM ledger per device and the swap planner, as pure functions.

The planner sees a snapshot — every pool with its footprint and phase, every replica set's queue — and
answers what to do now: which pools to load, which to evict (and why), which sets to hold (no new
dispatch) so that a resident drains for a swap, and, for each set still waiting, why. It keeps no
state and reads no clock, so the scheduler's loader and ``bench.simulate_residency`` run the very same
policy.

The rules, in the order they apply:

* **Ledger.** A device's free memory is its total minus, for every pool on it that holds or is taking
  memory (loading, ready, draining, unloading), the larger of its measured use and its estimate. Pools
  that are unloaded or failed take nothing.
* **Idle unload.** An on-demand, unpinned, ready pool with nothing running, nothing queued, idle for
  its ``idle_unload_ms`` and resident for ``min_residency_ms`` is unloaded (reason ``idle``).
* **Demand order.** Sets with queued tasks and no pool loaded or loading are served interactive-first,
  then by their oldest task's wait (oldest first).
* **Fit.** A demand loads the first of its unloaded on-demand pools that fits its devices as they are;
  otherwise the one that fits after evicting the fewest residents.
* **Evictable.** Only on-demand, unpinned, ready pools with nothing running (no running task, no
  reserved slot), loaded at least ``min_residency_ms`` ago. A busy pool is never evicted.
* **Swap-aware.** A resident whose set has queued work is protected: its tasks go before a swap, until
  the waiting set's oldest task has waited ``max_swap_wait_ms`` or the waiting set has an interactive
  task while the resident's queue holds only batch work ("forced"); and whoever waits, it keeps the
  device for twice ``max_swap_wait_ms`` after its load, so that each swap (drain, unload, load: tens of
  seconds for a big model) buys a stretch of service rather than ping-pong (measured with
  ``bench.simulate_residency``). Evictions go least recently used first.
* **Hold.** When a forced swap needs a resident that is still busy, that resident's set takes no new
  dispatch, so it drains; it is evicted once idle.
* One demand per device per plan: a device that a demand is making room on is not offered to the next.
  The memory of a pool still unloading counts as room to come, so one swap never evicts two models.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

Phase = Literal["unloaded", "loading", "ready", "draining", "unloading", "failed"]
HOLDS_MEMORY: Final = frozenset({"loading", "ready", "draining", "unloading"})


@dataclass(frozen=True, slots=True)
class Settings:
    max_swap_wait_ms: int
    min_residency_ms: int


@dataclass(frozen=True, slots=True)
class PoolView:
    """One pool as the planner sees it. Times are ms on the caller's clock."""

    pool_id: str
    rs: str
    model: str
    on_demand: bool
    pinned: bool
    idle_unload_ms: int
    need: Mapping[str, int]  # device -> estimated bytes when loaded (every replica)
    phase: Phase
    used: Mapping[str, int] = field(default_factory=dict)  # device -> measured bytes; {} when unknown
    running: int = 0  # running tasks plus reserved (dispatched, not yet reported) slots
    loaded_at_ms: int = 0  # when it became ready (0: not ready)
    last_used_ms: int = 0  # its last task's dispatch or end, or its load
    headroom: int = 0  # what its load check keeps free on each of its devices beside the need

    def held(self, device: str) -> int:
        """What it takes on ``device`` now (0 unless it holds memory)."""
        if self.phase not in HOLDS_MEMORY:
            return 0
        return max(self.need.get(device, 0), self.used.get(device, 0))


@dataclass(frozen=True, slots=True)
class QueueView:
    rs: str
    interactive: int = 0
    batch: int = 0
    oldest_interactive_ms: int = 0  # how long its oldest interactive task has waited
    oldest_batch_ms: int = 0

    @property
    def depth(self) -> int:
        return self.interactive + self.batch

    @property
    def oldest_ms(self) -> int:
        return max(self.oldest_interactive_ms, self.oldest_batch_ms)


@dataclass(frozen=True, slots=True)
class Eviction:
    pool_id: str
    reason: str  # "idle" | "swap"
    for_pool: str = ""  # the pool it makes room for (swap)


@dataclass(slots=True)
class Plan:
    load: list[str] = field(default_factory=list)
    evict: list[Eviction] = field(default_factory=list)
    hold: set[str] = field(default_factory=set)  # sets whose dispatch pauses so their pool drains
    waiting: dict[str, str] = field(default_factory=dict)  # set -> why its load waits


@dataclass(frozen=True, slots=True)
class DeviceLedger:
    device: str
    total: int
    used: int  # loaded (ready, draining, unloading) pools
    reserved: int  # loading pools

    @property
    def free(self) -> int:
        return max(0, self.total - self.used - self.reserved)


def ledger(pools: Iterable[PoolView], totals: Mapping[str, int]) -> dict[str, DeviceLedger]:
    """Each device's total, used, reserved and free bytes."""
    used = dict.fromkeys(totals, 0)
    reserved = dict.fromkeys(totals, 0)
    for pool in pools:
        for device in pool.need.keys() | pool.used.keys():
            if device not in totals:
                continue
            if pool.phase == "loading":
                reserved[device] += pool.held(device)
            else:
                used[device] += pool.held(device)
    return {d: DeviceLedger(d, totals[d], used[d], reserved[d]) for d in totals}


def never_fits(need: Mapping[str, int], totals: Mapping[str, int], headroom: int = 0) -> str | None:
    """Why a pool can never load (its need and headroom exceed a device's total), or None."""
    for device, nbytes in sorted(need.items()):
        total = totals.get(device)
        if total is not None and nbytes + headroom > total:
            return f"needs {_gib(nbytes + headroom)} on device {device}, which has {_gib(total)} in all"
    return None


def plan(
    pools: Sequence[PoolView],
    queues: Mapping[str, QueueView],
    totals: Mapping[str, int],
    now_ms: int,
    settings: Settings,
) -> Plan:
    out = Plan()
    free = {d: entry.free for d, entry in ledger(pools, totals).items()}
    leaving: set[str] = set()  # pools this plan evicts

    for pool in pools:
        if _idle_expired(pool, queues.get(pool.rs), now_ms, settings):
            out.evict.append(Eviction(pool.pool_id, "idle"))
            leaving.add(pool.pool_id)
            # The memory frees only once the pool reports Stopped: a later plan loads into it.

    served = {p.rs for p in pools if p.phase in ("loading", "ready", "draining")}
    demands = sorted(
        (q for q in queues.values() if q.depth and q.rs not in served),
        key=lambda q: (q.interactive == 0, -q.oldest_ms, q.rs),
    )
    claimed: set[str] = set()  # devices a demand is making room on
    for demand in demands:
        options = [p for p in pools if p.rs == demand.rs and p.on_demand and p.phase == "unloaded" and p.need]
        if not options:
            continue
        if all(claimed & p.need.keys() for p in options):
            out.waiting[demand.rs] = "another model's load is making room on its device"
            continue
        fitting = [p for p in options if not claimed & p.need.keys() and _fits(p, free)]
        if fitting:
            chosen = fitting[0]
            out.load.append(chosen.pool_id)
            for device, nbytes in chosen.need.items():
                free[device] = free.get(device, 0) - nbytes
            continue
        best: tuple[int, PoolView, list[PoolView], list[PoolView]] | None = None
        why = ""
        for option in options:
            if claimed & option.need.keys():
                continue
            room = _make_room(option, pools, queues, demand, free, leaving, now_ms, settings)
            if isinstance(room, str):
                why = why or room
                continue
            evict, hold = room
            cost = len(evict) * 1000 + len(hold)
            if best is None or cost < best[0]:
                best = (cost, option, evict, hold)
        if best is None:
            out.waiting[demand.rs] = why or "no device it needs has room"
            continue
        _, option, evict, hold = best
        claimed |= option.need.keys()
        for victim in evict:
            out.evict.append(Eviction(victim.pool_id, "swap", option.pool_id))
            leaving.add(victim.pool_id)
        for pool in hold:
            out.hold.add(pool.rs)
        if hold:
            names = ", ".join(sorted(p.pool_id for p in hold))
            out.waiting[demand.rs] = f"waiting for {names} to finish its running tasks"
        else:
            out.waiting[demand.rs] = "evicting idle models to make room"
    return out


def _idle_expired(pool: PoolView, queue: QueueView | None, now_ms: int, settings: Settings) -> bool:
    return (
        pool.on_demand
        and not pool.pinned
        and pool.phase == "ready"
        and pool.running == 0
        and (queue is None or queue.depth == 0)
        and now_ms - pool.last_used_ms >= pool.idle_unload_ms
        and now_ms - pool.loaded_at_ms >= settings.min_residency_ms
    )


def _fits(pool: PoolView, free: Mapping[str, int]) -> bool:
    return all(nbytes + pool.headroom <= free.get(device, 0) for device, nbytes in pool.need.items())


def _forced(demand: QueueView, resident: QueueView | None, resident_for_ms: int, settings: Settings) -> bool:
    """May ``demand`` take the device from a resident whose set has queued work?

    A resident with queued work keeps the device at least twice ``max_swap_wait_ms`` after its load,
    whoever waits: a swap costs a drain, an unload and a load (tens of seconds for a large model), and
    shorter turns spend more time swapping than serving.
    """
    if resident is None or resident.depth == 0:
        return True
    if resident_for_ms < 2 * settings.max_swap_wait_ms:
        return False
    if demand.oldest_ms >= settings.max_swap_wait_ms:
        return True
    return demand.interactive > 0 and resident.interactive == 0


def _make_room(
    option: PoolView,
    pools: Sequence[PoolView],
    queues: Mapping[str, QueueView],
    demand: QueueView,
    free: Mapping[str, int],
    leaving: set[str],
    now_ms: int,
    settings: Settings,
) -> tuple[list[PoolView], list[PoolView]] | str:
    """The residents to evict now and those to hold (busy, to evict once drained) so that ``option``
    fits, least recently used first; or why it cannot fit yet."""
    devices = option.need.keys()
    gain = dict.fromkeys(devices, 0)
    for pool in pools:  # what the evictions planned now or under way will free
        if pool.pool_id in leaving or pool.phase == "unloading":
            for device in devices:
                gain[device] += pool.held(device)
    on_devices = [
        p
        for p in pools
        if p.pool_id not in leaving and p.phase == "ready" and devices & (p.need.keys() | p.used.keys())
    ]
    evict: list[PoolView] = []
    hold: list[PoolView] = []
    blockers: list[str] = []
    for pool in sorted(on_devices, key=lambda p: (p.last_used_ms, p.pool_id)):
        if all(option.need[d] + option.headroom <= free.get(d, 0) + gain[d] for d in devices):
            break
        if not pool.on_demand or pool.pinned:
            blockers.append(f"{pool.pool_id} is {'pinned' if pool.pinned else 'always resident'}")
            continue
        if now_ms - pool.loaded_at_ms < settings.min_residency_ms:
            blockers.append(f"{pool.pool_id} was loaded less than min_residency_s ago")
            continue
        if not _forced(demand, queues.get(pool.rs), now_ms - pool.loaded_at_ms, settings):
            blockers.append(f"{pool.pool_id} has queued work (a swap waits up to max_swap_wait_ms)")
            continue
        (hold if pool.running else evict).append(pool)
        for device in devices:
            gain[device] += pool.held(device)
    if not all(option.need[d] + option.headroom <= free.get(d, 0) + gain[d] for d in devices):
        return "; ".join(blockers) or "no device it needs has room"
    return evict, hold


def _gib(nbytes: int) -> str:
    return f"{nbytes / (1 << 30):.1f} GiB"
