"""P8 (BENCH.md), reload under load: a stack with two mock-engine pools serving the same model ``small``
(the SmolLM2 GGUF when ``make model`` has fetched it, else the mock fixture; the mock engine does not
read it) and a second catalog model ``small-v2`` (a copy of that file with a few bytes appended, so its
digest differs). Closed-loop clients stream short tasks for ``small`` through ``POST /v1/tasks`` + its
stream without a pause; meanwhile each round reloads pool B onto ``small-v2`` (``?wait=true``), checks
that a ``small-v2`` task is served there, and reloads it back onto ``small``.

Per reload: the swap time (the wall time of the ``wait=true`` call), whether it was the first reload
onto that model (the catalog's verification status was still ``never``: the scheduler verifies the
model on the way, GGUF metadata included, and the pool manager reads that metadata for the first time),
the tasks that ended while it ran, and those that were running on the old engine and ended after the
call returned (they finished on the old engine after the swap: the SPEC's promise). The moment a reload
onto ``small-v2`` answers 200, a ``small-v2`` task is submitted (a client that waited for the swap may
use the new model at once); after every 200 the pool's health is polled until it shows the new model.
No task for ``small`` may run on an engine of ``small-v2``, and every answer must carry the digest of
the file. Any task over the whole window that ended in anything but ``end`` (or was refused, or never
ended) fails P8 loudly: the run exits 1 after writing the report.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import shutil
import sys
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from time import perf_counter
from typing import Any

import aiohttp

from tests.support.procs import wait_until
from tests.support.redis_server import RedisServer
from tests.support.stack import MOCK_MODEL, ROOT, Stack, mock_pool, sse_frames

from .stats import Dist, r3

TARGET_SWAP_S = 10.0
VISIBLE_WITHIN_S = 10.0  # after the 200, the pool's health must show the new model within this
POOLS = ("p8-a", "p8-b")
RELOADED = POOLS[1]
MODEL, MODEL_V2 = "small", "small-v2"
SMOLLM2 = ROOT / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True, slots=True)
class P8Plan:
    rounds: int = 3  # each: reload onto small-v2, then back onto small
    clients: int = 8
    slots: int = 4  # per pool (one replica each): 8 slots for 8 clients while both serve small
    token_delay_ms: float = 20.0
    min_tokens: int = 10  # a task streams U(min, max) tokens: 0.2-2 s at 20 ms a token
    max_tokens: int = 100
    reload_timeout_s: float = 30.0  # per reload call; beyond it the reload counts as failed
    time_limit_s: float = 100.0  # the whole window, load and reloads, stays under this
    drain_timeout_s: float = 15.0  # for the tasks running when the load stops
    seed: int = 8

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class Task:
    model_ref: str
    sent: float
    outcome: str = ""  # "end", the error event's code, "refused <status> <code>" or "client: <exc>"
    replica_id: str = ""
    ended: float | None = None


@dataclass(slots=True)
class Reload:
    round: int
    model_ref: str
    status: int
    swap_s: float
    answer: dict[str, Any]
    old_replicas: list[str]
    verified_before: str  # the catalog's verification status of the model before the call
    started: float
    returned: float
    new_replicas: list[str] = field(default_factory=list)
    visible_after_s: float | None = None  # from the 200 until the pool's health shows the new model
    probe: Task | None = None  # a task for the new model submitted the moment the 200 arrived


class Load:
    """Closed-loop clients streaming tasks until stopped; every task is kept with its outcome."""

    def __init__(self, session: aiohttp.ClientSession, stack: Stack, plan: P8Plan) -> None:
        self.session, self.stack, self.plan = session, stack, plan
        self.tasks: list[Task] = []
        self.stop = asyncio.Event()
        self.rng = random.Random(plan.seed)

    async def run_one(self, model_ref: str, max_tokens: int, keep: bool = True) -> Task:
        task = Task(model_ref, perf_counter())
        if keep:
            self.tasks.append(task)
        try:
            await self._stream(task, model_ref, max_tokens)
        except (aiohttp.ClientError, TimeoutError, ValueError, AssertionError) as exc:
            task.outcome = task.outcome or f"client: {type(exc).__name__}: {exc}"
        task.ended = perf_counter()
        task.outcome = task.outcome or "no end event"
        return task

    async def _stream(self, task: Task, model_ref: str, max_tokens: int) -> None:
        stack, body = self.stack, {"model_ref": model_ref, "prompt": "p8", "max_tokens": max_tokens}
        async with self.session.post(f"{stack.url}/v1/tasks", json=body, headers=stack.headers) as resp:
            answer = await resp.json()
            if resp.status != 202:
                task.outcome = f"refused {resp.status} {answer.get('code')}"
                return
        async with self.session.get(f"{stack.url}{answer['stream_url']}", headers=stack.headers) as resp:
            async for event in sse_frames(resp.content):
                if event.event == "metrics" and event.data.get("phase") == "dispatch":
                    task.replica_id = str(event.data["replica_id"])
                elif event.event == "end":
                    task.outcome = "end"
                elif event.event == "error":
                    task.outcome = str(event.data.get("code"))

    async def client(self) -> None:
        while not self.stop.is_set():
            await self.run_one(MODEL, self.rng.randint(self.plan.min_tokens, self.plan.max_tokens))

    def served_by(self, replicas: list[str]) -> bool:
        return any(t.outcome == "end" and t.replica_id in replicas for t in self.tasks)


async def _health(session: aiohttp.ClientSession, stack: Stack, pool_id: str) -> dict[str, Any]:
    url = f"{stack.url}/v1/pools/{pool_id}/health"
    async with session.get(url, headers=stack.headers) as resp:
        resp.raise_for_status()
        body: dict[str, Any] = await resp.json()
        return body


async def _replicas(session: aiohttp.ClientSession, stack: Stack, pool_id: str) -> list[str]:
    return [str(r["replica_id"]) for r in (await _health(session, stack, pool_id))["replicas"]]


async def _verification(session: aiohttp.ClientSession, stack: Stack, model_id: str) -> str:
    url = f"{stack.url}/v1/catalog/models/{model_id}"
    async with session.get(url, headers=stack.headers) as resp:
        resp.raise_for_status()
        return str((await resp.json())["verification"]["status"])


async def _reload(load: Load, index: int, model_ref: str) -> Reload:
    session, stack = load.session, load.stack
    old = await _replicas(session, stack, RELOADED)
    verified = await _verification(session, stack, model_ref)
    url = f"{stack.url}/v1/pools/{RELOADED}/reload?wait=true"
    started = perf_counter()
    try:
        async with (
            asyncio.timeout(load.plan.reload_timeout_s),
            session.post(url, json={"new_model_ref": model_ref}, headers=stack.headers) as resp,
        ):
            status, answer = resp.status, await resp.json()
    except TimeoutError:
        status, answer = 0, {"code": "client: no answer within the reload timeout"}
    returned = perf_counter()
    reload = Reload(index, model_ref, status, returned - started, answer, old, verified, started, returned)
    if status == 200:
        await _after_swap(load, reload)
    return reload


async def _after_swap(load: Load, reload: Reload) -> None:
    """Submit a task for small-v2 at once (as a client that waited for the 200 would), and time how long
    the pool's health takes to show the new model; its replicas then are the new generation."""
    probe = None
    if reload.model_ref == MODEL_V2:
        probe = asyncio.create_task(load.run_one(MODEL_V2, load.plan.min_tokens, keep=False))
    deadline = reload.returned + VISIBLE_WITHIN_S
    while perf_counter() < deadline:
        health = await _health(load.session, load.stack, RELOADED)
        if health["model_ref"] == reload.model_ref:
            reload.visible_after_s = perf_counter() - reload.returned
            reload.new_replicas = [str(r["replica_id"]) for r in health["replicas"]]
            break
        await asyncio.sleep(0.01)  # polling the public view, not synchronising on it
    if probe is not None:
        reload.probe = await probe


