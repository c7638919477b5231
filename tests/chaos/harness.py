"""Chaos harness: a stack whose every process (Redis included) can be killed, frozen and restarted.

- ``RestartableRedis`` (tests/support): valkey with AOF on a fixed port and data dir, killed and
  started again on the same port and data, so the services reconnect to the same URL.
- ``ChaosStack``: the config comes from ``tests.support.stack.Stack`` (free ports, tokens); each service
  (scheduler, two pool managers with one pool each, gateway) is its own ``llorch`` process, started and
  restarted here with the same argv, config and ports.
- ``Load``: submits tasks and follows each task's SSE stream to its terminal event, reconnecting with
  ``Last-Event-ID`` when the connection drops (the gateway may be killed), and checking seqs as it goes.
- ``audit``: reads each task's record, lease and event log straight from Redis (keys from ``Keys``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis

from llorch.config import load_config
from llorch.store import Keys
from tests.support.procs import Proc, python_module, wait_until
from tests.support.restartable_redis import RestartableRedis
from tests.support.stack import Stack, mock_pool

TOKEN_DELAY_MS = "20"
TERMINAL_EVENTS = frozenset({"end", "error"})  # SPEC §3
POOLS = ("mock-a", "mock-b")
SLOTS_PER_POOL = 4
READY_TIMEOUT_S = 90.0
STALL_S = 10.0
"""A stream with no byte for this long (heartbeats are every 1 s) is treated as dropped."""
SETTLE_TIMEOUT_S = 75.0
"""How long after recovery every admitted task has to reach its terminal event. Generous: a task whose
pool manager vanished ends through its 15 s lease and the 2 s sweeper."""


def chaos_pool(pool_id: str) -> dict[str, Any]:
    return mock_pool(
        pool_id,
        slots=SLOTS_PER_POOL,
        capacity=64,
        args=["--token-delay-ms", TOKEN_DELAY_MS],
        restart={"initial_backoff_ms": 100, "max_backoff_ms": 1000},
    )


class ChaosStack:
    """Scheduler, one pool manager per pool (``pm-<pool>``), gateway: each its own restartable process."""

    def __init__(self, workdir: Path, redis: RestartableRedis) -> None:
        self.redis = redis
        self.config = Stack(
            workdir,
            redis.url,
            pools=[chaos_pool(p) for p in POOLS],
            # Logs outlive the run, so the audit reads every task's log after the settle deadline.
            extra={"sse": {"retention_s": 900}},
        )
        self.workdir = workdir
        self.url = self.config.url
        self.headers = self.config.headers
        self.key_prefix = load_config(self.config.config_path).redis.key_prefix
        self.argv: dict[str, list[str]] = {"scheduler": ["scheduler"]}
        for index, pool in enumerate(POOLS):
            self.argv[f"pm-{pool}"] = ["pool-manager", "--index", str(index), "--pools", pool]
        self.argv["gateway"] = ["gateway"]
        self.procs: dict[str, Proc] = {}
        self.retired: list[Proc] = []

    def start(self, name: str) -> Proc:
        argv = python_module("llorch_cli.main", *self.argv[name], "--config", str(self.config.config_path))
        proc = Proc(argv, self.workdir / f"{name}.log", self.config.env)
        self.procs[name] = proc
        return proc

    async def start_all(self) -> None:
        for name in self.argv:
            self.start(name)
        await self.wait_ready()

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.procs[name].pid, sig)

    def kill(self, name: str) -> None:
        proc = self.procs[name]
        proc.kill(signal.SIGKILL)
        proc.popen.wait(10)

    def restart(self, name: str) -> Proc:
        old = self.procs[name]
        assert not old.alive(), f"{name} is still running"
        old.stop()
        self.retired.append(old)
        return self.start(name)

    async def pool_health(self, http: aiohttp.ClientSession, pool_id: str) -> dict[str, Any] | None:
        try:
            async with http.get(f"{self.url}/v1/pools/{pool_id}/health", headers=self.headers) as r:
                return dict(await r.json()) if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, json.JSONDecodeError):
            return None

    async def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """/readyz answers 200 and every pool is Ready with an engine process."""
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

            async def ready() -> bool:
                for name, proc in self.procs.items():
                    if not proc.alive():
                        raise AssertionError(f"{name} exited:\n{proc.log_text()[-3000:]}")
                try:
                    async with http.get(f"{self.url}/readyz") as r:
                        if r.status != 200:
                            return False
                except (aiohttp.ClientError, TimeoutError):
                    return False
                for pool in POOLS:
                    health = await self.pool_health(http, pool)
                    if not health or not health["ready"] or not any(r["pid"] for r in health["replicas"]):
                        return False
                return True

            await wait_until(ready, timeout_s, "the chaos stack to be ready")

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        for proc in self.retired:
            proc.stop()

    def logs_tail(self, chars: int = 2500) -> str:
        return "\n".join(f"--- {name}.log ---\n{p.log_text()[-chars:]}" for name, p in self.procs.items())


# -- load and stream following -----------------------------------------------------------------------


@dataclass
class Trace:
    """What one admitted task's SSE stream showed, across reconnects."""

    task_id: str
    phase: str  # load | fault | after
    admitted_at: float
    events: list[tuple[int, str, dict[str, Any]]] = field(default_factory=list)
    terminal: tuple[int, str, dict[str, Any]] | None = None
    ended_at: float | None = None
    anomalies: list[str] = field(default_factory=list)
    replay: str = ""  # for a lost task: what a fresh connection got at the end
    heartbeats: int = 0
    last_rx: float = 0.0  # monotonic time of the last line received
    connects: int = 0
    statuses: Counter[str] = field(default_factory=Counter)

    @property
    def last_seq(self) -> int:
        return self.events[-1][0] if self.events else -1

    @property
    def outcome(self) -> str:
        if self.terminal is None:
            return "LOST"
        return "end" if self.terminal[1] == "end" else str(self.terminal[2].get("code", "<no code>"))

    @property
    def tokens(self) -> int:
        return sum(1 for _, name, _ in self.events if name == "token")

    def summary(self) -> str:
        tail = [f"{s}:{n}" for s, n, _ in self.events[-3:]]
        return (
            f"{self.task_id} [{self.phase}] outcome={self.outcome} events={len(self.events)} "
            f"tokens={self.tokens} last={tail} connects={self.connects} statuses={dict(self.statuses)}"
            + (f" anomalies={self.anomalies}" if self.anomalies else "")
            + (f" heartbeats={self.heartbeats} last_rx_age={time.monotonic() - self.last_rx:.0f}s")
            + (f" fresh-replay=[{self.replay}]" if self.replay else "")
        )


