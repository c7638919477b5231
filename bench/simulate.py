"""``python -m bench.simulate``: a deterministic discrete-event simulation of placement on a mixed-GPU box.

Three policies serve one seeded workload on a simulated 24 GB + 12 GB box. The clock is simulated (no
sleeping, no wall clock), so a run takes about a second and equal seeds give equal results.

* **ours**: the real code. Fixed-mask pools load in config order when the preload check
  (:func:`llorch.gpu.check_vram`) passes; ``devices: auto`` pools go where
  :func:`llorch_poolmgr.topology.place_auto` puts them. Each replica set dispatches strictly interactive
  first, FIFO within a class, to :func:`llorch_scheduler.placement.choose` of its replicas with a free
  slot, passing the session's previous replica as ``warm_replica``.
* **round_robin**: fixed masks are kept (they are the user's); auto pools go to the GPUs in turn with no
  VRAM check. A pool that does not fit is an OOM placement: its engine dies and the pool serves nothing.
  Tasks go round-robin over the set's replicas that have a free slot.
* **oracle**: an upper bound with perfect knowledge. Every assignment of the auto pools to a GPU (or to
  nothing) that fits the true footprints is tried (the maximal ones, where no pool left out could still
  be added, plus ours), each with two dispatch rules: earliest estimated finish (known speeds, output
  lengths and KV warmth) and ours. The best throughput wins; ours is one of the candidates, so
  ours <= oracle by construction.

The model of the hardware: a stream decodes at ``size_GB x ms_per_gb(GPU)`` ms/token, slowed by
``1 + contention x (k - 1)`` when k streams run on the same GPU (any pools); a prompt token costs
``prefill_cost`` decode tokens, and a session turn that lands on its previous replica prefills only its
new prompt (warm KV), elsewhere its whole history. An engine truly holds weights + KV + ``overhead_mib``
(CUDA context, compute buffers); the preload estimate is weights x ``vram.factor`` + KV, whose margin
covers that. Queues are unbounded (no admission refusals, only waits); a task whose model has no loaded
replica fails at arrival, and so do the later turns of its session.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import math
import random
import tempfile
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from llorch import gpu
from llorch.config import LlorchConfig, PoolConfig
from llorch_poolmgr.preload import vram_need
from llorch_poolmgr.topology import UNPLACED, place_auto
from llorch_scheduler.placement import Option, choose

from .stats import percentile

RESULTS: Final = Path(__file__).resolve().parent / "results"
MIB: Final = 1 << 20
GIB: Final = 1 << 30
GB: Final = 10**9
EPS: Final = 1e-6  # work left (decode-token equivalents) that counts as done

Priority = Literal["interactive", "batch"]
Dispatch = Literal["rank", "round_robin", "earliest_finish"]


# ---- the scenario --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SimGpu:
    device: gpu.GpuDevice
    ms_per_gb: float  # decode ms per token per GB of weights, one stream alone on the GPU


@dataclass(frozen=True, slots=True)
class Model:
    id: str
    size_bytes: int


@dataclass(frozen=True, slots=True)
class Scenario:
    gpus: tuple[SimGpu, ...]
    models: tuple[Model, ...]
    pools: tuple[Mapping[str, object], ...]  # `pools[]` entries as the YAML would have them
    window_s: float  # new jobs start within [0, window); throughput counts tasks completed in it
    contention: float = 0.3
    prefill_cost: float = 1 / 30
    overhead_mib: int = 384


@dataclass(frozen=True, slots=True)
class Turn:
    prompt_tokens: int  # the new prompt of this turn
    history_tokens: int  # earlier turns the client sends along (already truncated to fit ctx)
    max_tokens: int
    out_tokens: int  # what the model actually generates (<= max_tokens)
    think_ms: float  # after the previous turn completed (0 for the first turn)


@dataclass(frozen=True, slots=True)
class Job:
    """A single task (one turn) or a session of several turns; ``session`` turns carry affinity."""

    id: str
    priority: Priority
    model: str
    start_ms: float
    turns: tuple[Turn, ...]
    session: bool


def _device(index: int, name: str, total_mib: int, free_mib: int) -> gpu.GpuDevice:
    total, free = total_mib * MIB, free_mib * MIB
    return gpu.GpuDevice(index, name, f"GPU-sim-{index}", total, free, total - free, None)


def reference_scenario() -> Scenario:
    """The reference box: a 24 GB card 1.6x faster than the 12 GB one, three models, four pools."""
    pool: dict[str, object] = {"engine": "llamacpp", "ctx": 4096}
    return Scenario(
        gpus=(
            SimGpu(_device(0, "sim 24GB (RTX 3090 class)", 24576, 24064), ms_per_gb=2.0),
            SimGpu(_device(1, "sim 12GB (RTX 3060 class)", 12288, 11776), ms_per_gb=3.2),
        ),
        models=(
            Model("qwen2.5-7b-q4", 4_700_000_000),
            Model("llama3.1-8b-q4", 5_000_000_000),
            Model("qwen2.5-14b-q4", 9_000_000_000),
        ),
        pools=(
            {**pool, "id": "chat8b-g1", "model": "llama3.1-8b-q4", "devices": [1], "slots": 2},
            {**pool, "id": "chat7b-a", "model": "qwen2.5-7b-q4", "devices": "auto", "slots": 2},
            {**pool, "id": "code14b-a", "model": "qwen2.5-14b-q4", "devices": "auto", "slots": 2},
            {**pool, "id": "chat8b-a", "model": "llama3.1-8b-q4", "devices": "auto", "slots": 2},
        ),
        window_s=600.0,
    )


@dataclass(frozen=True, slots=True)
class Mix:
    """The reference workload: Poisson job starts, 60 % interactive.

    Interactive: a session of 1-6 turns (each further turn with probability 0.55), prompt lognormal
    (median 120 tokens), max_tokens 256 or 512, output lognormal (median 180, capped), think time
    exponential (mean 6 s) after the previous turn completes; the history rides along, trimmed to ctx.
    Batch: one task, prompt median 900, max_tokens 512/1024/1024/2048, output median 450 (capped).
    """

    jobs_per_s: float = 0.55
    interactive_share: float = 0.6
    interactive_models: Mapping[str, float] = field(
        default_factory=lambda: {"llama3.1-8b-q4": 0.45, "qwen2.5-7b-q4": 0.35, "qwen2.5-14b-q4": 0.2}
    )
    batch_models: Mapping[str, float] = field(
        default_factory=lambda: {"qwen2.5-14b-q4": 0.4, "qwen2.5-7b-q4": 0.3, "llama3.1-8b-q4": 0.3}
    )
    ctx: int = 4096


def _lognormal(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(rng.lognormvariate(math.log(median), sigma))))


def _turns(rng: random.Random, priority: Priority, ctx: int) -> tuple[Turn, ...]:
    if priority == "batch":
        max_tokens = rng.choice((512, 1024, 1024, 2048))
        prompt = _lognormal(rng, 900, 0.5, 64, ctx - max_tokens)
        return (Turn(prompt, 0, max_tokens, _lognormal(rng, 450, 0.8, 1, max_tokens), 0.0),)
    count = 1
    while count < 6 and rng.random() < 0.55:
        count += 1
    turns, history = [], 0
    for index in range(count):
        max_tokens = rng.choice((256, 512))
        prompt = _lognormal(rng, 120, 0.6, 16, 1500)
        sent = min(history, ctx - max_tokens - prompt)  # the client drops the oldest history
        out = _lognormal(rng, 180, 0.7, 1, max_tokens)
        think = 0.0 if index == 0 else rng.expovariate(1 / 6000)
        turns.append(Turn(prompt, sent, max_tokens, out, think))
        history += prompt + out
    return tuple(turns)


def reference_workload(seed: int, window_s: float, mix: Mix | None = None) -> list[Job]:
    """Jobs starting as a Poisson process within ``[0, window_s)``; deterministic for ``seed``."""
    mix = mix or Mix()
    rng = random.Random(seed)
    jobs: list[Job] = []
    t_ms = rng.expovariate(mix.jobs_per_s) * 1000
    while t_ms < window_s * 1000:
        priority: Priority = "interactive" if rng.random() < mix.interactive_share else "batch"
        weights = mix.interactive_models if priority == "interactive" else mix.batch_models
        model = rng.choices(sorted(weights), [weights[m] for m in sorted(weights)])[0]
        turns = _turns(rng, priority, mix.ctx)
        jobs.append(Job(f"j{len(jobs):05d}", priority, model, t_ms, turns, len(turns) > 1))
        t_ms += rng.expovariate(mix.jobs_per_s) * 1000
    return jobs


# ---- placement -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Placement:
    gpu_of: Mapping[str, int]  # pools that loaded -> GPU index
    oom: Mapping[str, int]  # pools put on a GPU they do not fit: the engine dies with VRAM_OOM
    unplaced: tuple[str, ...]  # left out by the policy (preload refused, or no GPU fits)


@contextlib.contextmanager
def built_config(scn: Scenario) -> Iterator[LlorchConfig]:
    """The scenario as a validated config; its catalog files are sparse files of the stated sizes."""
    with tempfile.TemporaryDirectory(prefix="llorch-sim-") as tmp:
        models = []
        for model in scn.models:
            path = Path(tmp) / f"{model.id}.gguf"
            with path.open("wb") as handle:
                handle.truncate(model.size_bytes)
            models.append({"id": model.id, "path": str(path)})
        data = {"version": 1, "state_dir": tmp, "pools": list(scn.pools), "catalog": {"models": models}}
        yield LlorchConfig.model_validate(data)


def _sizes(scn: Scenario) -> dict[str, int]:
    return {m.id: m.size_bytes for m in scn.models}


def footprint(scn: Scenario, pool: PoolConfig) -> int:
    """True VRAM of all the pool's replicas: weights + KV + CUDA context and compute buffers.

    The preload estimate (:func:`llorch_poolmgr.preload.vram_need`) is weights x ``vram.factor`` + KV;
    the factor's margin is what covers the overhead here.
    """
    size = _sizes(scn)[pool.model]
    kv = (
        pool.vram.kv_reserve_mib * MIB
        if pool.vram.kv_reserve_mib is not None
        else gpu.kv_reserve_estimate(pool.ctx, pool.slots, size)
    )
    return (size + kv + scn.overhead_mib * MIB) * pool.replicas


def _fixed_gpu(pool: PoolConfig) -> int | None:
    """The GPU of a fixed-mask pool; None for ``devices: auto``."""
    if pool.devices == "auto":
        return None
    if not isinstance(pool.devices, list) or len(pool.devices) != 1:
        raise ValueError(f"pool {pool.id}: the simulator handles single-GPU and auto pools only")
    return pool.devices[0]


def _load(scn: Scenario, cfg: LlorchConfig, chosen: Mapping[str, int | None]) -> Placement:
    """Engines start in config order, fixed masks first; one that does not fit what is left OOMs."""
    free = {g.device.index: g.device.free_bytes for g in scn.gpus}
    order = [p for p in cfg.pools if _fixed_gpu(p) is not None] + [
        p for p in cfg.pools if _fixed_gpu(p) is None
    ]
    gpu_of: dict[str, int] = {}
    oom: dict[str, int] = {}
    for pool in order:
        index = chosen.get(pool.id)
        if index is None:
            continue
        need = footprint(scn, pool)
        if need > free[index]:
            oom[pool.id] = index
            continue
        free[index] -= need
        gpu_of[pool.id] = index
    unplaced = tuple(p.id for p in cfg.pools if chosen.get(p.id) is None)
    return Placement(gpu_of, oom, unplaced)


def place_ours(scn: Scenario, cfg: LlorchConfig) -> Placement:
    """Fixed pools through the preload check, then ``place_auto`` for the auto pools."""
    devices = [g.device for g in scn.gpus]
    free = {d.index: d.free_bytes for d in devices}
    chosen: dict[str, int | None] = {}
    for pool in cfg.pools:
        index = _fixed_gpu(pool)
        if index is None:
            continue
        dev = next(d for d in devices if d.index == index)
        left = max(0, free[index])
        view = gpu.GpuDevice(index, dev.name, dev.uuid, dev.total_bytes, left, dev.total_bytes - left, None)
        need = vram_need(pool, _sizes(scn)[pool.model], 1.0) * pool.replicas
        if gpu.check_vram([view], need, pool.vram.headroom_mib * MIB, None) is None:
            chosen[pool.id] = index
            free[index] -= need
    for pool_id, pick in place_auto(cfg, devices).items():
        chosen[pool_id] = None if pick == UNPLACED else pick
    return _load(scn, cfg, chosen)


def place_round_robin(scn: Scenario, cfg: LlorchConfig) -> Placement:
    indices = [g.device.index for g in scn.gpus]
    auto = [p.id for p in cfg.pools if _fixed_gpu(p) is None]
    chosen: dict[str, int | None] = {p.id: _fixed_gpu(p) for p in cfg.pools}
    chosen.update({pool_id: indices[k % len(indices)] for k, pool_id in enumerate(auto)})
    return _load(scn, cfg, chosen)


def oracle_placements(scn: Scenario, cfg: LlorchConfig) -> list[Placement]:
    """Every maximal assignment of the auto pools that fits the true footprints (no OOM).

    Maximal: no pool it leaves out could still be added somewhere. Fixed masks are kept as they are.
    """
    fixed = {p.id: _fixed_gpu(p) for p in cfg.pools if _fixed_gpu(p) is not None}
    auto = [p.id for p in cfg.pools if _fixed_gpu(p) is None]
    options: list[int | None] = [*(g.device.index for g in scn.gpus), None]
    feasible: list[dict[str, int | None]] = []
    for combo in itertools.product(options, repeat=len(auto)):
        chosen = {**fixed, **dict(zip(auto, combo, strict=True))}
        if not set(_load(scn, cfg, chosen).oom) - set(fixed):  # a fixed mask is the user's choice
            feasible.append(chosen)

    def extends(big: dict[str, int | None], small: dict[str, int | None]) -> bool:
        return big != small and all(v is None or big[k] == v for k, v in small.items())

    maximal = [c for c in feasible if not any(extends(other, c) for other in feasible)]
    return [_load(scn, cfg, chosen) for chosen in maximal]


# ---- the event loop ------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Replica:
    id: str
    pool: str
    gpu: int
    slots: int
    ms_per_token: float
    vram_free: int
    running: int = 0


@dataclass(slots=True)
class _Task:
    index: int  # of the job in the workload
    job: Job
    turn: int
    arrive_ms: float


@dataclass(slots=True)
class _Run:
    task: _Task
    replica: _Replica
    left: float  # decode-token equivalents


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one run did; ``busy_ms`` is per GPU, the time within the window it had a stream running."""

    dispatch: Dispatch
    tokens_in_window: int
    completed: int
    failed: int
    waits_ms: Mapping[Priority, tuple[float, ...]]
    busy_ms: Mapping[int, float]
    warm_turns: int
    follow_up_turns: int
    end_ms: float

    def throughput(self, window_s: float) -> float:
        return self.tokens_in_window / window_s


