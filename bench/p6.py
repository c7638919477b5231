"""P6 (BENCH.md), estimate quality: a steady mixed load on mock engines of known speed, open-loop Poisson
arrivals at a fixed share of the pool's nominal capacity, interactive and batch tasks with varied
``max_tokens`` and deadlines (some tight, some loose).

For every admitted task: ``predicted_start_ms`` and ``on_time_probability`` from the 202; the actual
start, from the 202's arrival to the arrival of the task's dispatch ``metrics`` event on its stream
(opened right after the 202); the outcome, on time when its ``end`` arrived before the 202's arrival
plus ``deadline_ms``. Tasks refused (429, 400 DEADLINE_UNMET) are counted, not scored.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from time import perf_counter
from typing import Any

import aiohttp

from tests.support.stack import Stack, sse_frames

from .env import MODEL_REF, BenchEnv, Layout
from .stats import percentile, r3

TARGET_REL_ERROR = 0.20
TARGET_BRIER = 0.10
BINS = 5


@dataclass(frozen=True, slots=True)
class P6Plan:
    duration_s: float = 70.0  # arrivals stop after this; what was admitted runs to its end
    load: float = 0.8  # arrival rate as a share of the nominal capacity
    min_tokens: int = 10
    max_tokens: int = 60
    interactive_share: float = 0.6
    tight_share: float = 0.5
    tight_low: float = 0.8  # a tight deadline is the nominal service time times U(low, high)
    tight_high: float = 2.0
    loose_deadline_ms: int = 20_000
    warmup_tasks: int = 12  # run first, not scored: the estimator learns the engines' pace
    drain_timeout_s: float = 40.0
    seed: int = 6

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


LAYOUT = Layout(replicas=2, slots=2, token_delay_ms=10, queue_capacity=256)


@dataclass(slots=True)
class Task:
    priority: str
    max_tokens: int
    deadline_ms: int
    status: int = 0
    code: str | None = None  # the refusal's code, or the stream's terminal error code
    predicted_ms: float = 0.0
    p_on_time: float = 0.0
    start_ms: float | None = None  # 202 → dispatch metrics, at the client
    queue_time_ms: float | None = None  # the dispatch event's own figure
    end_ms: float | None = None  # 202 → end, at the client
    done: bool = False

    @property
    def on_time(self) -> bool:
        return self.end_ms is not None and self.end_ms <= self.deadline_ms


async def _run(session: aiohttp.ClientSession, stack: Stack, task: Task) -> None:
    body = {
        "model_ref": MODEL_REF,
        "prompt": "p6",
        "priority": task.priority,
        "max_tokens": task.max_tokens,
        "deadline_ms": task.deadline_ms,
    }
    async with session.post(f"{stack.url}/v1/tasks", json=body, headers=stack.headers) as resp:
        admitted_at = perf_counter()
        task.status = resp.status
        answer = await resp.json()
    if task.status != 202:
        task.code, task.done = answer.get("code"), True
        return
    task.predicted_ms = float(answer["predicted_start_ms"])
    task.p_on_time = float(answer["on_time_probability"])
    async with session.get(f"{stack.url}{answer['stream_url']}", headers=stack.headers) as resp:
        async for event in sse_frames(resp.content):
            since_ms = (perf_counter() - admitted_at) * 1000
            if event.event == "metrics" and event.data.get("phase") == "dispatch":
                task.start_ms, task.queue_time_ms = since_ms, float(event.data["queue_time_ms"])
            elif event.event == "end":
                task.end_ms = since_ms
            elif event.event == "error":
                task.code = str(event.data.get("code"))
    task.done = True


def _spec(rng: random.Random, plan: P6Plan) -> Task:
    tokens = rng.randint(plan.min_tokens, plan.max_tokens)
    priority = "interactive" if rng.random() < plan.interactive_share else "batch"
    if rng.random() < plan.tight_share:
        deadline = round(tokens * LAYOUT.token_delay_ms * rng.uniform(plan.tight_low, plan.tight_high))
    else:
        deadline = plan.loose_deadline_ms
    return Task(priority, tokens, max(1, deadline))


def _start_error(tasks: list[Task]) -> dict[str, Any]:
    started = [t for t in tasks if t.start_ms is not None]
    errors = [abs(t.predicted_ms - (t.start_ms or 0.0)) for t in started]
    actual = [t.start_ms or 0.0 for t in started]
    mean_actual = sum(actual) / len(actual) if actual else float("nan")
    median_ae = percentile(errors, 50)
    mean_ae = sum(errors) / len(errors) if errors else float("nan")
    server = [abs(t.predicted_ms - (t.queue_time_ms or 0.0)) for t in started]
    return {
        "n": len(started),
        "median_abs_error_ms": r3(median_ae),
        "mean_abs_error_ms": r3(mean_ae),
        "p90_abs_error_ms": r3(percentile(errors, 90)),
        "mean_actual_start_ms": r3(mean_actual),
        "median_actual_start_ms": r3(percentile(actual, 50)),
        "mean_predicted_start_ms": r3(sum(t.predicted_ms for t in started) / max(1, len(started))),
        "rel_median_abs_error": r3(median_ae / mean_actual) if mean_actual else None,
        "rel_mean_abs_error": r3(mean_ae / mean_actual) if mean_actual else None,
        "median_abs_error_vs_queue_time_ms": r3(percentile(server, 50)),
    }


def _brier(tasks: list[Task]) -> dict[str, Any]:
    scored = [(t.p_on_time, 1.0 if t.on_time else 0.0) for t in tasks]
    n = len(scored)
    brier = sum((p - o) ** 2 for p, o in scored) / n if n else float("nan")
    base = sum(o for _, o in scored) / n if n else float("nan")
    bins = []
    for b in range(BINS):
        lo, hi = b / BINS, (b + 1) / BINS
        inside = [(p, o) for p, o in scored if lo <= p < hi or (b == BINS - 1 and p == 1.0)]
        bins.append(
            {
                "p_from": lo,
                "p_to": hi,
                "n": len(inside),
                "mean_p": r3(sum(p for p, _ in inside) / len(inside)) if inside else None,
                "on_time_rate": r3(sum(o for _, o in inside) / len(inside)) if inside else None,
            }
        )
    return {
        "n": n,
        "brier": r3(brier),
        "on_time_rate": r3(base),
        "brier_of_constant_base_rate": r3(base * (1 - base)),
        "calibration": bins,
    }


async def _load(session: aiohttp.ClientSession, stack: Stack, plan: P6Plan, rate: float) -> list[Task]:
    rng = random.Random(plan.seed)
    tasks: list[Task] = []
    runs: list[asyncio.Task[None]] = []
    t0, at = perf_counter(), 0.0
    while (at := at + rng.expovariate(rate)) < plan.duration_s:
        await asyncio.sleep(max(0.0, t0 + at - perf_counter()))
        tasks.append(_spec(rng, plan))
        runs.append(asyncio.create_task(_run(session, stack, tasks[-1])))
    _, pending = await asyncio.wait(runs, timeout=plan.drain_timeout_s) if runs else (set(), set())
    for run in pending:
        run.cancel()
    results = await asyncio.gather(*runs, return_exceptions=True)
    for task, result in zip(tasks, results, strict=True):
        if isinstance(result, BaseException) and task.code is None:
            task.code = f"client: {type(result).__name__}"
    return tasks


async def p6_estimates(workdir: Path, plan: P6Plan) -> dict[str, Any]:
    mean_tokens = (plan.min_tokens + plan.max_tokens) / 2
    slots = LAYOUT.replicas * LAYOUT.slots
    capacity = slots * 1000 / (mean_tokens * LAYOUT.token_delay_ms)  # tasks/s at nominal pace
    rate = plan.load * capacity
    async with BenchEnv(workdir / "p6", LAYOUT, direct=False) as env, aiohttp.ClientSession() as session:
        stack = env.the_stack
        warm = [
            Task("interactive", plan.max_tokens, plan.loose_deadline_ms) for _ in range(plan.warmup_tasks)
        ]
        await asyncio.gather(*(_run(session, stack, t) for t in warm))
        await env.wait_idle()
        started = perf_counter()
        tasks = await _load(session, stack, plan, rate)
        wall = perf_counter() - started
    admitted = [t for t in tasks if t.status == 202]
    finished = [t for t in admitted if t.done]
    busy_s = sum(
        ((t.end_ms or 0.0) - (t.start_ms or 0.0)) / 1000 for t in finished if t.end_ms and t.start_ms
    )
    refused: dict[str, int] = {}
    for t in tasks:
        if t.status != 202:
            key = f"{t.status} {t.code}"
            refused[key] = refused.get(key, 0) + 1
    terminal_errors: dict[str, int] = {}
    for t in admitted:
        if t.end_ms is None:
            terminal_errors[t.code or "none"] = terminal_errors.get(t.code or "none", 0) + 1
    start = _start_error(finished)
    brier = _brier(finished)
    rel = start["rel_median_abs_error"]
    ok = rel is not None and rel <= TARGET_REL_ERROR and brier["brier"] <= TARGET_BRIER
    return {
        "id": "P6",
        "what": "estimate quality",
        "target": {"rel_median_abs_error_max": TARGET_REL_ERROR, "brier_max": TARGET_BRIER},
        "params": {
            **plan.as_json(),
            "pool": f"{LAYOUT.replicas} replicas x {LAYOUT.slots} slots, {LAYOUT.token_delay_ms:g} ms/token",
            "arrivals_per_s": r3(rate),
            "nominal_capacity_per_s": r3(capacity),
        },
        "submitted": len(tasks),
        "admitted": len(admitted),
        "unfinished": len(admitted) - len(finished),
        "refused": refused,
        "ended_without_end": terminal_errors,
        "utilisation": r3(busy_s / (slots * wall)),
        "wall_s": round(wall, 1),
        "start_error": start,
        "start_error_by_priority": {
            p: _start_error([t for t in finished if t.priority == p]) for p in ("interactive", "batch")
        },
        "on_time": brier,
        "pass": ok,
    }
