"""The determinism suite (SPEC §9): identical seeded tasks on two replicas of one set give identical streams.

For each seed of ``tests/determinism/seeds.txt``: submit two identical tasks at the same time (prompt
``Seed <seed>: continue the story in one paragraph.``, ``seed``, ``determinism: strict``,
``max_tokens: 64``), read both streams, and take each task's replica from its dispatch ``metrics`` frame.
If both landed on one replica, submit the pair again, up to 3 times. Then compare the ordered ``t`` texts
byte for byte (UTF-8), and ``tokens_out`` and ``finish_reason`` of the ``end`` frames. Pairs run one
after the other, so the set's two slots are both busy and nothing else queues.

Latency is taken from fields the ``end`` frame carries, not from arrival times in this process:
``first_token_ms`` (admission → first token) and ``decode_ms`` (dispatch → ``end``), both measured by
the stack. The report gives p50/p95 (nearest rank) per replica and per device (from ``GET /v1/pools``).

A mismatch writes ``<out>/determinism-diff-<seed>.json`` (the first differing index and both streams)
and, when the gateway serves ``POST /v1/artifacts``, stores the same content as a ``diff`` artifact.
``<out>/determinism-summary.json`` holds the whole report. Exit status: 0 all seeds identical, 1 a
mismatch or a seed that could not be run on two replicas, 2 the suite could not run at all.

Run it against a stack it starts (``--config``, via :mod:`gates.stack`) or one already running
(``--base-url``, token in ``LLORCH_API_TOKEN``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

from .client import (
    ApiClient,
    ApiError,
    Frame,
    GateError,
    JsonObject,
    dispatch_frame,
    event_order_problems,
    get_list,
    get_str,
    poll_until,
)
from .stack import DEFAULT_BIND, READY_TIMEOUT_S, Stack, StackError

REPO = Path(__file__).resolve().parents[1]
SEEDS_FILE = REPO / "tests" / "determinism" / "seeds.txt"
MAX_TOKENS = 64
RESUBMITS = 3
TASK_TIMEOUT_S = 300.0
IDLE_TIMEOUT_S = 60.0


def prompt_for(seed: int) -> str:
    return f"Seed {seed}: continue the story in one paragraph."


def read_seeds(path: Path = SEEDS_FILE, count: int | None = None) -> list[int]:
    seeds = [int(line) for line in path.read_text(encoding="ascii").split()]
    return seeds if count is None else seeds[:count]


# ---- one task's stream ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One task's stream, reduced to what the suite compares and reports."""

    task_id: str
    replica_id: str
    pool_id: str
    tokens: tuple[str, ...]
    terminal: str  # "end" or "error"
    final: JsonObject  # the terminal frame's data
    problems: tuple[str, ...] = ()  # SPEC §3 order problems, if any

    @property
    def tokens_out(self) -> int | None:
        value = self.final.get("tokens_out")
        return value if isinstance(value, int) else None

    @property
    def finish_reason(self) -> str | None:
        value = self.final.get("finish_reason")
        return value if isinstance(value, str) else None

    def latency(self, key: str) -> int | None:
        value = self.final.get(key) if self.terminal == "end" else None
        return value if isinstance(value, int) else None

    def as_json(self) -> JsonObject:
        return {
            "task_id": self.task_id,
            "replica_id": self.replica_id,
            "pool_id": self.pool_id,
            "tokens": list(self.tokens),
            "terminal": self.terminal,
            "final": self.final,
            "problems": list(self.problems),
        }


def run_from_frames(task_id: str, frames: Sequence[Frame]) -> Run:
    """Reduce a task's frames; the replica is the one its dispatch ``metrics`` frame names."""
    dispatch = dispatch_frame(frames)
    last = frames[-1] if frames else None
    return Run(
        task_id=task_id,
        replica_id=get_str(dispatch.data, "replica_id") if dispatch else "",
        pool_id=get_str(dispatch.data, "pool_id") if dispatch else "",
        tokens=tuple(get_str(f.data, "t") for f in frames if f.event == "token"),
        terminal=last.event if last else "",
        final=last.data if last else {},
        problems=tuple(event_order_problems(frames)),
    )


