"""The client commands as a user runs them: `llorch status|submit|tasks` as real subprocesses against a
real stack (mock pools), their output checked against what the HTTP API says."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from llorch_mockengine.generation import completion_text
from tests.support.procs import free_port, python_module, wait_until
from tests.support.stack import MOCK_MODEL, Client, Stack, mock_pool

CLI_S = 60.0
OUTPUT_S = 60.0


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


def cli_env(stack: Stack, home: Path, **extra: str) -> dict[str, str]:
    """The stack's environment (its token in LLORCH_API_TOKEN) in a home without a config file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLORCH_")}
    return {**env, **stack.env, "HOME": str(home), "COLUMNS": "200", **extra}


def argv(stack: Stack, *args: str, config: bool, url: str | None = None) -> list[str]:
    """With ``config`` the stack's config names the gateway; else ``--url`` and the env token do."""
    where = ["--config", str(stack.config_path)] if config else ["--url", url or stack.url]
    return python_module("llorch_cli.main", *args, *where)


async def llorch(
    stack: Stack, home: Path, *args: str, config: bool = False, url: str | None = None, **env: str
) -> Run:
    proc = await asyncio.create_subprocess_exec(
        *argv(stack, *args, config=config, url=url),
        env=cli_env(stack, home, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), CLI_S)
    run = Run(proc.returncode if proc.returncode is not None else -1, out.decode(), err.decode())
    assert "Traceback" not in run.err, run.err
    return run


