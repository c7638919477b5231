"""The results table's rows and the notes under it for P4, P5, P6 and P8 (no stack-vs-direct ratio)."""

from __future__ import annotations

from typing import Any

from . import p6


def _ms2(dist: dict[str, Any]) -> str:
    p50, p99 = dist.get("p50_ms"), dist.get("p99_ms")
    if p50 is None or p99 is None:
        return "n/a"
    return f"{p50:.2f} / {p99:.2f} ms"


def p4_rows(bench: dict[str, Any]) -> list[list[str]]:
    """The results table's rows: one per client count."""
    goal = bench["target"]
    target = f"≥ {goal['answers_per_s_min']:,.0f}/s, p99 ≤ {goal['p99_ms_max']:g} ms"
    out = []
    for case in bench["cases"]:
        measured = (
            f"{case['clients']} clients: {case['answers_per_s']:,.0f} answers/s "
            f"(202 {case['admit_per_s']:,.0f}/s, 429 {case['reject_per_s'] or 0:,.0f}/s); "
            f"p50 / p99: 202 {_ms2(case['accepted'])}, 429 {_ms2(case['rejected'])}"
        )
        if not case["queue_full"]:
            measured += f"; queue not full after {case['accepted']['n']} admitted"
        if case["other_answers"]:
            measured += f"; {case['other_answers']} other answers ({case['first_error']})"
        out.append([bench["id"], bench["what"], target, measured, "pass" if case["pass"] else "**fail**"])
    return out


def p4_details(bench: dict[str, Any]) -> str:
    """Markdown under the table: the HTTP floor, the rate by queue depth and where the CPU went."""
    lines = [
        f"P4 ({bench['params']['pool']}, capacity {bench['params']['capacity']:,}, one fresh stack per "
        "client count): 202s in admission order cut into slices of queue depth, and CPU cores busy "
        "per process while POSTing. `GET /healthz` on the same gateway with the same clients is the "
        "floor of an HTTP round trip there.",
        "",
        "| clients | healthz p50 / p99 (rate) | 202 by queue depth: rate, p50 / p99 | CPU cores busy |",
        "|---|---|---|---|",
    ]
    for case in bench["cases"]:
        h = case["healthz"]
        depth = "; ".join(
            f"{b['depth_from']:,}-{b['depth_to']:,}: {b['per_s']:,.0f}/s, "
            f"{b['p50_ms']:.1f} / {b['p99_ms']:.1f}"
            for b in case["admit_by_depth"]
        )
        cpu = ", ".join(f"{name} {share:.2f}" for name, share in case["cpu_cores_busy"].items())
        lines.append(f"| {case['clients']} | {_ms2(h)} ({h['per_s']:,.0f}/s) | {depth} | {cpu} |")
    return "\n".join(lines)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def p6_rows(bench: dict[str, Any]) -> list[list[str]]:
    """The results table's rows: start-time error, then the on-time Brier score."""
    s, o = bench["start_error"], bench["on_time"]
    refused = sum(bench["refused"].values())
    counts = f"{bench['admitted']} admitted, {refused} refused (not scored)"
    start = (
        f"median abs. error {s['median_abs_error_ms']:.1f} ms = {_pct(s['rel_median_abs_error'])} of the "
        f"mean actual start {s['mean_actual_start_ms']:.1f} ms (mean abs. error {s['mean_abs_error_ms']:.1f} "
        f"ms = {_pct(s['rel_mean_abs_error'])}); {s['n']} tasks, {counts}"
    )
    brier = (
        f"Brier {o['brier']:.3f} over {o['n']} tasks, {_pct(o['on_time_rate'])} on time "
        f"(a constant forecast of that rate: {o['brier_of_constant_base_rate']:.3f})"
    )
    rel_ok = s["rel_median_abs_error"] is not None and s["rel_median_abs_error"] <= p6.TARGET_REL_ERROR
    brier_ok = o["brier"] is not None and o["brier"] <= p6.TARGET_BRIER
    return [
        [
            bench["id"],
            "estimate quality: predicted_start_ms",
            "median abs. error ≤ 20 % of the mean actual start",
            start,
            "pass" if rel_ok else "**fail**",
        ],
        [
            bench["id"],
            "estimate quality: on_time_probability",
            "Brier ≤ 0.1",
            brier,
            "pass" if brier_ok else "**fail**",
        ],
    ]


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {what}" for what, n in counts.items()) or "none"