# ---- comparison and diff -------------------------------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    """The first difference between two runs: ``what`` differs, at token ``index`` where that applies."""

    what: str  # tokens | tokens_out | finish_reason | terminal | event_order
    index: int | None
    detail: str


def first_difference(a: Sequence[str], b: Sequence[str]) -> int | None:
    """The first index where the token texts differ byte for byte (UTF-8), or where one stream ends
    before the other; ``None`` when they are identical."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x.encode("utf-8", "surrogatepass") != y.encode("utf-8", "surrogatepass"):
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def compare(a: Run, b: Run) -> Mismatch | None:
    """``None`` when both runs ended with ``end``, are well formed, and match byte for byte."""
    for run in (a, b):
        if run.terminal != "end":
            code = run.final.get("code")
            return Mismatch(
                "terminal", None, f"{run.task_id} on {run.replica_id} ended with {run.terminal} {code}"
            )
        if run.problems:
            return Mismatch("event_order", None, f"{run.task_id}: {'; '.join(run.problems)}")
    index = first_difference(a.tokens, b.tokens)
    if index is not None:
        left = a.tokens[index] if index < len(a.tokens) else "<end of stream>"
        right = b.tokens[index] if index < len(b.tokens) else "<end of stream>"
        return Mismatch("tokens", index, f"token {index}: {left!r} vs {right!r}")
    if a.tokens_out != b.tokens_out:
        return Mismatch("tokens_out", None, f"tokens_out {a.tokens_out} vs {b.tokens_out}")
    if a.finish_reason != b.finish_reason:
        return Mismatch("finish_reason", None, f"finish_reason {a.finish_reason!r} vs {b.finish_reason!r}")
    return None


def diff_content(seed: int, mismatch: Mismatch, a: Run, b: Run) -> JsonObject:
    return {
        "seed": seed,
        "prompt": prompt_for(seed),
        "what": mismatch.what,
        "first_differing_index": mismatch.index,
        "detail": mismatch.detail,
        "a": a.as_json(),
        "b": b.as_json(),
    }


def write_diff(out_dir: Path, seed: int, mismatch: Mismatch, a: Run, b: Run) -> Path:
    """Write ``<out_dir>/determinism-diff-<seed>.json``; returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"determinism-diff-{seed}.json"
    content = diff_content(seed, mismatch, a, b)
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


# ---- the run -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """The replica set under test: its model and member pools, and each pool's devices."""

    model_ref: str
    pool_ids: tuple[str, ...]
    devices: Mapping[str, str]  # pool_id -> "cpu" | "0" | "0,1"


@dataclass
class SeedResult:
    seed: int
    runs: tuple[Run, Run] | None = None
    attempts: int = 0
    mismatch: Mismatch | None = None
    diff_path: str | None = None
    artifact_id: str | None = None

    @property
    def passed(self) -> bool:
        return self.runs is not None and self.mismatch is None


@dataclass
class Report:
    target: Target
    results: list[SeedResult] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.results) and all(r.passed for r in self.results)


def _devices_label(value: object) -> str:
    if isinstance(value, list):
        return ",".join(str(d) for d in value) or "?"
    return str(value)


async def discover(client: ApiClient, model_ref: str | None) -> Target:
    """The set to test: the one serving ``model_ref``, or the only model the stack serves.

    Membership comes from ``GET /v1/replicasets`` when the gateway has it, else from the pools that
    serve the model (``GET /v1/pools``); devices always from ``GET /v1/pools``.
    """
    pools = await client.pools()
    devices = {get_str(p, "pool_id"): _devices_label(p.get("devices")) for p in pools}
    try:
        sets = await client.replicasets()
    except ApiError as exc:
        if exc.status not in (404, 405):
            raise
        sets = []
    if sets:
        chosen = [s for s in sets if model_ref in (None, s.get("model_id"))]
        if len(chosen) != 1:
            models = sorted({str(s.get("model_id")) for s in sets})
            raise GateError(f"{len(chosen)} replica sets match; pass --model-ref (served: {models})")
        members = tuple(
            str(p.get("pool_id", p.get("id"))) if isinstance(p, dict) else str(p)
            for p in get_list(chosen[0], "pools")
        )
        return Target(get_str(chosen[0], "model_id"), members, devices)
    models = sorted({get_str(p, "model_ref") for p in pools})
    if model_ref is None:
        if len(models) != 1:
            raise GateError(f"the stack serves {models}; pass --model-ref")
        model_ref = models[0]
    members = tuple(get_str(p, "pool_id") for p in pools if p.get("model_ref") == model_ref)
    if not members:
        raise GateError(f"no pool serves {model_ref!r} (served: {models})")
    return Target(model_ref, members, devices)


