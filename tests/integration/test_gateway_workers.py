"""``api.workers: 2``: two gateway processes on one port (SO_REUSEPORT). Each serves connections; a task
admitted through one streams to its end through the other and is cancelled across them; /metrics sums
both workers' counters; a worker that dies is restarted; none outlives the gateway, however it ends.

Which worker holds a connection is read from the kernel: the server side of the connection (in
/proc/net/tcp) is a socket whose inode one of the workers has among its fds.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from llorch_cli.embedded_redis import process_alive
from tests.support.procs import Proc, free_port, python_module, wait_until
from tests.support.stack import SseEvent, Stack, mock_pool, sse_frames

PROC = Path("/proc")


def _children(pid: int) -> set[int]:
    """The live processes whose parent is ``pid``."""
    found = set()
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.add(int(entry.name))
    return found


def _owner(pids: set[int], client_port: int, server_port: int) -> int | None:
    """The process among ``pids`` that holds the server side of the connection from ``client_port``."""
    inode = ""
    for line in (PROC / "net" / "tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if (
            int(cols[1].rpartition(":")[2], 16) == server_port
            and int(cols[2].rpartition(":")[2], 16) == client_port
        ):
            inode = cols[9]
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(PROC / str(pid) / "fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(PROC / str(pid) / "fd" / fd) == f"socket:[{inode}]":
                        return pid
    return None


class Worker:
    """A client session whose one keep-alive connection, from local ``port``, the worker ``pid`` accepted."""

    def __init__(self, stack: Stack, pid: int, port: int, session: aiohttp.ClientSession) -> None:
        self.stack = stack
        self.pid = pid
        self.port = port
        self.session = session

    def check(self, pids: set[int]) -> None:
        """The connection is still the one this worker accepted."""
        assert _owner(pids, self.port, self.stack.api_port) == self.pid, "the connection changed worker"

    @contextlib.asynccontextmanager
    async def stream(self, task_id: str, pids: set[int]) -> AsyncIterator[AsyncIterator[SseEvent]]:
        async with self.session.get(f"{self.stack.url}/v1/tasks/{task_id}/stream") as r:
            assert r.status == 200, await r.text()
            self.check(pids)
            yield sse_frames(r.content)


async def _one_connection_per_worker(stack: Stack, pids: set[int]) -> tuple[dict[int, Worker], int]:
    """A session per worker (new connections until the kernel gave one to each); how many requests."""
    found: dict[int, Worker] = {}
    sent = 0

    async def each_seen() -> bool:
        nonlocal sent
        port = free_port()  # the client side's port, to find the connection in /proc/net/tcp
        connector = aiohttp.TCPConnector(limit=1, local_addr=("127.0.0.1", port))
        session = aiohttp.ClientSession(connector=connector, headers=stack.headers)
        async with session.get(f"{stack.url}/healthz") as r:
            sent += 1
            assert r.status == 200
            await r.read()
        owner = _owner(pids, port, stack.api_port)
        if owner is None or owner in found:
            await session.close()
        else:
            found[owner] = Worker(stack, owner, port, session)
        return len(found) == len(pids)

    await wait_until(each_seen, 60, "a connection accepted by each worker")
    return found, sent


async def _workers(stack: Stack) -> set[int]:
    gateway = stack.procs["gateway"].pid

    async def spawned() -> bool:
        return len(_children(gateway)) == 1

    await wait_until(spawned, 60, "the gateway's second worker")
    return {gateway, *_children(gateway)}


async def test_two_workers_serve_any_stream_sum_their_metrics_and_stop_together(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack: Stack = stack_factory(pools=[mock_pool(slots=2)], extra={"api": {"workers": 2}})
    await stack.start()
    pids = await _workers(stack)
    by_pid, healthz = await _one_connection_per_worker(stack, pids)
    try:
        a, b = by_pid.values()
        # Admitted through worker a, streamed to its end through worker b.
        async with a.session.post(
            f"{stack.url}/v1/tasks", json={"model_ref": "mock-tiny", "prompt": "hi", "max_tokens": 8}
        ) as r:
            assert r.status == 202, await r.text()
            a.check(pids)
            task_id = (await r.json())["task_id"]
        async with b.stream(task_id, pids) as frames:
            events = [e async for e in frames]
        assert [e.id for e in events] == list(range(len(events)))
        assert events[-1].event == "end" and len([e for e in events if e.event == "token"]) == 8, events

        # Streamed through b, cancelled through a: b's stream ends with the cancel.
        async with a.session.post(
            f"{stack.url}/v1/tasks", json={"model_ref": "mock-tiny", "prompt": "hi", "max_tokens": 2000}
        ) as r:
            assert r.status == 202, await r.text()
            long_id = (await r.json())["task_id"]
        seen: list[SseEvent] = []
        async with b.stream(long_id, pids) as frames:
            async for event in frames:
                seen.append(event)
                if event.event == "token" and len([e for e in seen if e.event == "token"]) == 1:
                    async with a.session.post(f"{stack.url}/v1/tasks/{long_id}/cancel") as r:
                        assert r.status == 204
                        a.check(pids)
        assert seen[-1].event == "error" and seen[-1].data["code"] == "CANCELED", seen[-3:]

        # /metrics, whichever worker answers, counts the probes both workers served.
        async with http.get(f"{stack.url}/metrics") as r:
            text = await r.text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        probes = families["gateway_http_requests"].samples
        assert (
            sum(s.value for s in probes if s.labels["route"] == "/healthz" and s.name.endswith("_total"))
            == healthz
        )
        up = {s.labels["component"]: s.value for s in families["component_up"].samples}
        assert [v for k, v in up.items() if k.startswith("gateway-worker-")] == [1.0], up
    finally:
        for worker in by_pid.values():
            await worker.session.close()

    # SIGTERM to the parent alone: it stops its worker, waits for it, and exits cleanly.
    parent = stack.procs["gateway"]
    os.kill(parent.pid, signal.SIGTERM)

    async def exited() -> bool:
        return not parent.alive()

    await wait_until(exited, 60, "the gateway to exit")
    assert parent.popen.returncode == 0, parent.log_text()[-3000:]
    assert not any(process_alive(pid) for pid in pids), "a gateway worker outlived the gateway"


async def test_a_dead_worker_is_restarted_a_second_group_is_refused_and_no_worker_outlives_its_parent(
    stack_factory: Any,
) -> None:
    stack: Stack = stack_factory(pools=[mock_pool()], extra={"api": {"workers": 2}})
    await stack.start()
    parent = stack.procs["gateway"].pid
    (first,) = await _workers(stack) - {parent}
    os.kill(first, signal.SIGKILL)

    async def replaced() -> bool:
        return bool(_children(parent) - {first})

    await wait_until(replaced, 60, "the parent to restart its worker")
    (second,) = _children(parent)
    by_pid, _ = await _one_connection_per_worker(stack, {parent, second})  # the new worker serves
    for worker in by_pid.values():
        await worker.session.close()

    # A second gateway on the same port is refused, rather than joining this one's workers.
    argv = python_module("llorch_cli.main", "gateway", "--config", str(stack.config_path))
    intruder = Proc(argv, stack.workdir / "gateway-2.log", stack.env)

    async def refused() -> bool:
        return not intruder.alive()

    try:
        await wait_until(refused, 60, "the second gateway to exit")
    finally:
        intruder.stop()
    assert intruder.popen.returncode != 0 and "is in use" in intruder.log_text(), intruder.log_text()[-2000:]

    os.kill(parent, signal.SIGKILL)

    async def gone() -> bool:
        return not process_alive(second)

    await wait_until(gone, 60, "the orphaned worker to stop by itself")
