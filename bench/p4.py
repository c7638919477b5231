"""P4 (BENCH.md), admission rate: POST /v1/tasks as fast as a fixed number of clients can, into one pool
with a large ``reject`` queue in front of a one-slot engine so slow (1 s a token) that what is admitted
stays queued, until the queue is full and 429s come back. 202 and 429 both count as answers.

There is no direct baseline for admission; the figures are absolute, for this machine. For context,
the same clients first drive ``GET /healthz`` on the same gateway: the floor of an HTTP round trip
there. Every case gets a fresh stack, so each starts from an empty queue.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Any

from . import profile
from .cpu import ADMISSION_STACK, Meter, cost
from .env import MODEL_REF, BenchEnv, Layout
from .stats import Dist, r3
from .wire import Connection, request_bytes

TARGET_RATE = 3000.0
TARGET_P99_MS = 10.0


@dataclass(frozen=True, slots=True)
class P4Plan:
    clients: tuple[int, ...] = (16, 64)
    capacity: int = 10000
    rejects: int = 2000  # 429s to collect once the queue is full
    healthz_requests: int = 4000
    time_limit_s: float = 60.0  # per case: stop after this, full or not
    max_tokens: int = 128  # the running task holds the slot for 127 s, longer than a case
    deadline_ms: int = 86_400_000  # the longest allowed: a deep queue must not trip DEADLINE_UNMET

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Answers:
    """Per answer: when its request was sent, when the answer was read, its status."""

    sent: list[float] = field(default_factory=list)
    done: list[float] = field(default_factory=list)
    status: list[int] = field(default_factory=list)
    counts: dict[int, int] = field(default_factory=dict)
    first_error: str = ""

    def ms(self, status: int) -> list[float]:
        return [
            (d - s) * 1000 for s, d, st in zip(self.sent, self.done, self.status, strict=True) if st == status
        ]

    def count(self, status: int) -> int:
        return self.counts.get(status, 0)

    def rate(self, status: int | None = None) -> float:
        """Answers (of ``status``, or all) per second from the first send to the last such answer."""
        done = [d for d, st in zip(self.done, self.status, strict=True) if status is None or st == status]
        if not done:
            return 0.0
        return len(done) / max(max(done) - min(self.sent), 1e-9)


async def _drive(conns: list[Connection], raw: bytes, stop: Any) -> Answers:
    """Every connection sends ``raw`` back to back until ``stop(answers)`` is true."""
    out = Answers()

    async def client(conn: Connection) -> None:
        while not stop(out):
            sent = perf_counter()
            try:
                resp = await conn.send(raw)
            except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                out.first_error = out.first_error or f"{type(exc).__name__}: {exc}"
                return
            out.sent.append(sent)
            out.done.append(perf_counter())
            out.status.append(resp.status)
            out.counts[resp.status] = out.counts.get(resp.status, 0) + 1
            if resp.status not in (200, 202, 429) and not out.first_error:
                out.first_error = f"{resp.status}: {resp.body[:200].decode(errors='replace')}"

    await asyncio.gather(*(client(c) for c in conns))
    return out


def _by_depth(answers: Answers, buckets: int = 5) -> list[dict[str, Any]]:
    """202s in admission order, cut into ``buckets`` slices of queue depth: rate and latency in each."""
    admitted = sorted(
        (d, (d - s) * 1000)
        for s, d, st in zip(answers.sent, answers.done, answers.status, strict=True)
        if st == 202
    )
    out = []
    size = max(1, -(-len(admitted) // buckets))
    previous = min(answers.sent, default=0.0)
    for lo in range(0, len(admitted), size):
        part = admitted[lo : lo + size]
        end = part[-1][0]
        dist = Dist.of([ms for _, ms in part])
        out.append(
            {
                "depth_from": lo,
                "depth_to": lo + len(part),
                "per_s": round(len(part) / max(end - previous, 1e-9), 1),
                "p50_ms": r3(dist.p50_ms),
                "p99_ms": r3(dist.p99_ms),
            }
        )
        previous = end
    return out


async def _case(workdir: Path, plan: P4Plan, clients: int) -> dict[str, Any]:
    layout = Layout(replicas=1, slots=1, token_delay_ms=1000, queue_capacity=plan.capacity)
    async with BenchEnv(workdir / f"p4-{clients}", layout, direct=False) as env:
        stack = env.the_stack
        headers = {**stack.headers, "Content-Type": "application/json"}
        conns = [await Connection.open(stack.url) for _ in range(clients)]
        try:
            healthz = await _drive(
                conns,
                request_bytes("GET", f"{stack.url}/healthz", stack.headers),
                lambda a: len(a.status) >= plan.healthz_requests,
            )
            body = json.dumps(
                {
                    "model_ref": MODEL_REF,
                    "prompt": "p4",
                    "max_tokens": plan.max_tokens,
                    "deadline_ms": plan.deadline_ms,
                }
            )
            post = request_bytes("POST", f"{stack.url}/v1/tasks", headers, body.encode())
            meter = Meter(env.cpu_roles())
            async with profile.window(f"P4, {clients} clients", meter.roles):
                cpu_before = meter.start()
                started = time.monotonic()

                def stop(a: Answers) -> bool:
                    return a.count(429) >= plan.rejects or time.monotonic() - started > plan.time_limit_s

                answers = await _drive(conns, post, stop)
                wall = time.monotonic() - started
                used = meter.stop(cpu_before)
            cpu = {name: round(seconds / wall, 3) for name, seconds in used.items()}
        finally:
            for conn in conns:
                await conn.close()
    admitted, rejected = answers.ms(202), answers.ms(429)
    others = len(answers.status) - len(admitted) - len(rejected)
    answered_rate = (len(admitted) + len(rejected)) / max(
        max(answers.done, default=0.0) - min(answers.sent, default=0.0), 1e-9
    )
    a202, a429 = Dist.of(admitted), Dist.of(rejected)
    full = len(rejected) > 0
    ok = (
        full
        and others == 0
        and answered_rate >= TARGET_RATE
        and a202.p99_ms <= TARGET_P99_MS
        and a429.p99_ms <= TARGET_P99_MS
    )
    return {
        "clients": clients,
        "queue_full": full,
        "answers_per_s": round(answered_rate, 1),
        "admit_per_s": round(answers.rate(202), 1),
        "reject_per_s": round(len(rejected) / max(_span(answers, 429), 1e-9), 1) if full else None,
        "accepted": a202.as_json(),
        "rejected": a429.as_json(),
        "other_answers": others,
        "first_error": answers.first_error or None,
        "healthz": {**Dist.of(healthz.ms(200)).as_json(), "per_s": round(healthz.rate(200), 1)},
        "admit_by_depth": _by_depth(answers),
        "cpu_cores_busy": cpu,  # CPU seconds per wall second of the POST phase, by process
        # P9: µs of CPU per answer (202 or 429) over the POST phase, by process and for the stack
        "cpu": cost(used, len(admitted) + len(rejected), ADMISSION_STACK),
        "pass": ok,
    }


def _span(answers: Answers, status: int) -> float:
    """Seconds from the first to the last answer of ``status``."""
    done = [d for d, st in zip(answers.done, answers.status, strict=True) if st == status]
    return max(done) - min(done) if len(done) > 1 else 0.0


async def p4_admission(workdir: Path, plan: P4Plan) -> dict[str, Any]:
    cases = [await _case(workdir, plan, clients) for clients in plan.clients]
    return {
        "id": "P4",
        "what": "admission rate",
        "target": {"answers_per_s_min": TARGET_RATE, "p99_ms_max": TARGET_P99_MS},
        "params": {**plan.as_json(), "pool": "1 replica, 1 slot, 1000 ms/token, queue reject"},
        "cases": cases,
        "pass": all(c["pass"] for c in cases),
    }