async def _member_pools(client: ApiClient, target: Target) -> list[JsonObject]:
    return [p for p in await client.pools() if p.get("pool_id") in target.pool_ids]


async def discover_ready(client: ApiClient, model_ref: str | None, want: int, timeout_s: float) -> Target:
    """Wait until the set has ``want`` Ready replicas, and return it. ``/readyz`` is 200 as soon as
    one pool is Ready, and a pool joins the set's listing only once it has registered, so the set is
    discovered again on every poll."""
    found: list[Target] = []
    last_error = ""

    async def enough() -> bool:
        nonlocal last_error
        try:
            target = await discover(client, model_ref)
        except GateError as exc:
            last_error = str(exc)
            return False
        ready = sum(
            1
            for p in await _member_pools(client, target)
            if p.get("ready") is True
            for r in get_list(p, "replicas")
            if isinstance(r, dict) and r.get("state") == "Ready"
        )
        last_error = f"{ready} Ready replicas in pools {list(target.pool_ids)}"
        found[:] = [target]
        return ready >= want

    try:
        await poll_until(enough, timeout_s, f"{want} Ready replicas of one set", 0.25)
    except GateError as exc:
        raise GateError(f"{exc} (last seen: {last_error})") from None
    return found[0]


async def wait_idle(client: ApiClient, target: Target, timeout_s: float = IDLE_TIMEOUT_S) -> None:
    """Wait until no task runs in the set, so that the next pair finds both slots free."""

    async def idle() -> bool:
        for pool in await _member_pools(client, target):
            metrics = pool.get("metrics")
            if isinstance(metrics, dict) and metrics.get("tasks_running") not in (0, None):
                return False
        return True

    await poll_until(idle, timeout_s, "the set's running tasks to finish", 0.02)


async def run_task(client: ApiClient, body: Mapping[str, object], timeout_s: float) -> Run:
    submitted = await client.submit(body)
    if submitted.status != 202:
        raise GateError(f"POST /v1/tasks answered {submitted.status}: {submitted.body}")
    task_id = submitted.task_id
    return run_from_frames(task_id, await client.stream(task_id, timeout_s))


async def run_seed(
    client: ApiClient, target: Target, seed: int, run_id: str, timeout_s: float = TASK_TIMEOUT_S
) -> SeedResult:
    """Run one seed's pair (resubmitted while both tasks land on one replica) and compare it."""
    result = SeedResult(seed)
    body: dict[str, object] = {
        "model_ref": target.model_ref,
        "prompt": prompt_for(seed),
        "seed": seed,
        "determinism": "strict",
        "max_tokens": MAX_TOKENS,
    }
    for attempt in range(1 + RESUBMITS):
        result.attempts = attempt + 1
        await wait_idle(client, target)
        a, b = await asyncio.gather(
            *(
                run_task(client, {**body, "task_id": f"det-{run_id}-{seed}-{attempt}-{side}"}, timeout_s)
                for side in "ab"
            )
        )
        if a.replica_id and b.replica_id and a.replica_id != b.replica_id:
            result.runs = (a, b)
            result.mismatch = compare(a, b)
            return result
        if not (a.replica_id and b.replica_id):  # one ended before dispatch: nothing to resubmit for
            result.runs = (a, b)
            result.mismatch = compare(a, b) or Mismatch("terminal", None, "a task was never dispatched")
            return result
    result.mismatch = Mismatch("placement", None, f"both tasks ran on one replica {result.attempts} times")
    return result