def _set_key(pool: PoolConfig) -> str:
    return f"{pool.engine}/{pool.model}/{pool.ctx}/{pool.sampler_profile_version}"


class _Sim:
    """One run of one placement and one dispatch rule over a workload (single use)."""

    def __init__(self, scn: Scenario, cfg: LlorchConfig, placement: Placement, dispatch: Dispatch) -> None:
        self.scn, self.dispatch = scn, dispatch
        speed = {g.device.index: g.ms_per_gb for g in scn.gpus}
        free = {g.device.index: g.device.free_bytes for g in scn.gpus}
        for pool in cfg.pools:
            if pool.id in placement.gpu_of:
                free[placement.gpu_of[pool.id]] -= footprint(scn, pool)
        self.sets: dict[str, list[_Replica]] = {}
        self.set_of_model: dict[str, str] = {}
        for pool in cfg.pools:
            key = _set_key(pool)
            self.set_of_model.setdefault(pool.model, key)
            index = placement.gpu_of.get(pool.id)
            if index is None:
                continue
            ms = _sizes(scn)[pool.model] / GB * speed[index]
            for k in range(pool.replicas):
                replica = _Replica(f"{pool.id}-r{k}", pool.id, index, pool.slots, ms, free[index])
                self.sets.setdefault(key, []).append(replica)
        for replicas in self.sets.values():
            replicas.sort(key=lambda r: r.id)
        self.queues: dict[str, dict[Priority, deque[_Task]]] = {
            key: {"interactive": deque(), "batch": deque()} for key in sorted(self.sets)
        }
        self.active: dict[int, list[_Run]] = {g.device.index: [] for g in scn.gpus}
        self.rr_next: dict[str, int] = dict.fromkeys(self.sets, 0)
        self.last_replica: dict[str, str] = {}
        self.now = 0.0
        self.window_ms = scn.window_s * 1000
        self.tokens = self.completed = self.failed = self.warm = self.follow_ups = 0
        self.waits: dict[Priority, list[float]] = {"interactive": [], "batch": []}
        self.busy = dict.fromkeys(self.active, 0.0)

    def _ms_per_unit(self, replica: _Replica, streams: int) -> float:
        return replica.ms_per_token * (1 + self.scn.contention * (streams - 1))

    def _work(self, task: _Task, replica: _Replica) -> float:
        turn = task.job.turns[task.turn]
        warm = task.job.session and self.last_replica.get(task.job.id) == replica.id
        prefill = turn.prompt_tokens + (0 if warm else turn.history_tokens)
        return turn.out_tokens + self.scn.prefill_cost * prefill

    def run(self, jobs: Sequence[Job]) -> Outcome:
        arrivals = [(job.start_ms, n, n, 0) for n, job in enumerate(jobs)]
        heapq.heapify(arrivals)
        seq = itertools.count(len(jobs))
        while arrivals or any(self.active.values()):
            finish = min(
                (
                    self.now + r.left * self._ms_per_unit(r.replica, len(runs))
                    for runs in self.active.values()
                    for r in runs
                ),
                default=math.inf,
            )
            self._advance(min(finish, arrivals[0][0] if arrivals else math.inf))
            for job_index, next_turn in self._complete():
                job = jobs[job_index]
                at = self.now + job.turns[next_turn].think_ms
                heapq.heappush(arrivals, (at, next(seq), job_index, next_turn))
            while arrivals and arrivals[0][0] <= self.now:
                _, _, job_index, turn = heapq.heappop(arrivals)
                self._arrive(_Task(job_index, jobs[job_index], turn, self.now))
            self._dispatch()
        return Outcome(
            self.dispatch,
            self.tokens,
            self.completed,
            self.failed,
            {k: tuple(v) for k, v in self.waits.items()},
            self.busy,
            self.warm,
            self.follow_ups,
            self.now,
        )

    def _advance(self, until: float) -> None:
        span = until - self.now
        for index, runs in self.active.items():
            if not runs:
                continue
            self.busy[index] += max(0.0, min(until, self.window_ms) - min(self.now, self.window_ms))
            for run in runs:
                run.left -= span / self._ms_per_unit(run.replica, len(runs))
        self.now = until

    def _complete(self) -> list[tuple[int, int]]:
        """Finish the runs that are done; the next turns they release, as (job index, turn)."""
        nexts = []
        for index in sorted(self.active):
            done = [r for r in self.active[index] if r.left <= EPS]
            self.active[index] = [r for r in self.active[index] if r.left > EPS]
            for run in sorted(done, key=lambda r: (r.replica.id, r.task.job.id)):
                run.replica.running -= 1
                job, turn = run.task.job, run.task.turn
                self.completed += 1
                if self.now <= self.window_ms:
                    self.tokens += job.turns[turn].out_tokens
                if turn + 1 < len(job.turns):
                    nexts.append((run.task.index, turn + 1))
        return nexts

    def _arrive(self, task: _Task) -> None:
        key = self.set_of_model.get(task.job.model)
        if key is None or key not in self.sets:
            self.failed += len(task.job.turns) - task.turn  # no replica: this turn and the rest fail
            return
        self.queues[key][task.job.priority].append(task)

    def _dispatch(self) -> None:
        for key, queues in self.queues.items():
            while True:
                queue = queues["interactive"] or queues["batch"]
                if not queue:
                    break
                free = [r for r in self.sets[key] if r.running < r.slots]
                if not free:
                    break
                task = queue.popleft()
                self._start(task, self._pick(key, task, free))

    def _pick(self, key: str, task: _Task, free: list[_Replica]) -> _Replica:
        if self.dispatch == "round_robin":
            replicas = self.sets[key]
            ring = [replicas[(self.rr_next[key] + step) % len(replicas)] for step in range(len(replicas))]
            chosen = next(r for r in ring if r.running < r.slots)
            self.rr_next[key] = (replicas.index(chosen) + 1) % len(replicas)
            return chosen
        if self.dispatch == "earliest_finish":  # known speeds, lengths and warmth; ties: lowest id
            streams = {r.id: len(self.active[r.gpu]) + 1 for r in free}
            return min(free, key=lambda r: (self._work(task, r) * self._ms_per_unit(r, streams[r.id]), r.id))
        warm = self.last_replica.get(task.job.id) if task.job.session else None
        options = [Option(r.pool, r.id, r.slots - r.running, r.vram_free) for r in free]
        best = choose(options, warm)
        return next(r for r in free if best is not None and r.id == best.replica_id)

    def _start(self, task: _Task, replica: _Replica) -> None:
        if task.turn > 0:
            self.follow_ups += 1
            self.warm += self.last_replica.get(task.job.id) == replica.id
        self.waits[task.job.priority].append(self.now - task.arrive_ms)
        work = self._work(task, replica)
        self.last_replica[task.job.id] = replica.id
        replica.running += 1
        self.active[replica.gpu].append(_Run(task, replica, work))