def p6_details(bench: dict[str, Any]) -> str:
    """Markdown under the table: load, refusals, start error by class and calibration."""
    p = bench["params"]
    head = (
        f"P6 ({p['pool']}): Poisson arrivals at {p['arrivals_per_s']:.2f}/s ({p['load']:.0%} of the nominal "
        f"{p['nominal_capacity_per_s']:.2f}/s) for {p['duration_s']:g} s, utilisation "
        f"{bench['utilisation']:.0%}; {bench['submitted']} submitted, refused: {_counts(bench['refused'])}; "
        f"admitted but ended without `end`: {_counts(bench['ended_without_end'])}. Actual start = 202 → "
        "dispatch `metrics` at the client; on time = `end` before 202 + `deadline_ms`."
    )
    lines = [
        head,
        "",
        "| class | n | median / mean / p90 abs. error (ms) | mean actual start (ms) |",
        "|---|---|---|---|",
    ]
    for name, s in bench["start_error_by_priority"].items():
        lines.append(
            f"| {name} | {s['n']} | {s['median_abs_error_ms']} / {s['mean_abs_error_ms']} / "
            f"{s['p90_abs_error_ms']} | {s['mean_actual_start_ms']} |"
        )
    lines += ["", "| on_time_probability bin | tasks | mean p | on-time rate |", "|---|---|---|---|"]
    for b in bench["on_time"]["calibration"]:
        lines.append(
            f"| {b['p_from']:.1f}-{b['p_to']:.1f} | {b['n']} | {b['mean_p']} | {b['on_time_rate']} |"
        )
    return "\n".join(lines)


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f} ms"


def _spread(spread: dict[str, float | None], spec: str = ".2f") -> str:
    value, low, high = (spread[k] for k in ("value", "min", "max"))
    if value is None:
        return "n/a"
    if low is None or high is None or low == high:
        return format(value, spec)
    return f"{value:{spec}} [{low:{spec}} … {high:{spec}}]"


def _p5_errors(counts: dict[str, int], first: list[str]) -> str:
    total = sum(counts.values())
    if not total:
        return ""
    where = ", ".join(f"{n} {side}" for side, n in counts.items() if n)
    return f"; **{total} errors ({where}): {first[0] if first else '?'}**"


def _p5_latency_row(bench: dict[str, Any], case: dict[str, Any]) -> list[str]:
    goal = bench["target"]["added_p50_ratio_max"]
    parts, ok = [], True
    for metric in ("ttft", "total"):
        m = case[metric]
        ratio = m["ratio_p50"]
        parts.append(
            f"{'TTFT' if metric == 'ttft' else 'total'} added p50 ours "
            f"{_signed(m['stack_added_p50_ms']['value'])} vs LiteLLM "
            f"{_signed(m['litellm_added_p50_ms']['value'])}, ratio {_spread(ratio, '.3f')} "
            f"(p99 {_signed(m['stack_added_p99_ms']['value'])} vs "
            f"{_signed(m['litellm_added_p99_ms']['value'])})"
        )
        ok = ok and ratio["value"] is not None and ratio["value"] <= goal
    ok = ok and not any(case["errors"].values())
    streams = case["concurrency"]
    measured = f"{streams} stream{'s' if streams > 1 else ''}: " + "; ".join(parts)
    measured += _p5_errors(case["errors"], case["first_errors"])
    target = f"added p50 ours / LiteLLM ≤ {goal:g}"
    return [bench["id"], f"{bench['what']}: added latency", target, measured, "pass" if ok else "**fail**"]