async def _round(load: Load, index: int) -> list[Reload]:
    """Reload onto small-v2 (one small-v2 task at once), back onto small, wait for B to serve small."""
    done = []
    for model_ref in (MODEL_V2, MODEL):
        reload = await _reload(load, index, model_ref)
        done.append(reload)
        if reload.status != 200 or reload.visible_after_s is None:
            return done

    async def serves_small() -> bool:
        return load.served_by(done[-1].new_replicas)

    await wait_until(serves_small, 30, f"pool {RELOADED} to serve {MODEL} again")
    return done


def _reload_json(reload: Reload, tasks: list[Task]) -> dict[str, Any]:
    ended = [(t, t.ended) for t in tasks if t.ended is not None]
    during = [t for t, at in ended if reload.started <= at <= reload.returned]
    after = [t for t, at in ended if t.replica_id in reload.old_replicas and at > reload.returned]
    probe = reload.probe
    return {
        "round": reload.round,
        "to": reload.model_ref,
        "status": reload.status,
        "swap_s": r3(reload.swap_s),
        "first_onto_model": reload.verified_before == "never",  # the catalog verifies it on the way
        "model_digest": reload.answer.get("model_digest"),
        "error": None if reload.status == 200 else reload.answer,
        "replicas": {"before": reload.old_replicas, "after": reload.new_replicas},
        "health_shows_it_after_ms": None
        if reload.visible_after_s is None
        else r3(reload.visible_after_s * 1000),
        "new_model_task_at_once": None
        if probe is None
        else {"outcome": probe.outcome, "replica_id": probe.replica_id},
        "tasks_ended_during": len(during),
        "old_engine_tasks_ended_after_swap": len(after),
        "old_engine_tasks_failed_after_swap": sum(t.outcome != "end" for t in after),
    }