# ---- policies, report ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PolicyResult:
    placement: Placement
    outcome: Outcome
    runs: int  # simulations this result is the best of (1 except for the oracle)


def simulate(scn: Scenario, jobs: Sequence[Job]) -> dict[str, PolicyResult]:
    """Run the three policies on ``jobs``; the result is a function of its inputs alone."""
    with built_config(scn) as cfg:
        ours_at = place_ours(scn, cfg)
        ours = PolicyResult(ours_at, _Sim(scn, cfg, ours_at, "rank").run(jobs), 1)
        rr_at = place_round_robin(scn, cfg)
        rr = PolicyResult(rr_at, _Sim(scn, cfg, rr_at, "round_robin").run(jobs), 1)
        candidates = oracle_placements(scn, cfg)
        if all(c.gpu_of != ours_at.gpu_of for c in candidates):
            candidates.append(ours_at)
        best, runs = ours, 1  # ours is a candidate: the oracle never falls below it
        for placement in candidates:
            for dispatch in ("earliest_finish", "rank"):
                if dispatch == "rank" and placement.gpu_of == ours_at.gpu_of:
                    continue  # that is ours, already run
                outcome = _Sim(scn, cfg, placement, dispatch).run(jobs)
                runs += 1
                if outcome.tokens_in_window > best.outcome.tokens_in_window:
                    best = PolicyResult(placement, outcome, runs)
        oracle = PolicyResult(best.placement, best.outcome, runs)
    return {"ours": ours, "round_robin": rr, "oracle": oracle}