async def read_until(stream: asyncio.StreamReader, wanted: str, seen: bytearray) -> None:
    """Read ``stream`` into ``seen`` until it holds ``wanted``; fail after OUTPUT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + OUTPUT_S
    while wanted.encode() not in seen:
        chunk = await asyncio.wait_for(stream.read(4096), max(0.1, deadline - loop.time()))
        assert chunk, f"the output ended without {wanted!r}: {seen.decode(errors='replace')}"
        seen += chunk


async def forbidden(http: aiohttp.ClientSession, stack: Stack) -> str:
    """The API's own line for a wrong token: ``CODE: message``."""
    async with http.get(f"{stack.url}/v1/tasks", headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 403
        refusal = await r.json()
    return f"{refusal['code']}: {refusal['message']}"


async def test_status_once_as_json_and_as_tables_and_live(
    stack_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    stack: Stack = stack_factory(pools=[mock_pool("mock-a"), mock_pool("mock-b")])
    await stack.start()

    async def settled() -> bool:
        """Both pools Ready with their one slot free as the API reports them, so the views are exact."""
        async with http.get(f"{stack.url}/v1/status", headers=stack.headers) as r:
            pools = (await r.json())["pools"] if r.status == 200 else []
        slots = [(p["state"], p["metrics"]["slots_free"], p["metrics"]["slots_total"]) for p in pools]
        return slots == [("Ready", 1, 1)] * 2

    await wait_until(settled, 60, "both pools Ready with a free slot")

    as_json = await llorch(stack, tmp_path, "status", "--once", "--json", config=True)
    assert as_json.code == 0, as_json.err
    snapshot = json.loads(as_json.out)
    assert sorted(p["pool_id"] for p in snapshot["pools"]) == ["mock-a", "mock-b"]
    assert {p["state"] for p in snapshot["pools"]} == {"Ready"}
    assert [rs["model_id"] for rs in snapshot["replica_sets"]] == ["mock-tiny"]
    assert snapshot["running"] == [] and isinstance(snapshot["version"], str)

    tables = await llorch(stack, tmp_path, "status", "--once")
    assert tables.code == 0, tables.err
    lines = [line.split() for line in tables.out.splitlines()]
    assert lines[0][:2] == ["llama-orch", snapshot["version"]]
    rows = {line[0]: line for line in lines if line and line[0] in ("mock-a", "mock-b")}
    for pool_id in ("mock-a", "mock-b"):  # LAST ERROR may hold a start that failed and was retried
        assert rows[pool_id][:7] == [pool_id, "Ready", "mock-tiny", "mock", "1/1", "1/1", "0"], tables.out
    assert ["no", "running", "tasks"] in lines

    # Live, it follows the stream until Ctrl-C, which is the normal way out.
    proc = await asyncio.create_subprocess_exec(
        *argv(stack, "status", config=False),
        env=cli_env(stack, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        await read_until(proc.stdout, "mock-b", bytearray())
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), CLI_S)
        err = (await proc.stderr.read()).decode()
        assert code == 0 and "Traceback" not in err, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    dead = f"http://127.0.0.1:{free_port()}"
    run = await llorch(stack, tmp_path, "status", "--once", url=dead)
    assert run.code == 1 and run.out == ""
    assert run.err.startswith(f"llorch status: UNREACHABLE: cannot reach the gateway at {dead}"), run.err
    run = await llorch(stack, tmp_path, "status", "--once", "--json", LLORCH_API_TOKEN="wrong")
    assert (run.code, run.out, run.err) == (1, "", f"llorch status: {await forbidden(http, stack)}\n")


async def test_submit_prints_the_mock_output_and_tasks_lists_the_task_and_errors_are_one_line(
    stack_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    stack: Stack = stack_factory(pools=[mock_pool("mock-a")])
    await stack.start()
    await stack.wait_pools_ready("mock-a")

    run = await llorch(
        stack, tmp_path, "submit", "mock-tiny", "Once upon a time", "--max-tokens", "8", "--seed", "42"
    )
    assert run.code == 0, run.err
    digest = hashlib.sha256(MOCK_MODEL.read_bytes()).hexdigest()
    text = completion_text(digest, "Once upon a time", 42, 8)
    assert run.out == text + "\n"
    summary = run.err.splitlines()[-1]
    task_id = summary.split()[1].rstrip(":")
    assert summary.startswith(f"task {task_id}: 8 tokens, first token after "), run.err
    assert summary.endswith("finish length on mock-a/" + summary.rsplit("/", 1)[1]), run.err
    events = await Client(stack, http).events(task_id)
    assert "".join(e.data["t"] for e in events if e.event == "token") == text
    assert events[-1].event == "end" and events[-1].data["tokens_out"] == 8

    listed = await llorch(stack, tmp_path, "tasks", "--json", "--limit", "5", config=True)
    assert listed.code == 0, listed.err
    tasks = json.loads(listed.out)["tasks"]
    assert tasks[0]["task_id"] == task_id
    assert (tasks[0]["model"], tasks[0]["state"], tasks[0]["tokens_out"]) == ("mock-tiny", "succeeded", 8)
    assert "Once upon a time" not in listed.out  # never prompts

    table = await llorch(stack, tmp_path, "tasks")
    assert table.code == 0, table.err
    header, *rows = [line.split() for line in table.out.splitlines()]
    assert header == ["TASK", "MODEL", "STATE", "PRIORITY", "CREATED", "TOKENS", "CODE"]
    assert rows[0][:4] == [task_id, "mock-tiny", "succeeded", "interactive"]
    assert rows[0][-2:] == ["8", "-"]

    run = await llorch(stack, tmp_path, "submit", "no-such-model", "hi", config=True)
    assert run.code == 1 and run.out == ""
    assert run.err.splitlines()[0].startswith("llorch submit: INVALID_PARAMS: "), run.err
    assert "  served_models: mock-tiny" in run.err.splitlines()
    run = await llorch(stack, tmp_path, "submit", "mock-tiny", "hi", LLORCH_API_TOKEN="wrong")
    assert (run.code, run.out, run.err) == (1, "", f"llorch submit: {await forbidden(http, stack)}\n")


async def test_ctrl_c_cancels_the_running_task(
    stack_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    stack: Stack = stack_factory(pools=[mock_pool("mock-a", args=["--token-delay-ms", "50"])])
    await stack.start()
    await stack.wait_pools_ready("mock-a")
    proc = await asyncio.create_subprocess_exec(
        *argv(stack, "submit", "mock-tiny", "a long story", "--max-tokens", "1000", config=False),
        env=cli_env(stack, tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        await read_until(proc.stdout, " ", bytearray())  # the first token is out: it runs
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), CLI_S)
        err = (await proc.stderr.read()).decode()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 130 and "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert last.startswith("llorch submit: interrupted; canceled task "), err
    task_id = last.rsplit(" ", 1)[1]
    client = Client(stack, http)
    events = await client.events(task_id)
    assert events[-1].event == "error" and events[-1].data["code"] == "CANCELED"
    assert 0 < events[-1].data["tokens_out"] < 1000
    assert (await client.status(task_id))["state"] == "canceled"