def _outcomes(tasks: list[Task]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for task in tasks:
        counts[task.outcome] = counts.get(task.outcome, 0) + 1
    return counts


def _wrong_engine(reloads: list[Reload], tasks: list[Task]) -> int:
    """Tasks for small that ran on an engine of small-v2 (a generation a reload onto small-v2 started)."""
    v2 = {r for reload in reloads if reload.model_ref == MODEL_V2 for r in reload.new_replicas}
    return sum(t.model_ref == MODEL and t.replica_id in v2 for t in tasks)


async def _measure(session: aiohttp.ClientSession, stack: Stack, plan: P8Plan) -> dict[str, Any]:
    load = Load(session, stack, plan)
    clients = [asyncio.create_task(load.client()) for _ in range(plan.clients)]
    reloads: list[Reload] = []
    stopped_early = None
    started = perf_counter()
    try:
        async with asyncio.timeout(plan.time_limit_s):
            first = await _replicas(session, stack, RELOADED)

            async def serving() -> bool:
                return load.served_by(first)

            await wait_until(serving, 30, f"{RELOADED} to serve the load")
            for index in range(plan.rounds):
                reloads += await _round(load, index + 1)
                if reloads[-1].status != 200 or reloads[-1].visible_after_s is None:
                    break
    except (TimeoutError, AssertionError) as exc:
        stopped_early = f"{type(exc).__name__}: {exc}" if str(exc) else f"time limit {plan.time_limit_s:g} s"
    finally:
        load.stop.set()
        _, pending = await asyncio.wait(clients, timeout=plan.drain_timeout_s)
        for client in pending:
            client.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
    wall = perf_counter() - started
    ended = [t for t in load.tasks if t.ended is not None]
    durations = [((t.ended or 0.0) - t.sent) * 1000 for t in ended if t.outcome == "end"]
    return {
        "reloads": [_reload_json(r, load.tasks) for r in reloads],
        "stopped_early": stopped_early,
        "small_tasks_on_small_v2_engines": _wrong_engine(reloads, load.tasks),
        "tasks": len(load.tasks),
        "completed": sum(t.outcome == "end" for t in load.tasks),
        "unfinished": len(load.tasks) - len(ended),
        "failed": {k: n for k, n in _outcomes(ended).items() if k != "end"},
        "task_time": Dist.of(durations).as_json(),
        "window_s": round(wall, 1),
    }


def _models(workdir: Path) -> tuple[Path, Path]:
    """``small`` (SmolLM2 when fetched, else the mock fixture) and ``small-v2``, its copy plus bytes."""
    source = SMOLLM2 if SMOLLM2.is_file() else MOCK_MODEL
    v2 = workdir / f"{source.stem}-v2{source.suffix}"
    shutil.copyfile(source, v2)
    with v2.open("ab") as out:
        out.write(b"\nllorch-p8-v2\n")
    return source, v2


def _stack(workdir: Path, redis_url: str, plan: P8Plan, small: Path, v2: Path) -> Stack:
    args = ["--token-delay-ms", f"{plan.token_delay_ms:g}"]
    pools = [mock_pool(p, slots=plan.slots, capacity=256, args=args, model=MODEL) for p in POOLS]
    models = [{"id": MODEL, "path": str(small)}, {"id": MODEL_V2, "path": str(v2)}]
    return Stack(workdir / "stack", redis_url, pools=pools, models=models)


def _verdict(figures: dict[str, Any], plan: P8Plan, digests: dict[str, str]) -> tuple[bool, list[str]]:
    problems = []
    reloads = figures["reloads"]
    if len(reloads) != 2 * plan.rounds:
        problems.append(f"{len(reloads)} of {2 * plan.rounds} reloads ran")
    problems += [f"reload to {r['to']} answered {r['status']}: {r['error']}" for r in reloads if r["error"]]
    if figures["stopped_early"]:
        problems.append(f"stopped early: {figures['stopped_early']}")
    for r in reloads:
        if r["status"] == 200 and r["health_shows_it_after_ms"] is None:
            problems.append(
                f"round {r['round']}: health did not show {r['to']} within {VISIBLE_WITHIN_S:g} s"
            )
        if r["status"] == 200 and r["model_digest"] != digests[r["to"]]:
            problems.append(f"round {r['round']}: {r['to']} answered digest {r['model_digest']}")
        probe = r["new_model_task_at_once"]
        if probe is not None and probe["outcome"] != "end":
            problems.append(
                f"round {r['round']}: a {r['to']} task submitted right after the 200 ended {probe['outcome']}"
            )
        elif probe is not None and probe["replica_id"] not in r["replicas"]["after"]:
            problems.append(f"round {r['round']}: the {r['to']} task ran on {probe['replica_id']}")
    if figures["small_tasks_on_small_v2_engines"]:
        problems.append(f"{figures['small_tasks_on_small_v2_engines']} small tasks ran on a small-v2 engine")
    if figures["failed"] or figures["unfinished"]:
        problems.append(f"tasks failed: {figures['failed']}, {figures['unfinished']} never ended")
    slow = [r["swap_s"] for r in reloads if r["swap_s"] >= TARGET_SWAP_S]
    return not problems and not slow, problems


async def p8_reload(workdir: Path, plan: P8Plan) -> dict[str, Any]:
    work = workdir / "p8"
    work.mkdir(parents=True, exist_ok=True)
    small, v2 = _models(work)
    redis = RedisServer(work / "redis")
    stack = _stack(work, redis.url, plan, small, v2)
    try:
        await stack.start(ready=False)
        await stack.wait_ready(timeout_s=90)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for pool_id in POOLS:
                await wait_until(partial(_ready, session, stack, pool_id), 90, f"{pool_id} to be Ready")
            figures = await _measure(session, stack, plan)
    finally:
        stack.stop()
        redis.stop()
    digests = {MODEL: await _sha256(small), MODEL_V2: await _sha256(v2)}
    ok, problems = _verdict(figures, plan, digests)
    for problem in problems:
        print(f"P8 FAILED: {problem}", file=sys.stderr, flush=True)
    return {
        "id": "P8",
        "what": "reload under load",
        "target": {"swap_s_max": TARGET_SWAP_S, "failed_tasks_max": 0},
        "params": {
            **plan.as_json(),
            "model_file": str(small.relative_to(ROOT)),
            "pools": f"{len(POOLS)} pools x 1 mock replica x {plan.slots} slots, "
            f"{plan.token_delay_ms:g} ms/token; {RELOADED} is reloaded",
        },
        **figures,
        "digests": digests,
        "problems": problems,
        "fatal": bool(problems),
        "pass": ok,
    }


async def _sha256(path: Path) -> str:
    def read() -> str:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
        return "sha256:" + digest.hexdigest()

    return await asyncio.to_thread(read)


async def _ready(session: aiohttp.ClientSession, stack: Stack, pool_id: str) -> bool:
    health = await _health(session, stack, pool_id)
    return bool(health["replicas"]) and all(r["state"] == "Ready" for r in health["replicas"])