def _r(value: float, digits: int = 1) -> float | None:
    return None if math.isnan(value) else round(value, digits)


def _where(cfg: LlorchConfig, placement: Placement) -> dict[str, str]:
    def one(pool_id: str) -> str:
        if pool_id in placement.gpu_of:
            return f"gpu{placement.gpu_of[pool_id]}"
        if pool_id in placement.oom:
            return f"OOM on gpu{placement.oom[pool_id]}"
        return "unplaced"

    return {p.id: one(p.id) for p in cfg.pools}


def _policy_json(scn: Scenario, cfg: LlorchConfig, result: PolicyResult) -> dict[str, Any]:
    o, waits = result.outcome, result.outcome.waits_ms
    return {
        "placement": _where(cfg, result.placement),
        "dispatch": o.dispatch,
        "simulations": result.runs,
        "throughput_tok_s": round(o.throughput(scn.window_s), 2),
        "completed_tasks": o.completed,
        "failed_tasks": o.failed,
        "oom_placements": len(result.placement.oom),
        "unplaced_pools": len(result.placement.unplaced),
        "interactive_p50_wait_ms": _r(percentile(waits["interactive"], 50)),
        "interactive_p95_wait_ms": _r(percentile(waits["interactive"], 95)),
        "batch_p50_wait_ms": _r(percentile(waits["batch"], 50)),
        "batch_max_wait_ms": _r(max(waits["batch"], default=math.nan)),
        "gpu_busy_share": {f"gpu{k}": round(v / (scn.window_s * 1000), 3) for k, v in o.busy_ms.items()},
        "warm_follow_up_share": _r(o.warm_turns / o.follow_up_turns if o.follow_up_turns else math.nan, 3),
        "drained_at_s": round(o.end_ms / 1000, 1),
    }


