"""``bench/results/latest.json`` and ``latest.md``: machine, parameters, figures and verdicts."""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .p7 import p7_details, p7_rows
from .p9 import p9_details, p9_rows
from .tables import (
    p4_details,
    p4_rows,
    p5_details,
    p5_rows,
    p6_details,
    p6_rows,
    p8_details,
    p8_rows,
)

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
    }


def _clean(value: Any) -> Any:
    """NaN (no sample, no steady window) is written as null to keep the JSON strict."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _num(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _ms(spread: dict[str, float | None]) -> str:
    return (
        f"{_num(spread['value'], '+.2f')} ms [{_num(spread['min'], '+.2f')} … {_num(spread['max'], '+.2f')}]"
    )


def _ratio(spread: dict[str, float | None]) -> str:
    return f"{_num(spread['value'], '.3f')} [{_num(spread['min'], '.3f')} … {_num(spread['max'], '.3f')}]"


def _verdict(ok: bool) -> str:
    return "pass" if ok else "**fail**"


def _latency_rows(bench: dict[str, Any], key: str) -> list[list[str]]:
    goal = bench["target"]
    p50, p99 = goal["added_p50_ms_max"], goal["added_p99_ms_max"]
    target = f"added p50 ≤ {p50:g} ms, p99 ≤ {p99:g} ms at {goal[key]} {key}"
    rows = []
    for case in bench["cases"]:
        gated = case[key] == goal[key]
        measured = f"{key} {case[key]}: p50 {_ms(case['added_p50_ms'])}, p99 {_ms(case['added_p99_ms'])}"
        if case["errors"]["stack"] or case["errors"]["direct"]:
            measured += f" ({case['errors']['stack']} stack / {case['errors']['direct']} direct errors)"
        rows.append(
            [
                bench["id"],
                bench["what"],
                target if gated else "(info)",
                measured,
                _verdict(bench["pass"]) if gated else "info",
            ]
        )
    return rows


def rows(results: dict[str, Any]) -> list[list[str]]:
    table: list[list[str]] = []
    by_id = {b["id"]: b for b in results["benchmarks"]}
    if "P1" in by_id:
        table += _latency_rows(by_id["P1"], "streams")
    if "P2" in by_id:
        table += _latency_rows(by_id["P2"], "concurrency")
    if "P3" in by_id:
        p3 = by_id["P3"]
        case = p3["cases"][0]
        kind = case["headline_ratio"]
        measured = (
            f"{case['streams']} streams: {kind} ratio {_ratio(case[kind]['ratio'])}, "
            f"added inter-token p99 {_ms(case['added_p99_ms'])}"
        )
        if case["errors"]["stack"] or case["errors"]["direct"]:
            measured += (
                f"; {case['errors']['stack']} stack / {case['errors']['direct']} direct streams cut short"
            )
        table.append(
            [p3["id"], p3["what"], "≥ 95 % of direct, added p99 ≤ 10 ms", measured, _verdict(p3["pass"])]
        )
        sat = p3["saturation"]
        best_stack = _num(max(sat["stack_tokens_per_s"]), ",.0f")
        best_direct = _num(max(sat["direct_tokens_per_s"]), ",.0f")
        table.append(
            [
                p3["id"],
                "saturation (pace 0)",
                "(info)",
                f"{sat['streams']} streams: stack {best_stack} tok/s vs direct {best_direct} tok/s "
                f"(best round), ratio {_ratio(sat['ratio'])}",
                "info",
            ]
        )
    if "P4" in by_id:
        table += p4_rows(by_id["P4"])
    if "P5" in by_id:
        table += p5_rows(by_id["P5"])
    if "P6" in by_id:
        table += p6_rows(by_id["P6"])
    if "P7" in by_id:
        table += p7_rows(by_id["P7"])
    if "P8" in by_id:
        table += p8_rows(by_id["P8"])
    if "P9" in by_id:
        table += p9_rows(by_id["P9"])
    return table


def absolute_rows(results: dict[str, Any]) -> list[list[str]]:
    out = []
    for bench in results["benchmarks"]:
        if bench["id"] not in ("P1", "P2", "P3"):
            continue  # no direct side: their figures are in their own notes
        for case in bench["cases"]:
            label = ", ".join(f"{k} {case[k]}" for k in ("streams", "concurrency") if k in case)
            kind = "TTFT" if bench["id"] == "P2" else "inter-token gap"
            s, d = case["stack"], case["direct"]
            out.append(
                [
                    bench["id"],
                    f"{kind}, {label}",
                    f"{_num(s['p50_ms'], '.2f')} / {_num(s['p99_ms'], '.2f')}",
                    f"{_num(d['p50_ms'], '.2f')} / {_num(d['p99_ms'], '.2f')}",
                    str(s["n"]),
                ]
            )
            if bench["id"] == "P3":
                for kind in ("wall", "steady"):
                    st = case[kind]["stack_tokens_per_s"]
                    dt = case[kind]["direct_tokens_per_s"]
                    out.append(
                        [
                            bench["id"],
                            f"tokens/s ({kind}), per round",
                            ", ".join(_num(v, ",.0f") for v in st),
                            ", ".join(_num(v, ",.0f") for v in dt),
                            "-",
                        ]
                    )
    return out


def _table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)


def markdown(results: dict[str, Any]) -> str:
    m, plan = results["machine"], results["plan"]
    head = (
        f"Benchmarks, {m['date']}: {m['cpu_count']} CPUs, Python {m['python']}, {m['platform']}. "
        f"Load average (1 min) {m.get('loadavg_1m_at_start', 'n/a')} at start, "
        f"{m['loadavg_1m_at_end']} at end. Added = stack minus direct, pooled over "
        f"{plan['rounds']} alternating stack/direct rounds ({plan['p3_rounds']} for P3) "
        "[min … max of the per-round figures] (P1-P3, P7). P4, P6 and P8 have no direct side: their figures "
        "are absolute, for this machine; P5 sets the stack beside LiteLLM (its note below); P9 is CPU "
        "time per unit of work, which does not depend on how many cores the machine has."
    )
    main = _table(["id", "what", "target", "measured", "verdict"], rows(results))
    by_id = {b["id"]: b for b in results["benchmarks"]}
    absolute = _table(
        ["id", "figure (ms unless noted)", "stack p50 / p99", "direct p50 / p99", "samples"],
        absolute_rows(results),
    )
    notes = [
        f(by_id[key])
        for key, f in (
            ("P4", p4_details),
            ("P5", p5_details),
            ("P6", p6_details),
            ("P7", p7_details),
            ("P8", p8_details),
            ("P9", p9_details),
        )
        if key in by_id
    ]
    earlier = sorted(
        {f"{b['id']} from the run of {b['from_run']}" for b in by_id.values() if "from_run" in b}
    )
    if earlier:
        head += f" Merged from an earlier run: {', '.join(earlier)}."
    text = f"{head}\n\n{main}\n"
    if len(absolute.splitlines()) > 2:
        text += f"\nAbsolute numbers:\n\n{absolute}\n"
    return text + "".join(f"\n{note}\n" for note in notes)


def write(results: dict[str, Any]) -> str:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(_clean(results), indent=2, allow_nan=False) + "\n")
    text = markdown(_clean(results))
    (RESULTS / "latest.md").write_text(text)
    return text