async def _store_diff(client: ApiClient, result: SeedResult, out_dir: Path) -> None:
    if result.mismatch is None or result.runs is None:
        return
    a, b = result.runs
    result.diff_path = str(write_diff(out_dir, result.seed, result.mismatch, a, b))
    content = diff_content(result.seed, result.mismatch, a, b)
    status, answer = await client.post_artifact("diff", content, ["determinism", f"seed-{result.seed}"])
    if status in (200, 201) and isinstance(answer.get("id"), str):
        result.artifact_id = str(answer["id"])


async def run_suite(
    client: ApiClient,
    seeds: Sequence[int],
    out_dir: Path,
    model_ref: str | None = None,
    ready_timeout_s: float = READY_TIMEOUT_S,
    task_timeout_s: float = TASK_TIMEOUT_S,
    progress: bool = True,
) -> Report:
    target = await discover_ready(client, model_ref, 2, ready_timeout_s)
    report = Report(target)
    run_id = secrets.token_hex(4)
    started = time.monotonic()
    for n, seed in enumerate(seeds, 1):
        result = await run_seed(client, target, seed, run_id, task_timeout_s)
        await _store_diff(client, result, out_dir)
        report.results.append(result)
        if progress:
            verdict = (
                "ok" if result.passed else f"MISMATCH ({result.mismatch.detail if result.mismatch else ''})"
            )
            replicas = " / ".join(r.replica_id for r in result.runs) if result.runs else "-"
            print(f"[{n:>2}/{len(seeds)}] seed {seed}: {verdict}  [{replicas}]", flush=True)
    report.wall_s = time.monotonic() - started
    return report


# ---- the report ----------------------------------------------------------------------------------


def percentile(values: Sequence[int], q: float) -> int | None:
    """Nearest-rank percentile (``q`` in 0..100); ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


@dataclass(frozen=True)
class LatencyRow:
    """p50/p95 in ms of ``end.first_token_ms`` and ``end.decode_ms`` for one replica or device."""

    scope: str  # replica | device
    name: str
    n: int
    first_token_ms_p50: int | None
    first_token_ms_p95: int | None
    decode_ms_p50: int | None
    decode_ms_p95: int | None


def latency_rows(report: Report) -> list[LatencyRow]:
    """Per replica and per device, over the compared runs that ended with ``end``."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for result in report.results:
        for run in result.runs or ():
            if run.terminal != "end":
                continue
            groups.setdefault(("replica", run.replica_id), []).append(run)
            device = report.target.devices.get(run.pool_id, "?")
            groups.setdefault(("device", device), []).append(run)
    rows: list[LatencyRow] = []
    for (scope, name), runs in sorted(groups.items(), key=lambda item: (item[0][0] != "replica", item[0])):
        first = [v for v in (r.latency("first_token_ms") for r in runs) if v is not None]
        decode = [v for v in (r.latency("decode_ms") for r in runs) if v is not None]
        rows.append(
            LatencyRow(
                scope,
                name,
                len(runs),
                percentile(first, 50),
                percentile(first, 95),
                percentile(decode, 50),
                percentile(decode, 95),
            )
        )
    return rows


LATENCY_SOURCE = "end frame: first_token_ms = admission -> first token, decode_ms = dispatch -> end"


def summary(report: Report) -> JsonObject:
    failed = [r for r in report.results if not r.passed]
    return {
        "passed": report.passed,
        "model_ref": report.target.model_ref,
        "pools": list(report.target.pool_ids),
        "seeds": len(report.results),
        "failed_seeds": [r.seed for r in failed],
        "resubmits": sum(r.attempts - 1 for r in report.results),
        "wall_s": round(report.wall_s, 3),
        "empty_pairs": sum(1 for r in report.results if r.runs and r.runs[0].tokens_out == 0),
        "per_seed": [
            {
                "seed": r.seed,
                "passed": r.passed,
                "attempts": r.attempts,
                "replicas": [run.replica_id for run in r.runs or ()],
                "tokens_out": [run.tokens_out for run in r.runs or ()],
                "finish_reason": [run.finish_reason for run in r.runs or ()],
            }
            for r in report.results
        ],
        "latency_source": LATENCY_SOURCE,
        "latency": [asdict(row) for row in latency_rows(report)],
        "failures": [
            {
                "seed": r.seed,
                "what": r.mismatch.what if r.mismatch else None,
                "detail": r.mismatch.detail if r.mismatch else None,
                "diff": r.diff_path,
                "artifact": r.artifact_id,
            }
            for r in failed
        ],
    }