def _scenario_json(scn: Scenario, cfg: LlorchConfig) -> dict[str, Any]:
    sizes = _sizes(scn)
    return {
        "box": [
            {
                "index": g.device.index,
                "name": g.device.name,
                "total_mib": g.device.total_bytes // MIB,
                "free_mib": g.device.free_bytes // MIB,
                "ms_per_token_per_gb": g.ms_per_gb,
            }
            for g in scn.gpus
        ],
        "models": [
            {
                "id": m.id,
                "size_gb": m.size_bytes / GB,
                "ms_per_token": {
                    f"gpu{g.device.index}": round(m.size_bytes / GB * g.ms_per_gb, 2) for g in scn.gpus
                },
            }
            for m in scn.models
        ],
        "pools": [
            {
                "id": p.id,
                "model": p.model,
                "devices": p.devices,
                "slots": p.slots,
                "replicas": p.replicas,
                "estimate_gib": round(vram_need(p, sizes[p.model], 1.0) * p.replicas / GIB, 2),
                "footprint_gib": round(footprint(scn, p) / GIB, 2),
            }
            for p in cfg.pools
        ],
        "hardware_model": {
            "contention": scn.contention,
            "prefill_cost": scn.prefill_cost,
            "overhead_mib": scn.overhead_mib,
            "window_s": scn.window_s,
        },
    }


