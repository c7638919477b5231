"""The swap planner (issue 13): the rules of services/llorch_scheduler/residency.py, one by one."""

from __future__ import annotations

from dataclasses import replace

from llorch_scheduler.residency import (
    PoolView,
    QueueView,
    Settings,
    ledger,
    never_fits,
    plan,
)

GIB = 1 << 30
SETTINGS = Settings(max_swap_wait_ms=30_000, min_residency_ms=10_000)
NOW = 1_000_000
TOTALS = {"0": 24 * GIB}


def pool(pool_id: str, gib: int, phase: str = "unloaded", **kw: object) -> PoolView:
    base = PoolView(
        pool_id=pool_id,
        rs=f"rs-{pool_id}",
        model=f"m-{pool_id}",
        on_demand=True,
        pinned=False,
        idle_unload_ms=300_000,
        need={"0": gib * GIB},
        phase=phase,  # type: ignore[arg-type]
        loaded_at_ms=NOW - 60_000 if phase == "ready" else 0,
        last_used_ms=NOW - 60_000 if phase == "ready" else 0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def queue(pool_id: str, interactive: int = 0, batch: int = 0, waited_ms: int = 1_000) -> QueueView:
    return QueueView(
        f"rs-{pool_id}",
        interactive,
        batch,
        waited_ms if interactive else 0,
        waited_ms if batch else 0,
    )


def test_a_demand_that_fits_loads_without_evicting() -> None:
    pools = [pool("a", 10, "ready"), pool("b", 10)]
    out = plan(pools, {"rs-b": queue("b", 1)}, TOTALS, NOW, SETTINGS)
    assert out.load == ["b"]
    assert out.evict == []


def test_an_idle_resident_is_evicted_least_recently_used_first() -> None:
    older = pool("a", 10, "ready", last_used_ms=NOW - 90_000)
    newer = pool("b", 10, "ready", last_used_ms=NOW - 30_000)
    out = plan([newer, older, pool("c", 10)], {"rs-c": queue("c", 1)}, TOTALS, NOW, SETTINGS)
    assert [e.pool_id for e in out.evict] == ["a"]
    assert out.evict[0].reason == "swap" and out.evict[0].for_pool == "c"
    assert out.load == []  # the memory frees when a reports Stopped: a later plan loads c


def test_a_busy_resident_is_never_evicted_it_is_held_until_it_drains() -> None:
    busy = pool("a", 20, "ready", running=2)
    out = plan([busy, pool("b", 10)], {"rs-b": queue("b", 1)}, TOTALS, NOW, SETTINGS)
    assert out.evict == []
    assert out.hold == {"rs-a"}
    assert "a" in out.waiting["rs-b"]


def test_a_pinned_or_always_resident_is_never_evicted_or_held() -> None:
    pinned = pool("a", 20, "ready", pinned=True)
    out = plan([pinned, pool("b", 10)], {"rs-b": queue("b", 1)}, TOTALS, NOW, SETTINGS)
    assert out.evict == [] and out.hold == set() and out.load == []
    assert "pinned" in out.waiting["rs-b"]
    always = pool("a", 20, "ready", on_demand=False)
    out = plan([always, pool("b", 10)], {"rs-b": queue("b", 1)}, TOTALS, NOW, SETTINGS)
    assert out.evict == [] and out.hold == set()
    assert "always resident" in out.waiting["rs-b"]


def test_a_resident_with_queued_work_goes_first_until_max_swap_wait() -> None:
    resident = pool("a", 20, "ready")
    pools = [resident, pool("b", 10)]
    young = {"rs-a": queue("a", batch=3), "rs-b": queue("b", batch=1, waited_ms=29_999)}
    out = plan(pools, young, TOTALS, NOW, SETTINGS)
    assert out.evict == [] and out.hold == set()
    assert "queued work" in out.waiting["rs-b"]
    old = {**young, "rs-b": queue("b", batch=1, waited_ms=30_000)}
    out = plan(pools, old, TOTALS, NOW, SETTINGS)
    assert [e.pool_id for e in out.evict] == ["a"]


def test_interactive_beats_a_resident_with_only_batch_work() -> None:
    pools = [pool("a", 20, "ready"), pool("b", 10)]
    queues = {"rs-a": queue("a", batch=5), "rs-b": queue("b", interactive=1, waited_ms=10)}
    out = plan(pools, queues, TOTALS, NOW, SETTINGS)
    assert [e.pool_id for e in out.evict] == ["a"]
    # ...but not a resident that has interactive work of its own.
    queues["rs-a"] = queue("a", interactive=1)
    out = plan(pools, queues, TOTALS, NOW, SETTINGS)
    assert out.evict == []


def test_min_residency_protects_a_fresh_load() -> None:
    fresh = pool("a", 20, "ready", loaded_at_ms=NOW - 9_999, last_used_ms=NOW - 9_999)
    out = plan([fresh, pool("b", 10)], {"rs-b": queue("b", 1, waited_ms=60_000)}, TOTALS, NOW, SETTINGS)
    assert out.evict == [] and out.hold == set()
    assert "min_residency_s" in out.waiting["rs-b"]


def test_idle_unload_after_idle_unload_s_unless_pinned_or_queued() -> None:
    idle = pool("a", 10, "ready", idle_unload_ms=60_000, last_used_ms=NOW - 60_000)
    out = plan([idle], {}, TOTALS, NOW, SETTINGS)
    assert [(e.pool_id, e.reason) for e in out.evict] == [("a", "idle")]
    assert plan([replace(idle, pinned=True)], {}, TOTALS, NOW, SETTINGS).evict == []
    assert plan([replace(idle, last_used_ms=NOW - 59_999)], {}, TOTALS, NOW, SETTINGS).evict == []
    assert plan([replace(idle, running=1)], {}, TOTALS, NOW, SETTINGS).evict == []
    assert plan([idle], {"rs-a": queue("a", 1)}, TOTALS, NOW, SETTINGS).evict == []


def test_interactive_demands_are_served_before_older_batch_ones() -> None:
    pools = [pool("b", 14), pool("c", 14)]
    queues = {"rs-b": queue("b", batch=4, waited_ms=50_000), "rs-c": queue("c", interactive=1, waited_ms=5)}
    out = plan(pools, queues, TOTALS, NOW, SETTINGS)
    assert out.load == ["c"]  # only one fits: the interactive one


def test_the_ledger_counts_loading_as_reserved_and_the_measured_use_when_larger() -> None:
    pools = [
        pool("a", 4, "ready", used={"0": 5 * GIB}),
        pool("b", 6, "loading"),
        pool("c", 8),  # unloaded: takes nothing
    ]
    entry = ledger(pools, TOTALS)["0"]
    assert (entry.used, entry.reserved, entry.free) == (5 * GIB, 6 * GIB, 13 * GIB)


def test_a_model_bigger_than_its_device_never_fits() -> None:
    assert never_fits({"0": 30 * GIB}, TOTALS) is not None
    assert never_fits({"0": 24 * GIB}, TOTALS) is None


def test_one_demand_per_device_per_plan() -> None:
    """Two demands on one full device: the first makes room; the second waits rather than taking it."""
    pools = [pool("a", 20, "ready"), pool("b", 10), pool("c", 10)]
    queues = {"rs-b": queue("b", 1, waited_ms=2_000), "rs-c": queue("c", 1, waited_ms=1_000)}
    out = plan(pools, queues, TOTALS, NOW, SETTINGS)
    assert [e.for_pool for e in out.evict] == ["b"]
    assert out.load == []
    assert "rs-c" in out.waiting


def test_a_resident_with_queued_work_keeps_its_device_twice_max_swap_wait_after_its_load() -> None:
    fresh = pool("a", 20, "ready", loaded_at_ms=NOW - 59_999, last_used_ms=NOW)
    queues = {"rs-a": queue("a", batch=3), "rs-b": queue("b", interactive=1, waited_ms=120_000)}
    out = plan([fresh, pool("b", 10)], queues, TOTALS, NOW, SETTINGS)
    assert out.evict == [] and out.hold == set()
    out = plan([replace(fresh, loaded_at_ms=NOW - 60_000), pool("b", 10)], queues, TOTALS, NOW, SETTINGS)
    assert [e.pool_id for e in out.evict] == ["a"]


def test_memory_being_unloaded_counts_as_room_so_one_swap_evicts_one_model() -> None:
    pools = [pool("a", 14, "ready"), pool("b", 8, "unloading"), pool("c", 10)]
    out = plan(pools, {"rs-c": queue("c", 1)}, TOTALS, NOW, SETTINGS)
    assert out.evict == [] and out.load == []  # c fits once b is gone: a stays


def test_the_headroom_the_load_check_keeps_is_part_of_the_fit() -> None:
    pools = [pool("a", 10, "ready"), pool("b", 14, headroom=512 << 20)]
    out = plan(pools, {"rs-b": queue("b", 1)}, TOTALS, NOW, SETTINGS)
    assert out.load == [] and [e.pool_id for e in out.evict] == ["a"]  # 10 + 14 + 0.5 > 24
    assert never_fits({"0": 24 * GIB}, TOTALS, headroom=1) is not None
