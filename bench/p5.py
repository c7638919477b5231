"""P5 (BENCH.md), our OpenAI path vs a peer proxy: the same chat requests through the stack's
``POST /v1/chat/completions`` (gateway → scheduler → pool manager → mock engine) and through a LiteLLM
proxy (``bench/peer.py``) in front of a mock engine of its own with the same command line and pace.

- **Added latency**, streamed, at 1 stream (requests one after another) and at 32 (waves started
  together): TTFT (to the first content token) and total time (to ``[DONE]``), each proxy minus the
  same requests straight at its own engine (the pool's replica; LiteLLM's upstream). The headline is
  ours / LiteLLM of the added p50.
- **Max requests/s**, short answers with the engines unpaced, streamed and not: a fixed number of
  clients in a closed loop for a bounded time; ours / LiteLLM. The bare engine is measured the same
  way, for reference.

Every round runs each load on both sides, and the side that goes first alternates from round to round.
The proxies' own settings are in ``bench/peer.py``: LiteLLM checks a master key (so the client sends
one, as it sends the stack's token), with no database, callbacks or cache, one worker,
``LITELLM_LOG=ERROR``. Any error on any side fails P5 and is shown in the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from .chat_load import TIMEOUT, Call, ChatTarget, Rate, hammer, waves
from .env import MODEL_REF, POOL_ID, BenchEnv, Layout
from .peer import Install, LiteLLMProxy
from .stats import Dist, Spread, added

TARGET_ADDED_RATIO = 0.3
TARGET_RATE_RATIO = 3.0
SIDES = ("stack", "litellm")
WHAT = "OpenAI path vs LiteLLM proxy"


@dataclass(frozen=True, slots=True)
class P5Plan:
    rounds: int = 2
    token_delay_ms: float = 20.0  # both engines, for the latency part
    slots: int = 64
    latency_tokens: int = 8
    sequential: int = 20  # requests one after another at concurrency 1, per side and round
    concurrency: int = 32
    waves: int = 3
    rate_clients: int = 32
    rate_duration_s: float = 8.0
    rate_tokens: int = 4
    rate_max_requests: int = 20_000  # per run, a bound should a side be far faster than expected
    warmup_requests: int = 32

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class Side:
    proxy: ChatTarget
    direct: ChatTarget


Runs = dict[str, list[list[Call]]]  # "<side>" and "<side>_direct" -> one list of calls per round


def _order(round_index: int) -> tuple[str, ...]:
    return SIDES if round_index % 2 == 0 else SIDES[::-1]


async def _engine_url(env: BenchEnv) -> str:
    """The pool's own engine, for the stack's direct baseline."""
    stack = env.the_stack
    url = f"{stack.url}/v1/pools/{POOL_ID}/health"
    async with aiohttp.ClientSession() as session, session.get(url, headers=stack.headers) as resp:
        resp.raise_for_status()
        body: dict[str, Any] = await resp.json()
    return f"http://127.0.0.1:{body['replicas'][0]['port']}"


def _errors(calls: list[Call]) -> list[str]:
    return [c.error for c in calls if c.error is not None]


async def _warm_up(session: aiohttp.ClientSession, sides: dict[str, Side], plan: P5Plan) -> list[str]:
    """Connections open and lazy set-up done on every path before anything is measured."""
    errors: list[str] = []
    for side in sides.values():
        for target in (side.proxy, side.direct):
            calls = await waves(session, target, plan.warmup_requests // 2, 2, 2)
            rate = await hammer(session, target, 8, 0.5, 2, False, plan.warmup_requests)
            errors += _errors(calls) + rate.errors
    return errors


def _metric(runs: Runs, sample: Callable[[Call], float | None]) -> dict[str, Any]:
    """Pooled distributions, what each proxy adds at p50/p99 (with its per-round spread), and the
    ratio ours / LiteLLM of the added p50."""

    def dist(calls: list[Call]) -> Dist:
        return Dist.of([v for c in calls if (v := sample(c)) is not None])

    out: dict[str, Any] = {}
    add50: dict[str, list[float]] = {}
    for side in SIDES:
        proxy, direct = runs[side], runs[f"{side}_direct"]
        both = dist([c for run in proxy for c in run]), dist([c for run in direct for c in run])
        pooled = added(*both)
        per_round = [added(dist(p), dist(d)) for p, d in zip(proxy, direct, strict=True)]
        add50[side] = [pooled[0], *(a for a, _ in per_round)]
        out[side], out[f"{side}_direct"] = both[0].as_json(), both[1].as_json()
        out[f"{side}_added_p50_ms"] = Spread.of(pooled[0], [a for a, _ in per_round]).as_json()
        out[f"{side}_added_p99_ms"] = Spread.of(pooled[1], [b for _, b in per_round]).as_json()
    ratios = [_ratio(ours, theirs) for ours, theirs in zip(add50["stack"], add50["litellm"], strict=True)]
    out["ratio_p50"] = Spread.of(ratios[0], ratios[1:]).as_json()
    return out


def _ratio(ours: float, theirs: float) -> float:
    """NaN when the peer adds nothing measurable: no ratio can be judged then."""
    return ours / theirs if theirs > 0 else float("nan")


async def _latency_case(
    session: aiohttp.ClientSession,
    env: BenchEnv,
    sides: dict[str, Side],
    plan: P5Plan,
    concurrency: int,
    count: int,
) -> dict[str, Any]:
    runs: Runs = {key: [] for side in SIDES for key in (side, f"{side}_direct")}
    for index in range(plan.rounds):
        for name in _order(index):
            side = sides[name]
            runs[f"{name}_direct"].append(
                await waves(session, side.direct, concurrency, count, plan.latency_tokens)
            )
            runs[name].append(await waves(session, side.proxy, concurrency, count, plan.latency_tokens))
            await env.wait_idle()
    errors = {key: len(_errors([c for run in value for c in run])) for key, value in runs.items()}
    first = [e for value in runs.values() for run in value for e in _errors(run)][:3]
    return {
        "concurrency": concurrency,
        "samples_per_round": concurrency * count,
        "ttft": _metric(runs, Call.ttft_ms),
        "total": _metric(runs, Call.total_ms),
        "errors": errors,
        "first_errors": first,
    }


async def _rate_case(
    session: aiohttp.ClientSession, env: BenchEnv, sides: dict[str, Side], plan: P5Plan, stream: bool
) -> dict[str, Any]:
    runs: dict[str, list[Rate]] = {"stack": [], "litellm": [], "direct": []}
    for index in range(plan.rounds):
        for name in _order(index):
            runs[name].append(
                await hammer(
                    session,
                    sides[name].proxy,
                    plan.rate_clients,
                    plan.rate_duration_s,
                    plan.rate_tokens,
                    stream,
                    plan.rate_max_requests,
                )
            )
            await env.wait_idle()
        runs["direct"].append(
            await hammer(
                session,
                sides["litellm"].direct,
                plan.rate_clients,
                plan.rate_duration_s,
                plan.rate_tokens,
                stream,
                plan.rate_max_requests,
            )
        )
    per_s = {name: [r.per_s for r in rates] for name, rates in runs.items()}
    mean = {name: sum(values) / len(values) for name, values in per_s.items()}
    ratios = [_ratio(o, t) for o, t in zip(per_s["stack"], per_s["litellm"], strict=True)]
    out: dict[str, Any] = {"stream": stream, "clients": plan.rate_clients, "max_tokens": plan.rate_tokens}
    for name, rates in runs.items():
        merged = Rate(sum(r.seconds for r in rates), [c for r in rates for c in r.calls])
        out[name] = {**merged.as_json(), "per_s_by_round": [round(v, 1) for v in per_s[name]]}
    out["ratio"] = Spread.of(_ratio(mean["stack"], mean["litellm"]), ratios).as_json()
    out["first_errors"] = [e for rates in runs.values() for r in rates for e in r.errors][:3]
    return out


def _ok(latency: list[dict[str, Any]], rates: list[dict[str, Any]], warmup_errors: list[str]) -> bool:
    def below(value: float | None) -> bool:
        return value is not None and not math.isnan(value) and value <= TARGET_ADDED_RATIO

    def above(value: float | None) -> bool:
        return value is not None and not math.isnan(value) and value >= TARGET_RATE_RATIO

    clean = not warmup_errors and all(n == 0 for case in latency for n in case["errors"].values())
    clean = clean and all(
        case[name]["errors"] == 0 for case in rates for name in ("stack", "litellm", "direct")
    )
    added_ok = all(below(case[m]["ratio_p50"]["value"]) for case in latency for m in ("ttft", "total"))
    return clean and added_ok and all(above(case["ratio"]["value"]) for case in rates)


def skipped(reason: str, install: Install) -> dict[str, Any]:
    """P5 without figures: the peer could not be installed or started."""
    return {
        "id": "P5",
        "what": WHAT,
        "target": _target(),
        "peer": install.as_json(),
        "skipped": reason,
        "pass": None,
    }


def _target() -> dict[str, float]:
    return {"added_p50_ratio_max": TARGET_ADDED_RATIO, "rate_ratio_min": TARGET_RATE_RATIO}


async def _measure(
    session: aiohttp.ClientSession, env: BenchEnv, sides: dict[str, Side], plan: P5Plan
) -> dict[str, Any]:
    warmup_errors = await _warm_up(session, sides, plan)
    await env.wait_idle()
    latency = [
        await _latency_case(session, env, sides, plan, 1, plan.sequential),
        await _latency_case(session, env, sides, plan, plan.concurrency, plan.waves),
    ]
    await env.set_pace(0)  # both engines: the rate part measures the proxies, not the decode
    rates = [await _rate_case(session, env, sides, plan, stream) for stream in (True, False)]
    return {
        "warmup_errors": warmup_errors[:3],
        "latency": latency,
        "rates": rates,
        "pass": _ok(latency, rates, warmup_errors),
    }


async def p5_vs_litellm(workdir: Path, plan: P5Plan, install: Install) -> dict[str, Any]:
    if install.error is not None:
        return skipped(f"LiteLLM could not be installed: {install.error}", install)
    layout = Layout(replicas=1, slots=plan.slots, token_delay_ms=plan.token_delay_ms)
    async with AsyncExitStack() as running:
        env = await running.enter_async_context(BenchEnv(workdir / "p5", layout))
        stack, upstream = env.the_stack, env.direct_urls[0]
        try:
            proxy = await running.enter_async_context(
                LiteLLMProxy(install, workdir / "p5" / "litellm", upstream, MODEL_REF)
            )
        except (RuntimeError, AssertionError) as exc:
            return skipped(f"the LiteLLM proxy did not start: {exc}", install)
        sides = {
            "stack": Side(
                ChatTarget("stack", stack.url, stack.headers, MODEL_REF),
                ChatTarget("stack engine", await _engine_url(env), {}, MODEL_REF),
            ),
            "litellm": Side(
                ChatTarget("litellm", proxy.url, proxy.headers, MODEL_REF),
                ChatTarget("litellm engine", upstream, {}, MODEL_REF),
            ),
        }
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=TIMEOUT) as session:
            figures = await _measure(session, env, sides, plan)
    return {
        "id": "P5",
        "what": WHAT,
        "target": _target(),
        "peer": install.as_json(),
        "params": {**plan.as_json(), "pool": f"1 replica x {plan.slots} slots, both engines alike"},
        **figures,
    }