def results_json(
    scn: Scenario, jobs: Sequence[Job], seed: int, results: Mapping[str, PolicyResult]
) -> dict[str, Any]:
    """Everything the report shows, JSON-ready; no wall-clock field, so equal inputs give equal files."""
    tasks = [(job, turn) for job in jobs for turn in job.turns]
    tput = {name: r.outcome.throughput(scn.window_s) for name, r in results.items()}
    with built_config(scn) as cfg:
        return {
            "seed": seed,
            "simulated": True,
            **_scenario_json(scn, cfg),
            "workload": {
                "jobs": len(jobs),
                "job_starts_per_s": round(len(jobs) / scn.window_s, 3),
                "sessions": sum(job.session for job in jobs),
                "tasks": len(tasks),
                "interactive_tasks": sum(job.priority == "interactive" for job, _ in tasks),
                "batch_tasks": sum(job.priority == "batch" for job, _ in tasks),
                "offered_tok_s": round(sum(t.out_tokens for _, t in tasks) / scn.window_s, 2),
            },
            "policies": {name: _policy_json(scn, cfg, r) for name, r in results.items()},
            "ratios": {
                f"ours_over_{name}": round(tput["ours"] / tput[name], 3) if tput[name] else None
                for name in ("round_robin", "oracle")
            },
        }


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} ms"


