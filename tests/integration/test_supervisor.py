"""`llorch up` as a supervisor (issue 10, item 6): real `llorch up` processes on free ports, each with its
own state dir and embedded Redis; faults are SIGKILLs of its children or of `llorch up` itself."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from redis import asyncio as aioredis

from llorch.resilience import RestartPolicy
from llorch_cli.embedded_redis import PID_NAME, EmbeddedRedis, process_alive, server_binary
from tests.support.procs import Proc, free_port, python_module, wait_until
from tests.support.stack import Client, Stack, mock_pool

READY_S = 120.0
GONE_S = 60.0


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def _cwd(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/cwd")


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, found through /proc/<pid>/task/*/children."""
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            for child in children:
                if child not in found:
                    found.add(child)
                    todo.append(child)
    return found


class Up:
    """One `llorch up` on the mock engine with an embedded Redis, driven like an operator would."""

    def __init__(self, workdir: Path) -> None:
        self.stack = Stack(workdir, "", [mock_pool()], extra={"redis": {"url": None}})
        self.workdir = workdir
        self.runs: list[Proc] = []

    @property
    def proc(self) -> Proc:
        return self.runs[-1]

    def start(self) -> Proc:
        argv = python_module("llorch_cli.main", "up", "--config", str(self.stack.config_path))
        self.runs.append(Proc(argv, self.workdir / f"up-{len(self.runs)}.log", self.stack.env))
        return self.proc

    def events(self, event: str, child: str | None = None) -> list[dict[str, Any]]:
        """The supervisor's own JSON log lines of one event (its children log to the same file)."""
        lines = []
        for raw in self.proc.log_text().splitlines():
            if not raw.startswith("{"):
                continue
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue
            mine = line.get("service") == "up" and line.get("event") == event
            if mine and (child is None or line.get("child") == child):
                lines.append(line)
        return lines

    def pid(self, child: str) -> int | None:
        started = self.events("child_started", child)
        return int(started[-1]["pid"]) if started else None

    async def wait_pid(self, child: str, other_than: int | None = None) -> int:
        async def started() -> bool:
            if not self.proc.alive():
                raise AssertionError(f"llorch up exited:\n{self.proc.log_text()[-3000:]}")
            pid = self.pid(child)
            return pid is not None and pid != other_than

        await wait_until(started, READY_S, f"{child} to be started")
        pid = self.pid(child)
        assert pid is not None
        return pid

    async def wait_ready(self) -> None:
        async def ready() -> bool:
            if not self.proc.alive():
                raise AssertionError(f"llorch up exited:\n{self.proc.log_text()[-3000:]}")
            try:
                async with aiohttp.ClientSession() as s, s.get(f"{self.stack.url}/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(ready, READY_S, "llorch up to be ready")

    async def wait_exit(self) -> int:
        async def exited() -> bool:
            return not self.proc.alive()

        await wait_until(exited, READY_S, "llorch up to exit")
        code = self.proc.popen.returncode
        assert code is not None
        return code

    def stop(self) -> None:
        for run in self.runs:
            known = _descendants(run.pid) if run.alive() else set()
            run.stop(timeout_s=30)
            for pid in known:  # never leak a child on the shared machine, whatever the test did
                if process_alive(pid):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    stack = Up(tmp_path)
    yield stack
    stack.stop()


@pytest.fixture
async def client(up: Up) -> AsyncIterator[Client]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield Client(up.stack, session)


async def _task_completes(client: Client) -> None:
    """A task admitted now streams to `end`; while a restarted service reconnects, POSTs may fail."""
    task_id: str | None = None

    async def admitted() -> bool:
        nonlocal task_id
        try:
            status, payload, _ = await client.submit(max_tokens=4)
        except aiohttp.ClientError:
            return False
        if status == 202:
            task_id = str(payload["task_id"])
        return task_id is not None

    await wait_until(admitted, READY_S, "a task to be admitted")
    assert task_id is not None
    events = await client.events(task_id)
    assert events[-1].event == "end", events[-1]


async def _restarts(client: Client, service: str) -> float:
    async with client.session.get(f"{client.stack.url}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    found = re.search(rf'^llorch_service_restarts_total\{{service="{service}"\}} (\S+)$', text, re.M)
    assert found is not None, text
    return float(found.group(1))


def test_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(initial_s=0.5, max_s=4.0)
    assert [policy.delay_s(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 4.0, 4.0]


async def test_a_killed_scheduler_is_restarted_and_counted(up: Up, client: Client) -> None:
    up.start()
    await up.wait_ready()
    first = await up.wait_pid("scheduler")
    os.kill(first, signal.SIGKILL)
    await up.wait_pid("scheduler", other_than=first)
    restart = up.events("child_restart", "scheduler")[0]
    assert restart["exit_code"] == -signal.SIGKILL and restart["attempt"] == 1, restart
    assert restart["delay_ms"] > 0, restart
    await up.wait_ready()
    await _task_completes(client)
    assert not up.events("metrics_unavailable")
    assert await _restarts(client, "scheduler") == 1
    assert await _restarts(client, "gateway") == 0

    children = _descendants(up.proc.pid)  # a graceful stop: every child exits, none is restarted
    restarts = len(up.events("child_restart"))
    up.proc.kill(signal.SIGTERM)
    assert await up.wait_exit() == 0
    assert not [pid for pid in children if process_alive(pid)]
    assert len(up.events("child_restart")) == restarts


def _redis_port(up: Up) -> int:
    found = re.search(r"embedded Redis on 127\.0\.0\.1:(\d+)", up.proc.log_text())
    assert found is not None
    return int(found.group(1))


async def test_a_killed_redis_is_restarted_on_the_same_port_and_dir(up: Up, client: Client) -> None:
    up.start()
    await up.wait_ready()
    first = await up.wait_pid("redis")
    password = (up.stack.workdir / "state" / "redis.password").read_text()  # `llorch up` generated it
    store = aioredis.Redis(port=_redis_port(up), password=password)
    try:
        await store.set("supervisor-test", "kept")
        await store.execute_command("WAITAOF", 1, 0, 10_000)  # on disk before the kill
        data_dir = _cwd(first)  # Redis chdirs to its --dir
        os.kill(first, signal.SIGKILL)
        second = await up.wait_pid("redis", other_than=first)
        assert _cwd(second) == data_dir
        assert await store.get("supervisor-test") == b"kept"  # same port, AOF replayed
    finally:
        await store.aclose()
    assert await _restarts(client, "redis") == 1


async def test_a_task_completes_after_redis_is_restarted(up: Up, client: Client) -> None:
    up.start()
    await up.wait_ready()
    await _task_completes(client)
    first = await up.wait_pid("redis")
    os.kill(first, signal.SIGKILL)
    await up.wait_pid("redis", other_than=first)
    await up.wait_ready()  # until then the stack answers 503 (retriable) while Redis reloads its AOF
    await asyncio.wait_for(_task_completes(client), READY_S)


async def test_a_killed_up_takes_every_child_with_it_and_a_new_up_starts(up: Up, client: Client) -> None:
    up.start()
    await up.wait_ready()
    redis_pid = await up.wait_pid("redis")
    children = _descendants(up.proc.pid)
    assert redis_pid in children
    assert len(children) >= 5, children  # redis, scheduler, pool manager, its engine, gateway
    up.proc.kill(signal.SIGKILL)

    async def all_gone() -> bool:
        return not any(process_alive(pid) for pid in children)

    await wait_until(all_gone, GONE_S, "every child of the killed llorch up to exit")
    up.start()  # same config, same state dir: the lock file left behind must not block it
    await up.wait_ready()
    await _task_completes(client)


async def test_a_second_up_on_a_redis_dir_in_use_is_refused(up: Up) -> None:
    up.start()
    await up.wait_pid("redis")
    argv = python_module("llorch_cli.main", "up", "--config", str(up.stack.config_path))
    second = await asyncio.create_subprocess_exec(
        *argv, env={**os.environ, **up.stack.env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, err = await asyncio.wait_for(second.communicate(), READY_S)
    stderr = err.decode()
    assert second.returncode != 0
    assert "is in use by another process" in stderr, stderr
    assert f"pid {up.proc.pid}" in stderr, stderr
    assert up.proc.alive()


def test_an_orphaned_server_on_the_dir_is_stopped_before_a_new_one_starts(tmp_path: Path) -> None:
    data = tmp_path / "redis"
    data.mkdir()
    port = free_port()
    orphan = subprocess.Popen(
        [server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", ""],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    probe = redis.Redis(port=port, socket_connect_timeout=0.2)
    try:
        deadline = time.monotonic() + READY_S
        while not _pings(probe):
            assert orphan.poll() is None and time.monotonic() < deadline, "the orphan did not start"
            time.sleep(0.02)  # the poll interval of wait_until
        (data / PID_NAME).write_text(f"{orphan.pid}\n")  # as a SIGKILLed holder of the lock leaves it
        server = EmbeddedRedis(tmp_path, appendonly=False)
        server.start()
        try:
            assert orphan.wait(30) is not None
            assert int((data / PID_NAME).read_text()) == server.pid
        finally:
            server.stop()
    finally:
        probe.close()
        if orphan.poll() is None:
            orphan.kill()
        orphan.wait()


async def test_a_service_that_keeps_dying_makes_up_give_up(up: Up) -> None:
    up.start()
    await up.wait_pid("gateway")  # started last: every child is up now
    pid = await up.wait_pid("scheduler")
    children = _descendants(up.proc.pid)
    for kill in range(1, 6):
        os.kill(pid, signal.SIGKILL)
        if kill < 5:
            pid = await up.wait_pid("scheduler", other_than=pid)
    assert await up.wait_exit() == 1
    log = up.proc.log_text()
    assert "giving up: scheduler exited 5 times within 60 s" in log, log[-3000:]

    async def all_gone() -> bool:
        return not any(process_alive(p) for p in children)

    await wait_until(all_gone, GONE_S, "every child of llorch up to be stopped")