class StreamBroken(Exception):
    pass


class Load:
    """Submit tasks and follow every admitted one to its terminal event, whatever the stack does."""

    def __init__(self, stack: ChaosStack) -> None:
        self.stack = stack
        self.traces: dict[str, Trace] = {}
        self.refused: Counter[str] = Counter()
        self._followers: list[asyncio.Task[None]] = []
        self._stop = asyncio.Event()
        # No total timeout: a stream lives as long as its task. A silent socket (heartbeats are 1 s)
        # is a broken stream: reconnect.
        self.http = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=10)
        )

    async def aclose(self) -> None:
        self._stop.set()
        for task in self._followers:
            task.cancel()
        await asyncio.gather(*self._followers, return_exceptions=True)
        await self.http.close()

    async def submit(self, phase: str, max_tokens: int) -> str | None:
        """POST one task; follow it when answered 202. Returns its id, or None when refused."""
        body = {"model_ref": "mock-tiny", "prompt": "chaos", "max_tokens": max_tokens}
        try:
            async with self.http.post(
                f"{self.stack.url}/v1/tasks",
                json=body,
                headers=self.stack.headers,
                timeout=aiohttp.ClientTimeout(total=15),
            ) as r:
                if r.status != 202:
                    text = await r.text()
                    code = ""
                    with contextlib.suppress(ValueError, AttributeError):
                        code = str(json.loads(text).get("code", ""))
                    self.refused[f"{phase}:{r.status}:{code}"] += 1
                    return None
                task_id = str((await r.json())["task_id"])
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.refused[f"{phase}:{type(exc).__name__}"] += 1
            return None
        trace = Trace(task_id, phase, time.monotonic())
        self.traces[task_id] = trace
        self._followers.append(asyncio.create_task(self._follow(trace)))
        return task_id

    async def _follow(self, trace: Trace) -> None:
        url = f"{self.stack.url}/v1/tasks/{trace.task_id}/stream"
        while trace.terminal is None and not self._stop.is_set():
            headers = dict(self.stack.headers)
            if trace.events:
                headers["Last-Event-ID"] = str(trace.last_seq)
            trace.connects += 1
            try:
                async with self.http.get(url, headers=headers) as r:
                    trace.statuses[str(r.status)] += 1
                    if r.status == 200:
                        await self._read(trace, r.content)
            except (aiohttp.ClientError, TimeoutError, StreamBroken) as exc:
                trace.statuses[type(exc).__name__] += 1
            if trace.terminal is None:
                # Back off between reconnects while the stack is down (pacing, not synchronisation).
                await asyncio.sleep(0.25)

    async def _read(self, trace: Trace, content: aiohttp.StreamReader) -> None:
        fields: dict[str, str] = {}
        after_terminal = trace.terminal is not None
        while True:
            try:
                async with asyncio.timeout(STALL_S):
                    raw = await content.readline()
            except TimeoutError:
                # Heartbeats come every second: a silent stream is broken even if the socket is open
                # (seen: an in-body `HTTP/1.1 500` leaves aiohttp's client waiting with no read timeout).
                trace.anomalies.append(
                    f"stream silent {STALL_S:.0f}s after seq {trace.last_seq}: reconnected"
                )
                raise StreamBroken("stalled") from None
            if not raw:
                return
            trace.last_rx = time.monotonic()
            line = raw.decode(errors="replace").rstrip("\r\n")
            if line.startswith(":"):
                trace.heartbeats += 1
                continue
            if line == "":
                if fields:
                    self._frame(trace, fields)
                    fields = {}
                    if trace.terminal is not None and not after_terminal:
                        after_terminal = True
                        await self._drain_after_terminal(trace, content)
                        return
                continue
            key, sep, value = line.partition(": ")
            if not sep or key not in ("id", "event", "data") or key in fields:
                trace.anomalies.append(f"bad SSE line after seq {trace.last_seq}: {line[:120]!r}")
                raise StreamBroken(line[:120])
            fields[key] = value

    def _frame(self, trace: Trace, fields: dict[str, str]) -> None:
        try:
            seq, name, data = int(fields["id"]), fields["event"], json.loads(fields["data"])
        except (KeyError, ValueError) as exc:
            trace.anomalies.append(f"bad frame after seq {trace.last_seq}: {fields} ({exc})")
            raise StreamBroken(str(fields)) from None
        if trace.terminal is not None:
            trace.anomalies.append(f"event after terminal: {seq}:{name}")
            return
        if seq != trace.last_seq + 1:
            trace.anomalies.append(f"seq {seq} ({name}) after {trace.last_seq}")
        trace.events.append((seq, name, data))
        if name in TERMINAL_EVENTS:
            trace.terminal = (seq, name, data)
            trace.ended_at = time.monotonic()

    async def _drain_after_terminal(self, trace: Trace, content: aiohttp.StreamReader) -> None:
        """The response closes after the terminal event; anything but heartbeats before it is a bug."""
        try:
            async with asyncio.timeout(3):
                async for raw in content:
                    line = raw.decode(errors="replace").strip()
                    if line and not line.startswith(":"):
                        trace.anomalies.append(f"after terminal: {line[:120]!r}")
        except TimeoutError:
            trace.anomalies.append("stream still open 3 s after its terminal event")

    async def replay(self, task_id: str, timeout_s: float = 5.0) -> str:
        """What a fresh connection replays for a task, from seq 0, within ``timeout_s`` (diagnosis of
        a stream that never got its terminal event: is the log ended, or is the live feed stuck?)."""
        seen: list[str] = []
        try:
            async with asyncio.timeout(timeout_s):
                async with self.http.get(
                    f"{self.stack.url}/v1/tasks/{task_id}/stream", headers=self.stack.headers
                ) as r:
                    if r.status != 200:
                        return f"status {r.status}: {(await r.text())[:200]}"
                    async for raw in r.content:
                        line = raw.decode(errors="replace").strip()
                        if line.startswith("id: "):
                            seen.append(line[4:])
                        elif line.startswith("event: "):
                            seen[-1] += ":" + line[7:]
        except TimeoutError:
            return f"{len(seen)} events, open after {timeout_s}s, last {seen[-3:]}"
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__} after {len(seen)} events"
        return f"{len(seen)} events then closed, last {seen[-3:]}"

    def count_with_token(self) -> int:
        return sum(1 for t in self.traces.values() if t.tokens)

    async def wait_tokens(self, n: int, timeout_s: float = 60) -> None:
        async def streaming() -> bool:
            return self.count_with_token() >= n

        await wait_until(streaming, timeout_s, f"{n} tasks streaming tokens")

    async def wait_settled(self, timeout_s: float = SETTLE_TIMEOUT_S) -> bool:
        """True when every admitted task has its terminal event; False at the deadline."""
        deadline = time.monotonic() + timeout_s
        while any(t.terminal is None for t in self.traces.values()):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.1)
        return True

    async def trickle(self, phase: str, until: asyncio.Event, every_s: float = 0.4) -> None:
        """Submit a short task every ``every_s`` until ``until`` is set (probes during a fault)."""
        while not until.is_set():
            await self.submit(phase, max_tokens=20)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(until.wait(), every_s)

    async def submit_after_recovery(self, n: int, timeout_s: float = 30) -> list[str]:
        """Submit ``n`` tasks once the stack takes them again, retrying refusals until the deadline;
        returns the ids admitted (fewer than ``n`` when the deadline passed)."""
        ids: list[str] = []
        deadline = time.monotonic() + timeout_s
        while len(ids) < n and time.monotonic() < deadline:
            task_id = await self.submit("after", max_tokens=20)
            if task_id is None:
                await asyncio.sleep(0.25)  # pacing retries of a refused POST
                continue
            ids.append(task_id)
        return ids


