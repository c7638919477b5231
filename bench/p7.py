"""P7 (BENCH.md), real engine: llama-server + SmolLM2-135M on the CPU, tokens/s delivered through the
stack against the same load straight at a standalone llama-server started with the same command line,
at 1 and 4 concurrent streams, alternating stack/direct rounds.

Both sides decode greedily (the stack's sampler profile v1, sent as the same fields to the direct
engine) from the same counting prompts, so both produce the same tokens. Skipped, with a note, when the
llama-server binary (``make engine``) or the model (``make model``) is absent.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from time import perf_counter
from typing import Any

import aiohttp

from llorch.adapters.launch import engine_command
from llorch.config import GREEDY_V1, PoolConfig
from tests.support.procs import Proc, free_port, http_ok, wait_until
from tests.support.redis_server import RedisServer
from tests.support.stack import Stack

from .cpu import TOKEN_STACK, Meter, Role, cost
from .stats import Spread
from .traffic import DIRECT_TOKEN, JSON_HEADERS, StackTarget, StreamTrace, Target, _count, wave

ROOT = Path(__file__).resolve().parent.parent
BINARY_STAMP = ROOT / ".stamps" / "llama-server-path"
MODEL = ROOT / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "smollm2-135m"
POOL_ID = "p7-cpu"
TARGET_RATIO = 0.98
SEED = 7


@dataclass(frozen=True, slots=True)
class P7Plan:
    rounds: int = 3
    streams: tuple[int, ...] = (1, 4)
    max_tokens: int = 128
    threads: int = 1  # two threads spin-wait for each other on a loaded 2-core box: noise, not speed
    ctx: int = 4096
    run_timeout_s: float = 90.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def prompt(index: int) -> str:
    """A counting prompt: greedy decoding keeps counting for hundreds of tokens without an EOS."""
    start = 1 + 10 * index
    return "Count on: " + ", ".join(str(n) for n in range(start, start + 8)) + ","


class StackP7(StackTarget):
    """``POST /v1/tasks`` (greedy, best-effort determinism so the prompt cache is on as on the direct
    side), then its stream."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(stack.url, stack.headers, MODEL_ID)

    def body(self, index: int, max_tokens: int) -> dict[str, object]:
        return {
            "model_ref": MODEL_ID,
            "prompt": prompt(index),
            "max_tokens": max_tokens,
            "seed": SEED,
            "determinism": "best_effort",
        }


class DirectP7:
    """``POST /completion`` with the fields the stack's llama.cpp adapter sends for the same task."""

    name = "direct"

    def __init__(self, url: str) -> None:
        self.url = url

    async def stream(
        self, session: aiohttp.ClientSession, index: int, max_tokens: int, trace: StreamTrace
    ) -> None:
        s = GREEDY_V1
        body = {
            "prompt": prompt(index),
            "n_predict": max_tokens,
            "seed": SEED,
            "temperature": s.temperature,
            "top_k": s.top_k,
            "top_p": s.top_p,
            "min_p": s.min_p,
            "repeat_penalty": s.repeat_penalty,
            "stream": True,
            "cache_prompt": True,
            "ignore_eos": False,
        }
        trace.t_send = perf_counter()
        async with session.post(f"{self.url}/completion", data=json.dumps(body), headers=JSON_HEADERS) as r:
            if r.status != 200:
                trace.error = f"completion {r.status}: {(await r.text())[:200]}"
                return
            await _count(r.content, DIRECT_TOKEN, trace)


def _engine() -> tuple[Path, Path] | str:
    """(llama-server binary, model) or why P7 cannot run."""
    if not BINARY_STAMP.exists():
        return "no llama-server: run `make engine` (it writes .stamps/llama-server-path)"
    binary = Path(BINARY_STAMP.read_text().strip())
    if not binary.is_file():
        return f"llama-server {binary} (from .stamps/llama-server-path) is missing: run `make engine`"
    if not MODEL.exists():
        return f"no model {MODEL.relative_to(ROOT)}: run `make model`"
    return binary, MODEL.resolve()


def _pool(binary: Path, plan: P7Plan) -> dict[str, Any]:
    return {
        "id": POOL_ID,
        "engine": "llamacpp",
        "model": MODEL_ID,
        "devices": "cpu",
        "allow_cpu": True,
        "ctx": plan.ctx,
        "slots": max(plan.streams),
        "engine_bin": str(binary),
        "engine_args": ["--threads", str(plan.threads)],
        "queue": {"capacity": 64, "full_policy": "reject"},
    }


def _rate(traces: list[StreamTrace]) -> float:
    """Tokens/s delivered: every token of the run over first send → last token."""
    good = [t for t in traces if t.times]
    if not good:
        return 0.0
    span = max(t.times[-1] for t in good) - min(t.t_send for t in good)
    return sum(t.tokens for t in good) / max(span, 1e-9)


def skipped(reason: str, plan: P7Plan) -> dict[str, Any]:
    return {
        "id": "P7",
        "what": "real engine",
        "target": {"ratio_min": TARGET_RATIO},
        "params": plan.as_json(),
        "skipped": reason,
        "pass": False,
    }