def _p5_rate_row(bench: dict[str, Any], case: dict[str, Any]) -> list[str]:
    goal = bench["target"]["rate_ratio_min"]
    ratio = case["ratio"]
    mode = "streamed" if case["stream"] else "non-streamed"
    measured = (
        f"{mode}, {case['clients']} clients, {case['max_tokens']} tokens: ours "
        f"{case['stack']['per_s']:,.0f}/s vs LiteLLM {case['litellm']['per_s']:,.0f}/s "
        f"(engine alone {case['direct']['per_s']:,.0f}/s), ratio {_spread(ratio)}"
    )
    errors = {name: case[name]["errors"] for name in ("stack", "litellm", "direct")}
    measured += _p5_errors(errors, case["first_errors"])
    ok = ratio["value"] is not None and ratio["value"] >= goal and not any(errors.values())
    target = f"ours / LiteLLM ≥ {goal:g}"
    return [bench["id"], f"{bench['what']}: max requests/s", target, measured, "pass" if ok else "**fail**"]


def p5_rows(bench: dict[str, Any]) -> list[list[str]]:
    """The results table's rows: added latency at each concurrency, then max requests/s per mode."""
    if bench.get("skipped"):
        goal = bench["target"]
        target = (
            f"added p50 ratio ≤ {goal['added_p50_ratio_max']:g}, max RPS ratio ≥ {goal['rate_ratio_min']:g}"
        )
        return [[bench["id"], bench["what"], target, f"skipped: {bench['skipped']}", "skipped"]]
    rows = [_p5_latency_row(bench, case) for case in bench["latency"]]
    rows += [_p5_rate_row(bench, case) for case in bench["rates"]]
    if bench["warmup_errors"]:
        rows.append([bench["id"], "warm-up", "no errors", f"**{bench['warmup_errors'][0]}**", "**fail**"])
    return rows


def p5_details(bench: dict[str, Any]) -> str:
    """Markdown under the table: the peer, the settings and the absolute figures of each side."""
    peer = bench["peer"]
    if bench.get("skipped"):
        return f"P5 skipped (LiteLLM spec `{peer['spec']}`, environment {peer['venv']}): see the table."
    p = bench["params"]
    lines = [
        f"P5: LiteLLM {peer['version']} (`{peer['spec']}`, its own venv; one worker, master key, no "
        f"database, `LITELLM_LOG=ERROR`) vs the stack, each in front of its own mock engine ({p['pool']}; "
        f"{p['token_delay_ms']:g} ms/token for latency, {p['latency_tokens']} tokens; unpaced for the "
        f"rate). {p['rounds']} round(s), the side that goes first alternating; rate runs "
        f"{p['rate_duration_s']:g} s each. Added = through the proxy minus straight at its engine.",
        "",
        "| figure | ours p50 / p99 | its engine | LiteLLM p50 / p99 | its engine | samples ours / LiteLLM |",
        "|---|---|---|---|---|---|",
    ]
    for case in bench["latency"]:
        for metric, name in (("ttft", "TTFT"), ("total", "total time")):
            m = case[metric]
            cells = [_ms2(m[key]) for key in ("stack", "stack_direct", "litellm", "litellm_direct")]
            label = f"{name}, {case['concurrency']} stream(s)"
            lines.append(f"| {label} | {' | '.join(cells)} | {m['stack']['n']} / {m['litellm']['n']} |")
    for case in bench["rates"]:
        mode = "streamed" if case["stream"] else "non-streamed"
        cells = [
            f"{_ms2(case[name]['latency'])} ({case[name]['per_s']:,.0f}/s)" for name in ("stack", "litellm")
        ]
        direct = f"{_ms2(case['direct']['latency'])} ({case['direct']['per_s']:,.0f}/s)"
        lines.append(
            f"| request latency, {mode} rate run | {cells[0]} | {direct} | {cells[1]} | {direct} "
            f"| {case['stack']['answers']} / {case['litellm']['answers']} |"
        )
    return "\n".join(lines)


