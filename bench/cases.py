"""P1, P2 and P3 (BENCH.md): each drives the same load through the stack and straight at the engines,
alternating stack/direct for a fixed number of rounds, and returns its figures as JSON-ready dicts."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from . import profile
from .cpu import TASK_STACK, TOKEN_STACK, Meter, cost
from .env import BenchEnv
from .stats import Dist, Spread, added, r3
from .traffic import StreamTrace, Target, wave

Runner = Callable[[Target], Awaitable[list[StreamTrace]]]
BENCH_TIMEOUT_S = 290.0  # BENCH.md: each benchmark under 5 minutes


@dataclass(frozen=True, slots=True)
class Plan:
    """Every load is bounded: fixed stream counts, token counts, rounds and per-run timeouts."""

    rounds: int = 3
    p3_rounds: int = 2
    p1_streams: tuple[int, ...] = (1, 32, 256)
    p1_tokens: int = 100
    p2_sequential: int = 30
    p2_concurrency: int = 32
    p2_waves: int = 4
    p2_tokens: int = 2
    p3_streams: int = 500
    p3_tokens: int = 400
    sat_streams: int = 64
    sat_tokens: int = 400
    run_timeout_s: float = 60.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Sides:
    stack: Target
    direct: Target


class AB:
    """Alternates stack and direct runs (A/B/A/B), waiting for an idle pool after every run.

    Each run is also a CPU-accounting window (P9): after ``run``, ``cpu`` holds the CPU seconds every
    process used during that call's stack runs and during its direct runs, by role (the idle waits
    between runs are not counted).
    """

    def __init__(self, env: BenchEnv, sides: Sides, rounds: int) -> None:
        self.env = env
        self.sides = sides
        self.rounds = rounds
        self.roles = env.cpu_roles()
        self.cpu: dict[str, dict[str, float]] = {}

    async def run(
        self, runner: Runner, rounds: int | None = None
    ) -> tuple[list[list[StreamTrace]], list[list[StreamTrace]]]:
        stack_runs: list[list[StreamTrace]] = []
        direct_runs: list[list[StreamTrace]] = []
        meters = {"stack": Meter(self.roles), "direct": Meter(self.roles)}
        for _ in range(self.rounds if rounds is None else rounds):
            for target, runs, meter in (
                (self.sides.stack, stack_runs, meters["stack"]),
                (self.sides.direct, direct_runs, meters["direct"]),
            ):
                started = meter.start()
                runs.append(await runner(target))
                meter.stop(started)
                await self.env.wait_idle()
        self.cpu = {side: meter.seconds for side, meter in meters.items()}
        return stack_runs, direct_runs

    def cpu_per_token(
        self, stack_runs: list[list[StreamTrace]], direct_runs: list[list[StreamTrace]]
    ) -> dict[str, Any]:
        """P9 for the last ``run``: µs of CPU per token delivered to the clients, by role, each side."""
        return self._cpu_per(_delivered, TOKEN_STACK, stack_runs, direct_runs)

    def cpu_per_task(
        self, stack_runs: list[list[StreamTrace]], direct_runs: list[list[StreamTrace]]
    ) -> dict[str, Any]:
        """P9 for the last ``run``: µs of CPU per complete task (every token delivered), by role."""
        return self._cpu_per(_complete, TASK_STACK, stack_runs, direct_runs)

    def _cpu_per(
        self,
        units: Callable[[list[list[StreamTrace]]], int],
        stack: tuple[str, ...],
        stack_runs: list[list[StreamTrace]],
        direct_runs: list[list[StreamTrace]],
    ) -> dict[str, Any]:
        return {
            "stack": cost(self.cpu["stack"], units(stack_runs), stack),
            "direct": cost(self.cpu["direct"], units(direct_runs), ()),
        }


def _delivered(runs: list[list[StreamTrace]]) -> int:
    return sum(t.tokens for traces in runs for t in traces)


def _complete(runs: list[list[StreamTrace]]) -> int:
    return sum(1 for traces in runs for t in traces if t.error is None)


def _errors(runs: list[list[StreamTrace]]) -> list[str]:
    return [t.error for traces in runs for t in traces if t.error is not None]


def _gaps(traces: list[StreamTrace]) -> list[float]:
    return [g for t in traces for g in t.gaps_ms()]


def _ttfts(traces: list[StreamTrace]) -> list[float]:
    return [v for t in traces if (v := t.ttft_ms()) is not None]


def _compare(
    stack_runs: list[list[StreamTrace]],
    direct_runs: list[list[StreamTrace]],
    sample: Callable[[list[StreamTrace]], list[float]],
) -> dict[str, Any]:
    """Pooled stack vs direct distributions, what the stack adds, and its per-round spread."""
    stack = Dist.of([v for run in stack_runs for v in sample(run)])
    direct = Dist.of([v for run in direct_runs for v in sample(run)])
    per_round = [
        added(Dist.of(sample(s)), Dist.of(sample(d))) for s, d in zip(stack_runs, direct_runs, strict=True)
    ]
    add50, add99 = added(stack, direct)
    return {
        "stack": stack.as_json(),
        "direct": direct.as_json(),
        "added_p50_ms": Spread.of(add50, [a for a, _ in per_round]).as_json(),
        "added_p99_ms": Spread.of(add99, [b for _, b in per_round]).as_json(),
        "errors": {"stack": len(_errors(stack_runs)), "direct": len(_errors(direct_runs))},
        "first_errors": (_errors(stack_runs) + _errors(direct_runs))[:3],
    }


def _ok(case: dict[str, Any], p50_max: float, p99_max: float) -> bool:
    clean = case["errors"]["stack"] == 0 and case["errors"]["direct"] == 0
    return bool(
        clean and case["added_p50_ms"]["value"] <= p50_max and case["added_p99_ms"]["value"] <= p99_max
    )


async def p1_inter_token(ab: AB, session: aiohttp.ClientSession, plan: Plan) -> dict[str, Any]:
    cases: list[dict[str, Any]] = []
    for streams in plan.p1_streams:

        async def runner(target: Target, streams: int = streams) -> list[StreamTrace]:
            return await wave(session, target, streams, plan.p1_tokens, plan.run_timeout_s)

        stack_runs, direct_runs = await ab.run(runner)
        cases.append(
            {
                "streams": streams,
                **_compare(stack_runs, direct_runs, _gaps),
                "cpu": ab.cpu_per_token(stack_runs, direct_runs),
            }
        )
    gated = cases[-1]
    return {
        "id": "P1",
        "what": "added inter-token latency",
        "target": {"streams": gated["streams"], "added_p50_ms_max": 1.0, "added_p99_ms_max": 5.0},
        "params": {"tokens_per_stream": plan.p1_tokens, "streams": list(plan.p1_streams)},
        "cases": cases,
        "pass": _ok(gated, 1.0, 5.0),
    }


async def p2_ttft(ab: AB, session: aiohttp.ClientSession, plan: Plan) -> dict[str, Any]:
    cases: list[dict[str, Any]] = []
    for concurrency, waves in ((1, plan.p2_sequential), (plan.p2_concurrency, plan.p2_waves)):

        async def runner(
            target: Target, concurrency: int = concurrency, waves: int = waves
        ) -> list[StreamTrace]:
            traces: list[StreamTrace] = []
            for _ in range(waves):
                await ab.env.wait_idle()  # an idle queue before every wave
                traces += await wave(session, target, concurrency, plan.p2_tokens, plan.run_timeout_s)
            return traces

        stack_runs, direct_runs = await ab.run(runner)
        cases.append(
            {
                "concurrency": concurrency,
                "samples_per_round": concurrency * waves,
                **_compare(stack_runs, direct_runs, _ttfts),
                # The idle check before each wave is inside the window: one status read per wave.
                "cpu": ab.cpu_per_task(stack_runs, direct_runs),
            }
        )
    gated = cases[-1]
    return {
        "id": "P2",
        "what": "added time to first token",
        "target": {"concurrency": gated["concurrency"], "added_p50_ms_max": 3.0, "added_p99_ms_max": 15.0},
        "params": {"tokens_per_stream": plan.p2_tokens},
        "cases": cases,
        "pass": _ok(gated, 3.0, 15.0),
    }


def _rates(traces: list[StreamTrace]) -> tuple[float, float]:
    """(wall, steady) tokens/s delivered; steady counts only while every complete stream was running
    (NaN when there was no such window: the last stream started after the first one ended)."""
    good = [t for t in traces if t.times]
    if not good:
        return 0.0, 0.0
    total = sum(t.tokens for t in good)
    wall = total / max(max(t.times[-1] for t in good) - min(t.t_send for t in good), 1e-9)
    whole = [t for t in good if t.error is None]  # a stream cut short would close the window early
    if not whole:
        return wall, float("nan")
    lo, hi = max(t.times[0] for t in whole), min(t.times[-1] for t in whole)
    if hi - lo < 0.5:
        return wall, float("nan")
    inside = sum(n for t in whole for at, n in zip(t.times, t.counts, strict=True) if lo < at <= hi)
    return wall, inside / (hi - lo)


def _ratio_block(stack_runs: list[list[StreamTrace]], direct_runs: list[list[StreamTrace]]) -> dict[str, Any]:
    stack_rates = [_rates(run) for run in stack_runs]
    direct_rates = [_rates(run) for run in direct_runs]
    block: dict[str, Any] = {}
    for index, kind in enumerate(("wall", "steady")):
        s = [rates[index] for rates in stack_rates]
        d = [rates[index] for rates in direct_rates]
        ratios = [a / b if b else float("nan") for a, b in zip(s, d, strict=True)]
        mean_s, mean_d = sum(s) / len(s), sum(d) / len(d)
        block[kind] = {
            "stack_tokens_per_s": [round(v, 1) for v in s],
            "direct_tokens_per_s": [round(v, 1) for v in d],
            "ratio": Spread.of(mean_s / mean_d if mean_d else float("nan"), ratios).as_json(),
        }
    return block


async def p3_throughput(ab: AB, session: aiohttp.ClientSession, plan: Plan) -> dict[str, Any]:
    async def paced(target: Target) -> list[StreamTrace]:
        return await wave(session, target, plan.p3_streams, plan.p3_tokens, plan.run_timeout_s)

    stack_runs, direct_runs = await ab.run(paced, plan.p3_rounds)
    case = {
        "streams": plan.p3_streams,
        **_compare(stack_runs, direct_runs, _gaps),
        **_ratio_block(stack_runs, direct_runs),
        "cpu": ab.cpu_per_token(stack_runs, direct_runs),
    }
    # No steady window (NaN) when the slowest stream started after the fastest finished.
    headline = "wall" if math.isnan(case["steady"]["ratio"]["value"]) else "steady"
    ratio = case[headline]["ratio"]["value"]
    case["headline_ratio"] = headline
    errors = case["errors"]["stack"] + case["errors"]["direct"]
    ok = errors == 0 and ratio >= 0.95 and case["added_p99_ms"]["value"] <= 10.0

    await ab.env.set_pace(0)
    try:

        async def flat_out(target: Target) -> list[StreamTrace]:
            if target is not ab.sides.stack:
                return await wave(session, target, plan.sat_streams, plan.sat_tokens, plan.run_timeout_s)
            async with profile.window("P3 saturation, stack", ab.roles):
                return await wave(session, target, plan.sat_streams, plan.sat_tokens, plan.run_timeout_s)

        sat_stack, sat_direct = await ab.run(flat_out, plan.p3_rounds)
        sat_cpu = ab.cpu_per_token(sat_stack, sat_direct)
    finally:
        await ab.env.set_pace(ab.env.layout.token_delay_ms)
    saturation = {
        "streams": plan.sat_streams,
        "tokens_per_stream": plan.sat_tokens,
        **_ratio_block(sat_stack, sat_direct)["wall"],
        "errors": {"stack": len(_errors(sat_stack)), "direct": len(_errors(sat_direct))},
        "cpu": sat_cpu,
    }
    return {
        "id": "P3",
        "what": "relay throughput",
        "target": {"ratio_min": 0.95, "added_p99_ms_max": 10.0},
        "params": {
            "streams": plan.p3_streams,
            "tokens_per_stream": plan.p3_tokens,
            "offered_tokens_per_s": r3(plan.p3_streams * 1000 / ab.env.layout.token_delay_ms),
        },
        "cases": [case],
        "saturation": saturation,
        "pass": ok,
    }


async def bounded(coro: Awaitable[dict[str, Any]]) -> dict[str, Any]:
    async with asyncio.timeout(BENCH_TIMEOUT_S):
        return await coro