async def raw_witness(stack: ChaosStack, task_id: str, sink: list[tuple[float, bytes]]) -> None:
    """Follow one task's stream on a raw socket and keep every byte with its arrival time: shows what
    the gateway really writes when a stream breaks (an HTTP client library may hide it)."""
    host, _, port = stack.url.removeprefix("http://").partition(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    auth = stack.headers["Authorization"]
    writer.write(
        f"GET /v1/tasks/{task_id}/stream HTTP/1.1\r\nHost: {host}\r\nAuthorization: {auth}\r\n\r\n".encode()
    )
    try:
        while data := await reader.read(65536):
            sink.append((time.monotonic(), data))
    finally:
        writer.close()


# -- Redis audit -------------------------------------------------------------------------------------


@dataclass
class Audit:
    task_id: str
    record: dict[str, str]
    leased: bool
    log: list[tuple[int, str, str]]  # (seq, name, data)
    problems: list[str]

    def summary(self) -> str:
        keep = ("state", "terminal", "seq", "tokens_out", "manager", "pool_id", "replica_id", "rs", "error")
        rec = {k: self.record[k] for k in keep if k in self.record}
        tail = [(s, n, d[:100]) for s, n, d in self.log[-2:]]
        return f"record={rec} leased={self.leased} log_len={len(self.log)} log_tail={tail}"


def _entry_events(entry_id: str, body: dict[str, str]) -> list[tuple[int, str, str]]:
    """(seq, name, data) of one log entry, read here without the store: one event ``{e, d}``, or
    ``{n, b}``: n events ``name US data US ...`` from the entry id's seq on (store.py's docstring)."""
    first = int(entry_id.split("-", 1)[1]) - 1
    if "b" not in body:
        return [(first, body["e"], body["d"])]
    parts = body["b"].split("\x1f")
    if len(parts) != 2 * int(body["n"]):
        raise AssertionError(f"entry {entry_id} holds {len(parts)} parts, not n={body['n']} events")
    return [(first + k, parts[2 * k], parts[2 * k + 1]) for k in range(len(parts) // 2)]


async def audit(redis_url: str, prefix: str, task_ids: list[str]) -> tuple[dict[str, Audit], list[str]]:
    """Per task: record, lease, event log, and what is wrong with them; plus store-wide problems
    (records `running` without a lease, queue entries without a record)."""
    keys = Keys(prefix)
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    audits: dict[str, Audit] = {}
    problems: list[str] = []
    try:
        for task_id in task_ids:
            rs_of = await client.get(keys.locator(task_id)) or ""
            record = await client.hgetall(keys.task(rs_of, task_id))
            entries = await client.xrange(keys.events(rs_of, task_id))
            log = [event for eid, body in entries for event in _entry_events(eid, body)]
            leased = bool(record.get("rs")) and (
                await client.zscore(keys.lease(record["rs"]), task_id) is not None
            )
            wrong: list[str] = []
            seqs = [s for s, _, _ in log]
            if seqs != list(range(len(seqs))):
                wrong.append(f"log seqs not contiguous from 0: {seqs[:5]}...{seqs[-5:]}")
            terminals = [i for i, (_, name, _) in enumerate(log) if name in TERMINAL_EVENTS]
            if len(terminals) > 1 or (terminals and terminals[0] != len(log) - 1):
                wrong.append(f"terminal events at {terminals} of {len(log)}")
            if record.get("state") == "running" and record.get("terminal") != "1" and not leased:
                wrong.append("record running without a lease")
            audits[task_id] = Audit(task_id, record, leased, log, wrong)
        # Store-wide: every task record, and every queue of every replica set.
        async for key in client.scan_iter(match=keys.task("*", "*"), count=500):
            record = await client.hgetall(key)
            if record.get("state") == "running" and record.get("terminal") != "1":
                rs = record.get("rs", "")
                task_id = key.rpartition("}:")[2]
                if not rs or await client.zscore(keys.lease(rs), task_id) is None:
                    problems.append(f"{task_id}: record running without a lease ({record.get('manager')})")
        for rs in await client.smembers(keys.replica_sets()):
            for priority in ("interactive", "batch"):
                for task_id in await client.zrange(keys.queue(rs, priority), 0, -1):
                    if not await client.exists(keys.task(rs, task_id)):
                        problems.append(f"{task_id}: queued in {rs}/{priority} without a record")
    finally:
        await client.aclose()
    return audits, problems


# -- one fault, start to finish ----------------------------------------------------------------------

LOAD_TASKS = 20
LOAD_MAX_TOKENS = 150  # ~3 s per task at 20 ms/token; 20 tasks on 8 slots run for ~9 s


@dataclass
class Outcome:
    fault: str
    traces: dict[str, Trace]
    after: list[str]
    audits: dict[str, Audit]
    store_problems: list[str]
    refused: Counter[str]
    recovery_s: float | None = None
    settled: bool = True
    after_wanted: int = 0

    def report(self) -> str:
        traces = list(self.traces.values())
        codes = Counter(t.outcome for t in traces if t.outcome not in ("end", "LOST"))
        lost = [t for t in traces if t.terminal is None]
        lines = [
            f"CHAOS {self.fault}: admitted={len(traces)} end={sum(t.outcome == 'end' for t in traces)} "
            f"errors={dict(sorted(codes.items()))} lost={len(lost)} "
            f"refused={dict(sorted(self.refused.items()))}",
            f"CHAOS {self.fault}: after recovery {len(self.after)} submitted, "
            f"{sum(self.traces[t].outcome == 'end' for t in self.after)} ended `end`",
        ]
        if self.recovery_s is not None or self.fault == "redis":
            shown = "never" if self.recovery_s is None else f"{self.recovery_s:.2f}s"
            lines.append(f"CHAOS {self.fault}: recovery (first task completed after restart) = {shown}")
        for trace in traces:
            audit_ = self.audits.get(trace.task_id)
            if trace.terminal is None or trace.anomalies or (audit_ and audit_.problems):
                lines.append(f"  {trace.summary()}")
                if audit_:
                    lines.append(f"    redis: {audit_.summary()} problems={audit_.problems}")
        lines.extend(f"  store: {p}" for p in self.store_problems)
        return "\n".join(lines)

    def failures(self) -> list[str]:
        failed: list[str] = []
        for trace in self.traces.values():
            if trace.terminal is None:
                failed.append(f"lost: {trace.task_id}")
            if trace.anomalies:
                failed.append(f"stream anomalies: {trace.task_id}: {trace.anomalies}")
            audit_ = self.audits.get(trace.task_id)
            if audit_ and audit_.problems:
                failed.append(f"store: {trace.task_id}: {audit_.problems}")
            if (
                trace.terminal is not None
                and trace.terminal[1] == "error"
                and not trace.terminal[2].get("code")
            ):
                failed.append(f"error without a code: {trace.task_id}: {trace.terminal}")
            if audit_ and trace.terminal is not None:
                live = [(s, n) for s, n, _ in trace.events]
                logged = [(s, n) for s, n, _ in audit_.log]
                if live != logged:
                    failed.append(
                        f"stream differs from the log: {trace.task_id}: {live[-3:]} vs {logged[-3:]}"
                    )
        failed.extend(f"store: {p}" for p in self.store_problems)
        # A refusal during a fault must say "retry" (503 with Retry-After), never a bare 500.
        failed.extend(f"refused with {k} x{n}" for k, n in self.refused.items() if ":500:" in k)
        not_ended = [t for t in self.after if self.traces[t].outcome != "end"]
        if len(self.after) < self.after_wanted:
            failed.append(f"only {len(self.after)} of {self.after_wanted} tasks admitted after recovery")
        if not_ended:
            failed.append(f"tasks after recovery did not end `end`: {not_ended}")
        return failed


Fault = Callable[[ChaosStack, Load], Awaitable[float | None]]
"""Applies the fault and recovers from it; returns the moment (monotonic) recovery-time counts from."""


async def run_fault(name: str, stack: ChaosStack, fault: Fault, after_tasks: int = 4) -> Outcome:
    """Load, fault, recovery, settle, audit. Steps after the fault record their failure and go on, so
    the counts are always printed."""
    load = Load(stack)
    recovery_problems: list[str] = []
    try:
        for _ in range(LOAD_TASKS):
            assert await load.submit("load", LOAD_MAX_TOKENS), f"load refused: {load.refused}"
        await load.wait_tokens(2 * SLOTS_PER_POOL)
        done = asyncio.Event()
        probes = asyncio.create_task(load.trickle("fault", done))
        try:
            restarted_at = await fault(stack, load)
        finally:
            done.set()
            await probes
        after: list[str] = []
        try:
            await stack.wait_ready()
            after = await load.submit_after_recovery(after_tasks)
        except AssertionError as exc:
            recovery_problems.append(str(exc).splitlines()[0])
        settled = await load.wait_settled()
        recovery_s = None
        if restarted_at is not None:
            ends = [t.ended_at for t in load.traces.values() if t.outcome == "end" and t.ended_at]
            later = [e for e in ends if e > restarted_at]
            recovery_s = min(later) - restarted_at if later else None
        audits, store_problems = await audit(stack.redis.url, stack.key_prefix, list(load.traces))
        lost = [t for t in load.traces.values() if t.terminal is None]
        replays = await asyncio.gather(*(load.replay(t.task_id) for t in lost))
        for trace, replay in zip(lost, replays, strict=True):
            trace.replay = replay
        return Outcome(
            name,
            dict(load.traces),
            after,
            audits,
            store_problems + recovery_problems,
            load.refused,
            recovery_s,
            settled,
            after_tasks,
        )
    finally:
        await load.aclose()
