"""P9 (BENCH.md), CPU cost: the CPU seconds each process used during P1's and P3's stack runs per token
delivered to the clients, and during P4's POST phase per admission answered (202 or 429).

P9 runs nothing of its own: P1, P3 and P4 measure the CPU of every role over their windows (bench/cpu.py)
and P9 gathers those figures into one verdict. Gated: P1 at its gated stream count, P3 paced and P3 at
saturation (≤ 25 µs per token, summed over gateway, pool manager and Redis), and every P4 case (≤ 150 µs
per answer, summed over gateway, scheduler and Redis). P1's smaller stream counts are information: a
stream or two over a few seconds weigh the stack's idle work (health checks, heartbeats) by too few
tokens. P2's CPU per short task (its waves of 2-token tasks, summed over every service a task touches)
is information too: what admission, dispatch, start, relay and end cost together.
"""

from __future__ import annotations

import math
from typing import Any

from .cpu import ADMISSION_STACK, TARGET_US_PER_ADMISSION, TARGET_US_PER_TOKEN, TASK_STACK, TOKEN_STACK

# The order the per-process columns are printed in; roles not listed follow.
ROLES = ("gateway", "scheduler", "pool manager", "redis", "engines", "load generator")


def _token_case(name: str, cpu: dict[str, Any], gated: bool) -> dict[str, Any]:
    stack = cpu["stack"]
    value = stack["stack_us_per_unit"]
    return {
        "case": name,
        "gated": gated,
        "unit": "token delivered",
        **stack,
        "direct": cpu["direct"],
        "pass": _within(value, TARGET_US_PER_TOKEN) if gated else None,
    }


def _within(value: float | None, limit: float) -> bool:
    return value is not None and not math.isnan(value) and value <= limit


def p9_cost(benchmarks: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The P9 entry from the P1, P3 and P4 entries present (None when none of them ran)."""
    tokens: list[dict[str, Any]] = []
    admissions: list[dict[str, Any]] = []
    tasks: list[dict[str, Any]] = []
    for bench in benchmarks:
        if bench["id"] == "P1":
            for case in bench["cases"]:
                if "cpu" in case:
                    gated = case["streams"] == bench["target"]["streams"]
                    name = f"P1, {case['streams']} stream{'s' if case['streams'] > 1 else ''}"
                    tokens.append(_token_case(name, case["cpu"], gated))
        elif bench["id"] == "P2":
            tokens_each = bench["params"]["tokens_per_stream"]
            for case in bench["cases"]:
                if "cpu" in case:
                    tasks.append(
                        {
                            "case": f"P2, {case['concurrency']} concurrent, {tokens_each} tokens",
                            "gated": False,
                            "unit": "task (every token delivered)",
                            **case["cpu"]["stack"],
                            "direct": case["cpu"]["direct"],
                            "pass": None,
                        }
                    )
        elif bench["id"] == "P3":
            case = bench["cases"][0]
            if "cpu" in case:
                tokens.append(_token_case(f"P3 paced, {case['streams']} streams", case["cpu"], True))
            sat = bench["saturation"]
            if "cpu" in sat:
                tokens.append(_token_case(f"P3 saturation, {sat['streams']} streams", sat["cpu"], True))
        elif bench["id"] == "P4":
            for case in bench["cases"]:
                if "cpu" in case:
                    value = case["cpu"]["stack_us_per_unit"]
                    admissions.append(
                        {
                            "case": f"P4, {case['clients']} clients",
                            "gated": True,
                            "unit": "admission answered (202 or 429)",
                            **case["cpu"],
                            "pass": _within(value, TARGET_US_PER_ADMISSION),
                        }
                    )
    if not tokens and not admissions and not tasks:
        return None
    gated = [c for c in tokens + admissions if c["gated"]]
    return {
        "id": "P9",
        "what": "CPU cost",
        "target": {
            "us_per_token_max": TARGET_US_PER_TOKEN,
            "token_stack": list(TOKEN_STACK),
            "us_per_admission_max": TARGET_US_PER_ADMISSION,
            "admission_stack": list(ADMISSION_STACK),
            "task_stack": list(TASK_STACK),
        },
        "tokens": tokens,
        "admissions": admissions,
        "tasks": tasks,
        "pass": bool(gated) and all(c["pass"] for c in gated),
    }


def _us(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:,.1f}"


def _ordered(per: dict[str, float]) -> list[str]:
    return [r for r in ROLES if r in per] + sorted(r for r in per if r not in ROLES)


def _breakdown(case: dict[str, Any]) -> str:
    per = case["us_per_unit"]
    inside = ", ".join(f"{r} {_us(per[r])}" for r in case["stack"] if r in per)
    outside = ", ".join(f"{r} {_us(per[r])}" for r in _ordered(per) if r not in case["stack"])
    return f"{inside}; apart: {outside}" if outside else inside


def p9_rows(bench: dict[str, Any]) -> list[list[str]]:
    """The results table's rows: one per measured case."""
    goal = bench["target"]
    out = []
    for kind, unit, limit, stack in (
        ("tokens", "token", goal["us_per_token_max"], goal["token_stack"]),
        ("admissions", "admission", goal["us_per_admission_max"], goal["admission_stack"]),
        ("tasks", "task", None, goal.get("task_stack", [])),
    ):
        for case in bench.get(kind, []):
            target = f"≤ {limit:g} µs/{unit} ({' + '.join(stack)})" if case["gated"] else "(info)"
            measured = (
                f"{case['case']}: {_us(case['stack_us_per_unit'])} µs/{unit} over {case['units']:,} "
                f"({_breakdown(case)})"
            )
            verdict = "info" if case["pass"] is None else ("pass" if case["pass"] else "**fail**")
            out.append([bench["id"], f"CPU per {unit}", target, measured, verdict])
    return out


def p9_details(bench: dict[str, Any]) -> str:
    """Markdown under the table: µs of CPU per unit by process, and the direct side for context."""
    cases = bench["tokens"] + bench["admissions"] + bench.get("tasks", [])
    roles: list[str] = []
    for case in cases:
        roles += [r for r in _ordered(case["us_per_unit"]) if r not in roles and r != "direct engines"]
    lines = [
        "P9: µs of CPU per token delivered to the clients (P1, P3: the stack runs), per admission "
        "answered (P4: the POST phase) or per complete short task (P2), by process (`/proc/<pid>/stat` "
        "utime + stime; the gateway with its worker processes; engines = the processes the pool manager "
        "spawned; load generator = the benchmark's own process). Direct = the same load straight at "
        "standalone engines.",
        "",
        "| case | units | stack µs/unit | "
        + " | ".join(roles)
        + " | direct: engines | direct: load generator |",
        "|---|---|---|" + "---|" * len(roles) + "---|---|",
    ]
    for case in cases:
        per = case["us_per_unit"]
        cells = [_us(per.get(r)) for r in roles]
        direct = case.get("direct")
        if direct is None:
            extra = ["-", "-"]
        else:
            d = direct["us_per_unit"]
            extra = [_us(d.get("direct engines")), _us(d.get("load generator"))]
        lines.append(
            f"| {case['case']} | {case['units']:,} | {_us(case['stack_us_per_unit'])} | "
            + " | ".join(cells + extra)
            + " |"
        )
    return "\n".join(lines)