async def p7_real_engine(workdir: Path, plan: P7Plan) -> dict[str, Any]:
    found = _engine()
    if isinstance(found, str):
        return skipped(found, plan)
    binary, model = found
    pool = _pool(binary, plan)
    redis = RedisServer(workdir / "p7" / "redis")
    stack = Stack(
        workdir / "p7" / "stack", redis.url, pools=[pool], models=[{"id": MODEL_ID, "path": str(model)}]
    )
    direct: Proc | None = None
    try:
        await stack.start(ready=False)
        port = free_port()
        argv = list(engine_command(PoolConfig.model_validate(pool), str(binary), model, port, free_port).argv)
        direct = Proc(argv, workdir / "p7" / "direct.log")
        url = f"http://127.0.0.1:{port}"
        await stack.wait_ready(timeout_s=180)
        await wait_until(partial(http_ok, f"{url}/health"), 120, "the direct llama-server")
        roles = (
            Role("gateway", (stack.procs["gateway"].pid,), "tree"),
            Role("scheduler", (stack.procs["scheduler"].pid,)),
            Role("pool manager", (stack.procs["pool-manager"].pid,)),
            Role("engines", (stack.procs["pool-manager"].pid,), "children"),
            Role("direct engines", (direct.pid,)),
        )
        return await _measure(plan, StackP7(stack), DirectP7(url), roles, argv)
    finally:
        if direct is not None:
            direct.stop()
        stack.stop()
        redis.stop()


async def _measure(
    plan: P7Plan, stack: Target, direct: Target, roles: tuple[Role, ...], argv: list[str]
) -> dict[str, Any]:
    cases: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        for target in (stack, direct):  # warm-up: load the prompt path and the connections
            traces = await wave(session, target, max(plan.streams), 8, plan.run_timeout_s)
            if any(t.error for t in traces):
                raise RuntimeError(f"P7 warm-up through {target.name} failed: {traces[0].error}")
        for streams in plan.streams:
            rates: dict[str, list[float]] = {"stack": [], "direct": []}
            meters = {"stack": Meter(roles), "direct": Meter(roles)}
            tokens = {"stack": 0, "direct": 0}
            errors: list[str] = []
            for _ in range(plan.rounds):
                for target in (stack, direct):
                    started = meters[target.name].start()
                    traces = await wave(session, target, streams, plan.max_tokens, plan.run_timeout_s)
                    meters[target.name].stop(started)
                    errors += [t.error for t in traces if t.error]
                    rates[target.name].append(_rate(traces))
                    tokens[target.name] += sum(t.tokens for t in traces)
            s, d = rates["stack"], rates["direct"]
            ratios = [a / b if b else float("nan") for a, b in zip(s, d, strict=True)]
            mean_d = sum(d) / len(d)
            ratio = Spread.of(sum(s) / len(s) / mean_d if mean_d else float("nan"), ratios)
            cases.append(
                {
                    "streams": streams,
                    "stack_tokens_per_s": [round(v, 1) for v in s],
                    "direct_tokens_per_s": [round(v, 1) for v in d],
                    "ratio": ratio.as_json(),
                    "errors": len(errors),
                    "first_errors": errors[:3],
                    "cpu": {
                        "stack": cost(meters["stack"].seconds, tokens["stack"], TOKEN_STACK),
                        "direct": cost(meters["direct"].seconds, tokens["direct"], ()),
                    },
                    "pass": not errors and ratio.value >= TARGET_RATIO,
                }
            )
    return {
        "id": "P7",
        "what": "real engine",
        "target": {"ratio_min": TARGET_RATIO},
        "params": {**plan.as_json(), "engine_argv": [Path(argv[0]).name, *argv[1:]]},
        "cases": cases,
        "pass": all(c["pass"] for c in cases),
    }


def _spread(spread: dict[str, float | None]) -> str:
    value, low, high = spread["value"], spread["min"], spread["max"]
    if value is None:
        return "n/a"
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f} … {high:.3f}]"


def p7_rows(bench: dict[str, Any]) -> list[list[str]]:
    """The results table's rows: one per stream count (or one saying why P7 was skipped)."""
    target = f"≥ {100 * bench['target']['ratio_min']:g} % of direct tokens/s"
    if bench.get("skipped"):
        return [[bench["id"], bench["what"], target, f"skipped: {bench['skipped']}", "skipped"]]
    out = []
    for case in bench["cases"]:
        measured = (
            f"{case['streams']} stream{'s' if case['streams'] > 1 else ''}: ratio {_spread(case['ratio'])}; "
            f"stack {', '.join(f'{v:,.0f}' for v in case['stack_tokens_per_s'])} vs direct "
            f"{', '.join(f'{v:,.0f}' for v in case['direct_tokens_per_s'])} tok/s per round"
        )
        if case["errors"]:
            measured += f"; **{case['errors']} errors: {case['first_errors'][0]}**"
        out.append([bench["id"], bench["what"], target, measured, "pass" if case["pass"] else "**fail**"])
    return out


def p7_details(bench: dict[str, Any]) -> str:
    """Markdown under the table: the engine's command line and the CPU per token of each side."""
    if bench.get("skipped"):
        return f"P7 skipped: {bench['skipped']}."
    p = bench["params"]
    lines = [
        f"P7: `{' '.join(p['engine_argv'])}` for both sides (the pool's engine also gets "
        f"`--slot-save-path`), {p['rounds']} alternating rounds, {p['max_tokens']} tokens per stream, "
        "greedy, counting prompts. Tokens/s = all tokens of a run over first request → last token. "
        "CPU µs per token delivered, by process:",
        "",
        "| streams | side | gateway | scheduler | pool manager | engine |",
        "|---|---|---|---|---|---|",
    ]
    for case in bench["cases"]:
        for side, engine in (("stack", "engines"), ("direct", "direct engines")):
            per = case["cpu"][side]["us_per_unit"]

            def us(role: str, per: dict[str, Any] = per) -> str:
                value = per.get(role)
                return "n/a" if value is None else f"{value:,.1f}"

            cells = (
                ["-", "-", "-"] if side == "direct" else [us("gateway"), us("scheduler"), us("pool manager")]
            )
            lines.append(f"| {case['streams']} | {side} | {' | '.join(cells)} | {us(engine)} |")
    return "\n".join(lines)
