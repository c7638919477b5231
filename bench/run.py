"""``make bench``: run P1, P2 and P3 on one system under test, then P4, P5, P6, P7 and P8 on stacks of
their own (each starts and stops what it needs); P9 (CPU cost) gathers the CPU accounting of P1, P3 and
P4. Write and print the results. Exits 1 after writing them when a benchmark marks itself ``fatal`` (P8:
a task failed or a reload did not complete)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from . import profile, report
from .cases import AB, Plan, Sides, bounded, p1_inter_token, p2_ttft, p3_throughput
from .env import MODEL_REF, BenchEnv, Layout
from .p4 import P4Plan, p4_admission
from .p5 import P5Plan, p5_vs_litellm
from .p6 import P6Plan, p6_estimates
from .p7 import P7Plan, p7_real_engine
from .p8 import P8Plan, p8_reload
from .p9 import p9_cost
from .peer import install_litellm
from .traffic import DirectTarget, StackTarget, wave

ALL = ("P1", "P2", "P3", "P4", "P5", "P6", "P7", "P8", "P9")
FEEDS_P9 = {"P1", "P3", "P4"}  # P9 has no run of its own: it reads their CPU accounting

PROFILED = ("gateway", "pool manager", "scheduler")

QUICK = Plan(
    rounds=1,
    p3_rounds=1,
    p1_streams=(1, 32),
    p1_tokens=30,
    p2_sequential=5,
    p2_waves=1,
    p3_streams=64,
    p3_tokens=60,
    sat_streams=16,
    sat_tokens=100,
)
QUICK_P4 = P4Plan(clients=(4, 16), capacity=500, rejects=200, healthz_requests=500, time_limit_s=20)
QUICK_P5 = P5Plan(rounds=1, sequential=5, waves=1, rate_duration_s=3.0)
QUICK_P6 = P6Plan(duration_s=10, warmup_tasks=4, drain_timeout_s=20)
QUICK_P7 = P7Plan(rounds=1, max_tokens=48)
QUICK_P8 = P8Plan(rounds=1)


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--only", default=",".join(ALL), help="comma-separated benchmark ids")
    parser.add_argument("--rounds", type=int, default=None, help="stack/direct rounds per benchmark")
    parser.add_argument("--quick", action="store_true", help="a small smoke run of the harness")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (process logs)")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        metavar="MD",
        help="py-spy the gateway, pool manager and scheduler during P3 saturation and P4; write the top "
        "frames to this Markdown file (the sampler costs CPU: do not report that run's figures)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of benchmarks not run this time from the existing latest.json",
    )
    return parser.parse_args()


async def _warm_up(session: aiohttp.ClientSession, env: BenchEnv, sides: Sides) -> None:
    """Open connections and channels on both paths before anything is measured."""
    for target in (sides.stack, sides.direct):
        traces = await wave(session, target, 16, 5, 60)
        errors = [t.error for t in traces if t.error]
        if errors:
            raise RuntimeError(f"warm-up through {target.name} failed: {errors[0]}")
    await env.wait_idle()


async def _timed(bench_id: str, step: Any) -> dict[str, Any]:
    started = time.monotonic()
    print(f"{bench_id} …", file=sys.stderr, flush=True)
    result: dict[str, Any] = await bounded(step)
    result["duration_s"] = round(time.monotonic() - started, 1)
    print(f"{bench_id} done in {result['duration_s']} s", file=sys.stderr, flush=True)
    return result


async def _relay(workdir: Path, plan: Plan, only: set[str], layout: Layout) -> list[dict[str, Any]]:
    """P1-P3 on one stack, alternating with the direct engines."""
    benchmarks: list[dict[str, Any]] = []
    async with BenchEnv(workdir, layout) as env:
        stack = env.the_stack
        sides = Sides(StackTarget(stack.url, stack.headers, MODEL_REF), DirectTarget(env.direct_urls))
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            await _warm_up(session, env, sides)
            ab = AB(env, sides, plan.rounds)
            steps = {"P1": p1_inter_token, "P2": p2_ttft, "P3": p3_throughput}
            for bench_id, step in steps.items():
                if bench_id in only:
                    benchmarks.append(await _timed(bench_id, step(ab, session, plan)))
    return benchmarks


async def _p5(workdir: Path, plan: P5Plan) -> dict[str, Any]:
    """Install (or reuse) LiteLLM first: the install is not part of P5's own time bound."""
    print("P5: installing LiteLLM (or reusing its environment) …", file=sys.stderr, flush=True)
    install = await install_litellm()
    print(f"P5: LiteLLM {install.version or install.error} ({install.seconds:.0f} s)", file=sys.stderr)
    return await _timed("P5", p5_vs_litellm(workdir, plan, install))


