"""The operator commands as an operator runs them: `llorch models|pools ...` and `llorch down` as real
subprocesses against a real stack, their effects checked through the HTTP API."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llorch_cli import pidfile
from llorch_cli.embedded_redis import process_alive
from tests.support.procs import Proc, python_module, wait_until
from tests.support.stack import Client, Stack, mock_pool

CLI_S = 120.0
READY_S = 120.0


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


async def llorch(stack: Stack, *args: str, env: dict[str, str] | None = None) -> Run:
    """`llorch <args> --config <the stack's>` with the stack's environment (its token)."""
    argv = python_module("llorch_cli.main", *args, "--config", str(stack.config_path))
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env={**os.environ, **stack.env, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), CLI_S)
    run = Run(proc.returncode if proc.returncode is not None else -1, out.decode(), err.decode())
    assert "Traceback" not in run.err, run.err
    return run


async def api(http: aiohttp.ClientSession, stack: Stack, method: str, path: str, body: Any = None) -> Any:
    async with http.request(method, f"{stack.url}{path}", json=body, headers=stack.headers) as r:
        return r.status, await r.json()


async def pool_state(http: aiohttp.ClientSession, stack: Stack, pool_id: str) -> str:
    status, health = await api(http, stack, "GET", f"/v1/pools/{pool_id}/health")
    assert status == 200, health
    return str(health["state"])


async def wait_state(http: aiohttp.ClientSession, stack: Stack, pool_id: str, state: str) -> None:
    async def reached() -> bool:
        return await pool_state(http, stack, pool_id) == state

    await wait_until(reached, READY_S, f"{pool_id} to be {state}")