def _policy_rows(data: Mapping[str, Any], gpus: Sequence[str]) -> list[list[str]]:
    ours = data["policies"]["ours"]["throughput_tok_s"]
    rows = []
    for name, p in data["policies"].items():
        tput = p["throughput_tok_s"]
        where = ", ".join(f"{pool} {at}" for pool, at in p["placement"].items())
        rows.append([name, where, p["dispatch"], f"{tput:,.1f}", f"{ours / tput:.3f}" if tput else "n/a"])
        rows[-1] += [str(p["oom_placements"]), str(p["failed_tasks"]), _ms(p["interactive_p95_wait_ms"])]
        rows[-1] += [_ms(p["batch_max_wait_ms"]), *(f"{100 * p['gpu_busy_share'][g]:.0f} %" for g in gpus)]
    return rows


def markdown(data: Mapping[str, Any]) -> str:
    w, hw = data["workload"], data["hardware_model"]
    gpus = [f"gpu{g['index']}" for g in data["box"]]
    box = "; ".join(
        f"gpu{g['index']} {g['name']}, {g['free_mib']:,} of {g['total_mib']:,} MiB free, "
        f"{g['ms_per_token_per_gb']:g} ms/token per GB of weights"
        for g in data["box"]
    )
    head = (
        f"Placement simulation, seed {data['seed']} (a simulated clock, not a measurement). Box: {box}. "
        f"{w['jobs']} jobs ({w['sessions']} multi-turn sessions) start in {hw['window_s']:g} s: "
        f"{w['tasks']} tasks ({w['interactive_tasks']} interactive, {w['batch_tasks']} batch), "
        f"{w['offered_tok_s']:,.1f} output tokens/s offered. Tokens/s counts the output of the tasks "
        f"completed within that window; waits are those of the tasks dispatched. A stream slows by "
        f"{hw['contention']:g} per other stream on its GPU; a prompt token costs {hw['prefill_cost']:.3f} "
        f"decode tokens; an engine holds {hw['overhead_mib']} MiB beyond weights + KV."
    )
    header = ["policy", "placement", "dispatch", "tokens/s", "ours ÷ policy", "OOM placements"]
    header += ["failed tasks", "interactive p95 wait", "batch max wait", *(f"{g} busy" for g in gpus)]
    models = {m["id"]: m for m in data["models"]}
    pools = []
    for p in data["pools"]:
        model = models[p["model"]]
        speeds = " / ".join(f"{model['ms_per_token'][g]:g}" for g in gpus)
        pools.append(
            [p["id"], f"{model['id']} ({model['size_gb']:g} GB)", str(p["devices"]), str(p["slots"])]
        )
        pools[-1] += [f"{p['estimate_gib']:.2f}", f"{p['footprint_gib']:.2f}", speeds]
    pool_header = ["pool", "model", "devices", "slots", "preload estimate GiB", "true footprint GiB"]
    pool_header.append("ms/token alone on " + " / ".join(gpus))
    r = data["ratios"]
    ratios = f"ours / round_robin = {r['ours_over_round_robin']}, ours / oracle = {r['ours_over_oracle']}."
    parts = [head, table(header, _policy_rows(data, gpus)), ratios, table(pool_header, pools)]
    return "\n\n".join(parts) + "\n"


def write_results(out: Path, stem: str, data: Mapping[str, Any], text: str) -> str:
    """``<stem>.json`` and ``<stem>.md`` under ``out``; returns the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
    (out / f"{stem}.md").write_text(text)
    return text


def write(data: Mapping[str, Any], out: Path) -> str:
    return write_results(out, "simulate", data, markdown(data))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.simulate", description="Deterministic placement simulation: ours vs baselines."
    )
    parser.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where simulate.json/.md go")
    args = parser.parse_args(argv)
    scn = reference_scenario()
    jobs = reference_workload(args.seed, scn.window_s)
    print(write(results_json(scn, jobs, args.seed, simulate(scn, jobs)), args.out))


if __name__ == "__main__":
    main()
