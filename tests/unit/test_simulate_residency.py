"""The residency simulator (bench/simulate_residency.py): its counters, a swap by hand, the reference run."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from bench import simulate_residency as sr
from bench.simulate_residency import GIB, Box, Job, ModelSpec, Outcome, Sim, Turn

LOAD_8GIB_MS = 2000 + 8 * 1500  # the default load model: 2 s + 1.5 s per GiB


def _box(device_gib: int, *models: tuple[str, int]) -> Box:
    """One device; each model 1 slot at 10 ms/token (a 100-token output runs 1 s)."""
    specs = tuple(ModelSpec(name, "0", gib * GIB, 1, 10) for name, gib in models)
    return Box(totals={"0": device_gib * GIB}, models=specs, window_s=60)


def _task(job_id: str, model: str, at_ms: int, priority: sr.Priority = "batch", out: int = 100) -> Job:
    return Job(job_id, priority, model, at_ms, (Turn(0, out, 0),))


@dataclass
class _Reckless:
    """Loads whatever has queued work, making room by evicting everything else on the device, busy or
    not; with ``ignore_memory`` it does not even wait for the room."""

    ignore_memory: bool = False
    name: str = "reckless"

    def step(self, sim: Sim) -> None:
        for model in sorted(sim.pools):
            sr.fill(sim, model, interactive_first=False)
        for model, queue in sorted(sim.queued.items()):
            pool = sim.pools[model]
            if not queue or pool.phase != "unloaded":
                continue
            if not self.ignore_memory:
                for other in sim.pools.values():
                    if other is not pool and other.phase == "ready":
                        sim.evict(other.spec.id, "swap")
            if self.ignore_memory or pool.spec.footprint_bytes <= sim.free(pool.spec.device):
                sim.load(model)


def test_a_policy_that_evicts_busy_work_is_counted() -> None:
    """a (8 GiB) loads for a task at 0; b's task (1 s) finds a busy at 14 s: _Reckless evicts it anyway."""
    box = _box(10, ("a", 8), ("b", 8))
    out = Sim(box, _Reckless()).run([_task("t0", "a", 0), _task("t1", "b", 1000)])
    assert out.busy_evictions == 1
    assert out.lost == 1  # a's task died with it
    assert (out.completed, out.oom_loads, out.stranded) == (1, 0, 0)


def test_a_policy_that_loads_over_memory_is_counted() -> None:
    box = _box(10, ("a", 8), ("b", 8))
    out = Sim(box, _Reckless(ignore_memory=True)).run([_task("t0", "a", 0), _task("t1", "b", 0)])
    assert out.oom_loads == 1
    assert out.busy_evictions == 0


def test_one_swap_by_hand() -> None:
    """Two 8 GiB models, room for one, a task each at t=0; loads take 14 s, unloads 1 s, tasks 1 s.

    All policies load a at 0 (ready at 14 s, its task ends at 15 s). The peers then unload a (done at
    16 s) and load b (ready at 30 s). Ours keeps a for min_residency (10 s after its load: the tick at
    24 s), so b is ready at 39 s. One eviction each, two loads, no swap (each model loads once).
    """
    box = _box(10, ("a", 8), ("b", 8))
    jobs = [_task("t0", "a", 0), _task("t1", "b", 0)]
    results = sr.simulate(box, jobs)
    expected_b_wait = {
        "ours": 24_000 + 1000 + LOAD_8GIB_MS,
        "lru_on_arrival": 30_000,
        "fifo_collation": 30_000,
    }
    for name, out in results.items():
        assert out.waits_ms["batch"] == (LOAD_8GIB_MS, expected_b_wait[name]), name
        assert (out.loads, out.swaps, dict(out.evictions)) == (2, 0, {"swap": 1}), name
        assert out.end_ms == expected_b_wait[name] + 1000, name
        assert (out.completed, out.busy_evictions, out.oom_loads) == (2, 0, 0), name


def test_ours_puts_interactive_first_and_never_evicts_busy_work() -> None:
    """Three models, room for one; ten 10 s batch tasks for a, then b and c wanted interactively while
    a runs. Ours keeps a for 2 x max_swap_wait_ms after its load (its queue goes first), then holds it
    (it is busy) rather than evict it, serves b and c before the rest of a's queue, reloads a for the
    rest, and finishes everything.
    """
    box = _box(10, ("a", 8), ("b", 8), ("c", 8))
    jobs = [_task(f"a{k}", "a", k * 100, out=1000) for k in range(10)]
    jobs += [_task("b0", "b", 15_000, "interactive"), _task("c0", "c", 16_000, "interactive")]
    out = Sim(box, sr.Ours()).run(jobs)
    assert (out.busy_evictions, out.oom_loads, out.lost, out.stranded) == (0, 0, 0, 0)
    assert out.completed == len(jobs)
    assert out.swaps >= 1  # a came back for its queue
    assert max(out.waits_ms["interactive"]) < max(out.waits_ms["batch"])


@pytest.fixture(scope="module")
def reference() -> dict[str, Outcome]:
    box = sr.reference_box()
    return sr.simulate(box, sr.reference_trace(1, box.window_s))


def test_reference_box_holds_half_the_models() -> None:
    box = sr.reference_box()
    total = sum(box.totals.values())
    assert sum(m.footprint_bytes for m in box.models) > 1.4 * total
    for spec in box.models:
        assert spec.footprint_bytes <= box.totals[spec.device]  # each fits its device alone


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ours_on_the_reference_box_never_evicts_busy_nor_ooms(seed: int) -> None:
    box = sr.reference_box()
    jobs = sr.reference_trace(seed, box.window_s)
    out = Sim(box, sr.Ours()).run(jobs)
    assert (out.busy_evictions, out.oom_loads, out.lost, out.stranded) == (0, 0, 0, 0)
    assert out.completed == sum(len(j.turns) for j in jobs)
    assert out.swaps > 0  # the trace does make it swap


def test_reference_every_policy_serves_every_task(reference: dict[str, Outcome]) -> None:
    counts = {out.completed for out in reference.values()}
    assert len(counts) == 1
    for out in reference.values():
        assert out.stranded == 0
        assert out.loads >= len(sr.reference_box().models) - 1


def test_same_seed_same_results_other_seed_other_trace() -> None:
    box = sr.reference_box()

    def run(seed: int) -> str:
        jobs = sr.reference_trace(seed, box.window_s)
        return json.dumps(sr.results_json(box, jobs, seed, sr.simulate(box, jobs)))

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_main_writes_json_and_markdown(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sr.main(["--seed", "1", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "simulate-residency.json").read_text())
    assert list(data["policies"]) == ["ours", "lru_on_arrival", "fifo_collation"]
    ours = data["policies"]["ours"]
    assert (ours["busy_evictions"], ours["oom_loads"]) == (0, 0)
    assert data["verdict"]["no_busy_eviction"] and data["verdict"]["no_oom_load"]
    text = (tmp_path / "simulate-residency.md").read_text()
    assert "| ours |" in text and "Targets:" in text
    assert text in capsys.readouterr().out