def _s(values: list[float]) -> str:
    return f"{', '.join(f'{v:.1f}' for v in values)} s" if values else "none"


def p8_rows(bench: dict[str, Any]) -> list[list[str]]:
    """The results table's rows: the swap times, then the tasks during the whole window."""
    goal, reloads = bench["target"], bench["reloads"]
    swaps = [r["swap_s"] for r in reloads]
    first = [r["swap_s"] for r in reloads if r["first_onto_model"]]
    later = [r["swap_s"] for r in reloads if not r["first_onto_model"]]
    swap_ok = len(reloads) == 2 * bench["params"]["rounds"] and all(
        r["status"] == 200 and r["swap_s"] < goal["swap_s_max"] for r in reloads
    )
    measured = (
        f"{len(reloads)} reloads `?wait=true` (small → small-v2 → small per round): max "
        f"{max(swaps, default=float('nan')):.1f} s; first onto each model (catalog verifies it on the way) "
        f"{_s(first)}; later {_s(later)}"
    )
    refused = [r for r in reloads if r["status"] != 200]
    if refused:
        measured += f"; **{len(refused)} not 200: {refused[0]['error']}**"
    after = sum(r["old_engine_tasks_ended_after_swap"] for r in reloads)
    failed = sum(bench["failed"].values()) + bench["unfinished"]
    probes = [r["new_model_task_at_once"] for r in reloads if r["new_model_task_at_once"] is not None]
    probes_failed = [p["outcome"] for p in probes if p["outcome"] != "end"]
    tasks = (
        f"{bench['completed']} tasks completed over {bench['window_s']:g} s, {failed} failed "
        f"({_counts(bench['failed'])}, {bench['unfinished']} never ended); {after} were running on the "
        f"old engine and ended after the swap; small-v2 tasks submitted the moment the reload answered: "
        f"{len(probes) - len(probes_failed)} of {len(probes)} ended `end`"
    )
    if probes_failed:
        tasks += f" (**{', '.join(probes_failed)}**)"
    return [
        [
            bench["id"],
            f"{bench['what']}: swap time",
            f"< {goal['swap_s_max']:g} s",
            measured,
            "pass" if swap_ok else "**fail**",
        ],
        [
            bench["id"],
            f"{bench['what']}: failed tasks",
            "0 during the window",
            tasks,
            "pass" if not bench["problems"] else "**fail**",
        ],
    ]


def p8_details(bench: dict[str, Any]) -> str:
    """Markdown under the table: the setup and one line per reload."""
    p = bench["params"]
    lines = [
        f"P8 ({p['pools']}; model file `{p['model_file']}`, small-v2 = a copy with bytes appended): "
        f"{p['clients']} closed-loop clients stream tasks of {p['min_tokens']}-{p['max_tokens']} tokens for "
        f"small without a pause; swap time = wall time of `POST /v1/pools/{{id}}/reload?wait=true`. Task "
        f"time p50 / p99 {_ms2(bench['task_time'])} (queueing included while one pool serves small-v2).",
        "",
        "| round | to | answer | swap (s) | first onto it | health shows it (ms after the 200) | "
        "small-v2 task submitted at once | tasks ended during | old-engine tasks ended after the swap | "
        "replicas after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in bench["reloads"]:
        probe = r["new_model_task_at_once"]
        shown = r["health_shows_it_after_ms"]
        lines.append(
            f"| {r['round']} | {r['to']} | {r['status']} | {r['swap_s']:.2f} | "
            f"{'yes' if r['first_onto_model'] else 'no'} | {'never' if shown is None else f'{shown:.0f}'} | "
            f"{'-' if probe is None else probe['outcome']} | {r['tasks_ended_during']} | "
            f"{r['old_engine_tasks_ended_after_swap']} | {', '.join(r['replicas']['after'])} |"
        )
    lines.append(f"\nSmall tasks that ran on a small-v2 engine: {bench['small_tasks_on_small_v2_engines']}.")
    lines += [f"\n**{problem}**" for problem in bench["problems"]]
    return "\n".join(lines)