async def bench(workdir: Path, plan: Plan, only: set[str], quick: bool) -> dict[str, Any]:
    layout = Layout()
    benchmarks: list[dict[str, Any]] = []
    if only & {"P1", "P2", "P3"}:
        benchmarks += await _relay(workdir / "relay", plan, only, layout)
    if "P4" in only:
        benchmarks.append(await _timed("P4", p4_admission(workdir, QUICK_P4 if quick else P4Plan())))
    if "P5" in only:
        benchmarks.append(await _p5(workdir, QUICK_P5 if quick else P5Plan()))
    if "P6" in only:
        benchmarks.append(await _timed("P6", p6_estimates(workdir, QUICK_P6 if quick else P6Plan())))
    if "P7" in only:
        plan7 = QUICK_P7 if quick else P7Plan()
        if plan.rounds != Plan().rounds and not quick:  # --rounds applies to P7's alternation too
            plan7 = P7Plan(**{**plan7.as_json(), "rounds": plan.rounds})
        benchmarks.append(await _timed("P7", p7_real_engine(workdir, plan7)))
    if "P8" in only:
        benchmarks.append(await _timed("P8", p8_reload(workdir, QUICK_P8 if quick else P8Plan())))
    p9 = p9_cost(benchmarks)
    if p9 is not None:
        benchmarks.append(p9)
    return {
        "machine": report.machine(),
        "layout": layout.as_json(),
        "plan": plan.as_json(),
        "direct_baseline": "one standalone mock engine per pool replica, same command line, "
        "streams spread round-robin",
        "benchmarks": benchmarks,
    }


def _merge(results: dict[str, Any]) -> None:
    """Add the previous run's rows for the benchmarks not run now, marked with that run's date."""
    path = report.RESULTS / "latest.json"
    if not path.exists():
        return
    previous = json.loads(path.read_text())
    ran = {b["id"] for b in results["benchmarks"]}
    for old in previous.get("benchmarks", []):
        if old["id"] not in ran:
            old.setdefault("from_run", previous.get("machine", {}).get("date"))
            results["benchmarks"].append(old)
    results["benchmarks"].sort(key=lambda b: ALL.index(b["id"]) if b["id"] in ALL else len(ALL))


def main() -> None:
    args = _args()
    plan = QUICK if args.quick else Plan()
    if args.rounds is not None:
        plan = Plan(**{**plan.as_json(), "rounds": args.rounds, "p3_rounds": args.rounds})
    only = {part.strip().upper() for part in args.only.split(",") if part.strip()}
    if "P9" in only:
        only |= FEEDS_P9
    workdir = Path(tempfile.mkdtemp(prefix="llorch-bench-"))
    if args.profile is not None:
        profile.ACTIVE = profile.Profiles(args.profile, workdir / "profiles", PROFILED)
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        results = uvloop.run(bench(workdir, plan, only, args.quick))
    except BaseException:
        print(f"benchmark failed; process logs are under {workdir}", file=sys.stderr)
        raise
    results["total_duration_s"] = round(time.monotonic() - started, 1)
    if profile.ACTIVE is not None:
        m = results["machine"]
        profile.ACTIVE.write(f"py-spy profiles, {m['date']}, {m['cpu_count']} CPUs")
        print(f"profiles written to {profile.ACTIVE.out}", file=sys.stderr)
    results["machine"]["loadavg_1m_at_start"] = round(load_before, 2)
    if args.merge:
        _merge(results)
    print(report.write(results))
    print(f"total {results['total_duration_s']} s", file=sys.stderr)
    fatal = [b["id"] for b in results["benchmarks"] if b.get("fatal") and "from_run" not in b]
    if fatal:
        print(f"FAILED: {', '.join(fatal)}; process logs are under {workdir}", file=sys.stderr)
        raise SystemExit(1)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