async def test_models_list_add_verify_and_state(
    stack_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    stack: Stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    spare = tmp_path / "spare.bin"
    spare.write_bytes(b"another model")
    digest = "sha256:" + hashlib.sha256(spare.read_bytes()).hexdigest()

    listed = await llorch(stack, "models", "list")
    assert listed.code == 0, listed
    header, *rows = listed.out.splitlines()
    assert header.split()[:3] == ["ID", "STATE", "TRUSTED"]
    assert [row.split()[:2] for row in rows] == [["mock-tiny", "Active"]]

    added = await llorch(stack, "models", "add", "spare", str(spare), "--digest", digest, "--tag", "test")
    assert added.code == 0, added
    assert added.out.startswith("spare: Draft, verification never"), added.out
    verified = await llorch(stack, "models", "verify", "spare")
    assert verified.code == 0, verified
    assert verified.out.startswith(f"spare: pass, trusted yes, digest {digest}"), verified.out
    changed = await llorch(stack, "models", "state", "spare", "Active")
    assert (changed.code, changed.out) == (0, "spare: Draft -> Active\n"), changed

    status, entry = await api(http, stack, "GET", "/v1/catalog/models/spare")
    assert status == 200 and entry["state"] == "Active" and entry["trusted"] is True, entry
    assert entry["tags"] == ["test"] and entry["path"] == str(spare)
    tagged = await llorch(stack, "models", "list", "--tag", "test")
    assert [row.split()[:3] for row in tagged.out.splitlines()[1:]] == [["spare", "Active", "yes"]]


async def test_pools_drain_lets_the_running_task_finish_then_resume(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack: Stack = stack_factory(pools=[mock_pool("mock-a", args=["--token-delay-ms", "20"])])
    await stack.start()
    await wait_state(http, stack, "mock-a", "Ready")
    client = Client(stack, http)
    task_id = await client.admit(max_tokens=100)

    async def dispatched() -> bool:
        return bool((await client.status(task_id))["pool_id"])

    await wait_until(dispatched, READY_S, "the task to be dispatched")
    drained = await llorch(stack, "pools", "drain", "mock-a", "--deadline-s", "60")
    assert drained.code == 0, drained
    assert drained.out.splitlines()[0] == "mock-a: draining (deadline 60 s)"
    assert drained.out.splitlines()[-1] == "mock-a: Drained, nothing running", drained.out
    assert (await client.events(task_id))[-1].event == "end"  # it ran to its end, within the deadline
    assert await pool_state(http, stack, "mock-a") == "Drained"

    listed = await llorch(stack, "pools", "list")
    assert listed.code == 0 and listed.out.splitlines()[1].split()[:3] == ["mock-a", "Drained", "mock-tiny"]
    resumed = await llorch(stack, "pools", "resume", "mock-a")
    assert resumed.code == 0 and resumed.out.startswith("mock-a: resume accepted"), resumed
    await wait_state(http, stack, "mock-a", "Ready")
    assert (await client.events(await client.admit(max_tokens=2)))[-1].event == "end"


async def test_bad_input_exits_non_zero_with_the_api_message(
    stack_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    stack: Stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    status, error = await api(http, stack, "POST", "/v1/pools/no-such-pool/drain", {"deadline_ms": 1000})
    assert status == 404
    run = await llorch(stack, "pools", "drain", "no-such-pool")
    assert run.code == 1 and run.out == ""
    assert run.err.splitlines()[0] == f"llorch pools drain: {error['code']}: {error['message']}", run.err

    status, error = await api(http, stack, "POST", "/v1/catalog/models/nope/state", {"state": "Active"})
    assert status == 404
    run = await llorch(stack, "models", "state", "nope", "Active")
    assert run.code == 1 and run.err.splitlines()[0] == f"llorch models state: NOT_FOUND: {error['message']}"

    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token")
    run = await llorch(stack, "pools", "list", "--token-file", str(wrong))
    assert run.code == 1 and run.err == "llorch pools list: FORBIDDEN: the API token is not valid\n", run.err
    run = await llorch(stack, "pools", "list", "--url", "http://127.0.0.1:1")
    assert run.code == 1 and "UNREACHABLE: cannot reach the gateway at http://127.0.0.1:1" in run.err
    run = await llorch(stack, "models", "add", "x", "/tmp/x", "--signature", "no-colons")
    assert run.code == 1 and "expected SIGNER:ALGO:SIG" in run.err
    run = await llorch(stack, "down")  # this stack runs its services one by one, without `llorch up`
    assert run.code == 1 and "no llorch up is running on state dir" in run.err, run.err


def _descendants(pid: int) -> set[int]:
    found: set[int] = set()
    todo = [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found.update(children)
            todo.extend(children)
    return found


class UpRun:
    """A real `llorch up` on the mock engine with its own embedded Redis and state dir."""

    def __init__(self, workdir: Path) -> None:
        self.stack = Stack(
            workdir, "", [mock_pool(args=["--token-delay-ms", "20"])], extra={"redis": {"url": None}}
        )
        argv = python_module("llorch_cli.main", "up", "--config", str(self.stack.config_path))
        self.proc = Proc(argv, workdir / "up.log", self.stack.env)
        self.seen: set[int] = set()

    async def wait_ready(self) -> None:
        async def ready() -> bool:
            assert self.proc.alive(), self.proc.log_text()[-3000:]
            try:
                async with aiohttp.ClientSession() as s, s.get(f"{self.stack.url}/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(ready, READY_S, "llorch up to be ready")

    def stop(self) -> None:
        self.seen |= _descendants(self.proc.pid) if self.proc.alive() else set()
        self.proc.stop(timeout_s=60)
        for pid in self.seen:  # never leak a process on the shared machine, whatever the test did
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def up_run(tmp_path: Path) -> Iterator[UpRun]:
    run = UpRun(tmp_path)
    yield run
    run.stop()


async def test_down_drains_then_stops_up_and_every_child(up_run: UpRun, http: aiohttp.ClientSession) -> None:
    stack = up_run.stack
    await up_run.wait_ready()
    pid_path = pidfile.path_in(stack.workdir / "state")
    owner = pidfile.read(pid_path)
    assert owner is not None and owner.pid == up_run.proc.pid and owner.running()

    client = Client(stack, http)
    task_id = await client.admit(max_tokens=100)

    async def dispatched() -> bool:
        return bool((await client.status(task_id))["pool_id"])

    await wait_until(dispatched, READY_S, "the task to be dispatched")
    children = _descendants(up_run.proc.pid)
    up_run.seen |= children
    assert len(children) >= 5, children  # redis, scheduler, pool manager, its engine, gateway
    follow = asyncio.create_task(client.events(task_id))  # the stream is open while down drains

    down = await llorch(stack, "down", "--deadline-s", "60")
    assert down.code == 0, (down, up_run.proc.log_text()[-3000:])
    assert (await follow)[-1].event == "end"  # drained: the running task finished
    lines = down.out.splitlines()
    assert lines[0] == f"llorch up is running (pid {up_run.proc.pid}, state dir {stack.workdir / 'state'})"
    assert "every pool drained" in lines and lines[-1].startswith("llorch up stopped"), down.out
    assert any(line.startswith("  stopped: gateway (pid ") for line in lines), down.out

    assert not up_run.proc.alive() and up_run.proc.popen.returncode == 0
    assert not [pid for pid in children if process_alive(pid)]
    assert not pid_path.exists()

    again = await llorch(stack, "down")
    assert again.code == 1 and "no llorch up is running on state dir" in again.err, again
    pid_path.write_text(json.dumps({"pid": owner.pid, "started": owner.started}))  # as a SIGKILL leaves it
    stale = await llorch(stack, "down")
    assert stale.code == 1 and f"pid {owner.pid} is gone (removed the stale {pid_path})" in stale.err
    assert not pid_path.exists()