def format_report(report: Report) -> str:
    """The summary table printed at the end of a run."""
    failed = [r for r in report.results if not r.passed]
    verdict = "PASS" if report.passed else "FAIL"
    outs = [run.tokens_out or 0 for r in report.results for run in r.runs or ()]
    empty = sum(1 for r in report.results if r.runs and r.runs[0].tokens_out == 0)
    head = ("scope", "name", "n", "ttft p50", "ttft p95", "decode p50", "decode p95")
    lines = [
        f"determinism: {verdict}: {len(report.results)} seeds, {len(failed)} failed, "
        f"{sum(r.attempts - 1 for r in report.results)} resubmits, {report.wall_s:.1f} s; "
        f"tokens_out per task {min(outs, default=0)}..{max(outs, default=0)}"
        + (f" ({empty} pairs produced no token: identical, but vacuous)" if empty else ""),
        f"model {report.target.model_ref}, pools {', '.join(report.target.pool_ids)}",
        f"latency in ms from the {LATENCY_SOURCE}",
        "{:<8} {:<24} {:>4} {:>9} {:>9} {:>10} {:>10}".format(*head),
    ]
    for row in latency_rows(report):
        cells = (row.first_token_ms_p50, row.first_token_ms_p95, row.decode_ms_p50, row.decode_ms_p95)
        shown = ["-" if c is None else str(c) for c in cells]
        lines.append(
            "{:<8} {:<24} {:>4} {:>9} {:>9} {:>10} {:>10}".format(row.scope, row.name, row.n, *shown)
        )
    for r in failed:
        what = f"{r.mismatch.what}: {r.mismatch.detail}" if r.mismatch else "not run"
        lines.append(f"seed {r.seed}: {what}" + (f" -> {r.diff_path}" if r.diff_path else ""))
    return "\n".join(lines)


# ---- the command ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gates.determinism", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", type=Path, help="start this config with `llorch up` (gates.stack)")
    where.add_argument("--base-url", help="use a running stack; token from LLORCH_API_TOKEN")
    parser.add_argument("--seeds", type=int, default=None, help="run only the first N seeds (default: all)")
    parser.add_argument("--seeds-file", type=Path, default=SEEDS_FILE)
    parser.add_argument("--out", type=Path, default=Path("gate-out"), help="diffs and summary (gate-out)")
    parser.add_argument("--model-ref", default=None, help="default: the only model the stack serves")
    parser.add_argument("--bind", default=DEFAULT_BIND, help="with --config: the gateway's host:port")
    parser.add_argument("--state-dir", type=Path, default=None, help="with --config: default a temporary dir")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, help="seconds")
    parser.add_argument("--task-timeout", type=float, default=TASK_TIMEOUT_S, help="seconds per stream")
    return parser


async def _run(args: argparse.Namespace, base_url: str, token: str) -> Report:
    seeds = read_seeds(args.seeds_file, args.seeds)
    async with ApiClient(base_url, token) as client:
        return await run_suite(
            client, seeds, args.out, args.model_ref, args.ready_timeout, args.task_timeout, progress=True
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.config is not None:
            log_path = (args.out / "determinism-llorch-up.log").resolve()
            args.out.mkdir(parents=True, exist_ok=True)
            stack = Stack(args.config, args.state_dir, args.bind, log_path=log_path)
            print(f"stack: starting {args.config} on {stack.base_url} (log: {log_path})", flush=True)
            with stack:
                report = asyncio.run(_run(args, stack.base_url, stack.token()))
        else:
            token = os.environ.get("LLORCH_API_TOKEN", "")
            if not token:
                print("LLORCH_API_TOKEN is not set", file=sys.stderr)
                return 2
            report = asyncio.run(_run(args, args.base_url, token))
    except (GateError, StackError, aiohttp.ClientError, TimeoutError) as exc:
        print(f"determinism: cannot run: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    data = summary(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "determinism-summary.json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(format_report(report))
    return 0 if report.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
