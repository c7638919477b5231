"""The status contract (issue 14): the store's recent-tasks, running and failure views on real Redis, and
``GET /v1/status``, ``/v1/status/stream``, ``/v1/tasks`` and the page at ``GET /`` on a real stack."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from collections.abc import AsyncIterator
from importlib import metadata
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llorch import events
from llorch import store as store_module
from llorch.errors import Code, OrchestratorError
from llorch.store import LEASE_MS, Append, NewTask, Placement, QueueLimits, Store, TaskRequest, TaskState
from tests.support.procs import wait_until
from tests.support.redis_cluster import RedisCluster
from tests.support.stack import Client, Stack, mock_pool

GIB = 1 << 30
SECRET = "status-page-must-never-show-this-prompt"
STATUS_KEYS = {"version", "generated_at_ms", "pools", "gpus", "replica_sets", "running", "recent_errors"}
RUNNING_KEYS = {"task_id", "model", "pool_id", "replica_id", "priority", "tokens_out", "started_ms"}
TASK_KEYS = {"task_id", "model", "state", "priority", "created_ms", "tokens_out", "code"}


# ------------------------------------------------------------------------------------ the store's views


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    async with Store.connect(redis_url, prefix="t:") as s:
        yield s


async def _admit(store: Store, task_id: str, priority: str = "interactive", rs: str = "rs") -> None:
    prio: Any = priority
    task = NewTask(task_id, rs, prio, "m", "", "mock", 60_000, TaskRequest(SECRET, 4, 1, "best_effort"))
    started = events.started(task_id, 0, 0, 1.0, prio)
    result = await store.admit(task, QueueLimits(64, 64, 64, "reject"), 10**13, (0, [started]), 60, 60)
    assert result.status == "ok"


def _error(code: Code, message: str = "it broke") -> str:
    return events.error(OrchestratorError(code, message))


async def test_recent_tasks_are_newest_first_bounded_and_forget_expired_records(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "RECENT_TASKS_MAX", 5)
    for n in range(7):
        await _admit(store, f"t{n}", "batch" if n == 3 else "interactive", rs="rs-a" if n % 2 else "rs-b")
    assert await store.client.zcard(store.keys.recent_tasks()) == 5  # t0 and t1 trimmed
    assert [t.task_id for t in await store.recent_tasks(3)] == ["t6", "t5", "t4"]
    listed = await store.recent_tasks(50)
    assert [t.task_id for t in listed] == ["t6", "t5", "t4", "t3", "t2"]
    assert listed[3].priority == "batch" and listed[3].state == TaskState.QUEUED
    assert listed[0].model_ref == "m" and listed[0].created_ms > 0 and listed[0].error_code is None
    # An expired record (its key gone) is skipped, the limit filled from older ones, and the index
    # forgets it.
    await store.client.delete(store.keys.task("rs-b", "t6"), store.keys.task("rs-a", "t5"))
    assert [t.task_id for t in await store.recent_tasks(2)] == ["t4", "t3"]
    assert await store.client.zcard(store.keys.recent_tasks()) == 3
    ended = await store.terminate("t4", TaskState.FAILED, _error(Code.DEADLINE_UNMET), 60)
    assert ended.was_live
    [t4] = await store.recent_tasks(1)
    assert t4.state == TaskState.FAILED and t4.error_code == "DEADLINE_UNMET"


async def test_running_tasks_are_the_leased_tasks_marked_running_with_their_tokens(store: Store) -> None:
    for n in range(3):
        await _admit(store, f"r{n}")
    claimed = await store.claim("rs", LEASE_MS, limit=2)
    assert [c.task_id for c in claimed] == ["r0", "r1"]
    assert await store.running_tasks() == []  # leased, not yet running
    for n, claim in enumerate(claimed):
        await store.mark_running(claim.task_id, Placement("mgr", "pool-a", f"pool-a-r{n}"))
    assert await store.append(Append("r1", [("token", '{"t":"x","i":0}', "")], tokens_out=5)) == 1
    running = await store.running_tasks()
    assert [(t.task_id, t.replica_id, t.tokens_out) for t in running] == [
        ("r0", "pool-a-r0", 0),
        ("r1", "pool-a-r1", 5),
    ]
    assert all(
        t.state == TaskState.RUNNING and t.pool_id == "pool-a" and t.dispatched_ms > 0 for t in running
    )
    await store.append(Append("r0", [("end", "{}", TaskState.SUCCEEDED.value)]))
    assert [t.task_id for t in await store.running_tasks()] == ["r1"]  # the lease outlives the end


async def test_failures_are_indexed_once_newest_first_and_bounded(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    for n in range(5):
        await _admit(store, f"f{n}")
    # The scheduler's path: a terminal step on a live task; a second one writes nothing.
    await store.terminate("f0", TaskState.FAILED, _error(Code.DEADLINE_UNMET, "too late"), 60)
    await store.terminate("f0", TaskState.FAILED, _error(Code.INTERNAL), 60)
    await store.terminate("f1", TaskState.CANCELED, _error(Code.CANCELED), 60)  # not a failure
    # The pool manager's path: an appended `error` that ends the task, retried after a lost reply.
    batch = Append(
        "f2", [("error", _error(Code.INTERNAL, "engine said no"), TaskState.FAILED.value)], 0, "b1"
    )
    assert isinstance(await store.append(batch), int)
    assert isinstance(await store.append(batch), int)
    failures = await store.recent_failures(20)
    assert [(f.task_id, f.code, f.message) for f in failures] == [
        ("f2", "INTERNAL", "engine said no"),
        ("f0", "DEADLINE_UNMET", "too late"),
    ]
    assert failures[0].at_ms >= failures[1].at_ms > 0
    monkeypatch.setattr(store_module, "RECENT_FAILURES_MAX", 2)
    await store.terminate("f3", TaskState.FAILED, _error(Code.WORKER_RESET), 60)
    assert [f.task_id for f in await store.recent_failures(20)] == ["f3", "f2"]
    assert [f.task_id for f in await store.recent_failures(1)] == ["f3"]


async def test_the_views_read_across_slots_on_a_cluster(tmp_path: Path) -> None:
    """Records of several replica sets live on different nodes: the views' pipelines span them."""
    nodes = RedisCluster(tmp_path / "cluster")
    try:
        await nodes.start()
        async with Store.connect(nodes.url, prefix="t:", cluster=True) as store:
            sets = [f"rs-{n}" for n in range(6)]
            for rs in sets:
                await _admit(store, f"task-{rs}", rs=rs)
                [claim] = await store.claim(rs, LEASE_MS)
                await store.mark_running(claim.task_id, Placement("mgr", "pool", f"{rs}-r0"))
            assert {t.task_id for t in await store.running_tasks()} == {f"task-{rs}" for rs in sets}
            await store.terminate("task-rs-0", TaskState.FAILED, _error(Code.INTERNAL), 60)
            assert [f.task_id for f in await store.recent_failures(5)] == ["task-rs-0"]
            listed = await store.recent_tasks(10)
            assert [t.task_id for t in listed] == [f"task-{rs}" for rs in reversed(sets)]
            assert listed[-1].state == TaskState.FAILED and listed[-1].error_code == "INTERNAL"
    finally:
        nodes.stop()


# ---------------------------------------------------------------------------------------- the routes


async def _json(http: aiohttp.ClientSession, stack: Stack, path: str) -> Any:
    async with http.get(f"{stack.url}{path}", headers=stack.headers) as r:
        text = await r.text()
        assert r.status == 200, text
        assert r.headers["Content-Type"].startswith("application/json")
        assert SECRET not in text
        return json.loads(text)


async def _sse(response: aiohttp.ClientResponse) -> AsyncIterator[tuple[str, Any]]:
    """``("status", snapshot)`` for each frame and ``("comment", text)`` for each comment line."""
    event = ""
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        assert SECRET not in line
        if line.startswith(":"):
            yield "comment", line[1:].strip()
        elif line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            assert event == "status", line
            yield "status", json.loads(line.removeprefix("data: "))
        else:
            assert line == "", f"unexpected SSE line {line!r}"


async def _first_token(client: Client, task_id: str) -> None:
    async for event in client.follow(task_id):
        if event.event == "token":
            return
        assert event.event not in ("end", "error"), event


async def _busy_stack(stack_factory: Any, http: aiohttp.ClientSession) -> tuple[Stack, dict[str, str]]:
    """One slot on a fake 12 GB GPU: a task that failed, one running, one interactive and one batch task
    waiting. Every prompt is SECRET."""
    pool = mock_pool(
        "mock-a",
        devices=[0],
        slots=1,
        capacity=8,
        args=["--token-delay-ms", "100", "--vram-used-bytes", str(2 * GIB), "--gpu-util", "37"],
    )
    fake_gpu = {"index": 0, "name": "Fake 12GB", "total_mib": 12288, "free_mib": 12288}
    stack = stack_factory(
        pools=[pool], extra={"telemetry": {"gpu_provider": "fake", "fake_gpus": [fake_gpu]}}
    )
    await stack.start()
    client = Client(stack, http)
    failed = await client.admit(prompt=SECRET, max_tokens=1000, deadline_ms=1500)
    assert (await client.events(failed))[-1].data["code"] == "DEADLINE_UNMET"
    running = await client.admit(prompt=SECRET, max_tokens=1000)
    await _first_token(client, running)
    tasks = {
        "failed": failed,
        "running": running,
        "interactive": await client.admit(prompt=SECRET, max_tokens=5),
        "batch": await client.admit(prompt=SECRET, max_tokens=5, priority="batch"),
    }

    async def settled() -> bool:
        status = await _json(http, stack, "/v1/status")
        return (
            [t["task_id"] for t in status["running"]] == [running]
            and status["running"][0]["tokens_out"] >= 1
            and [s["queue_depth"] for s in status["replica_sets"]] == [{"interactive": 1, "batch": 1}]
            and any(g["vram_used_bytes"] >= 2 * GIB for g in status["gpus"])
            and [g["utilization"] for g in status["gpus"]] == [37.0]  # the engine's own report
        )

    await wait_until(settled, 30, "the status to show the running task, the queue and the GPU")
    return stack, tasks


async def test_status_tasks_and_stream_follow_the_contract(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack, tasks = await _busy_stack(stack_factory, http)
    await _check_status(http, stack, tasks)
    await _check_tasks(http, stack, tasks)
    await _check_stream(http, stack, tasks)


async def _check_status(http: aiohttp.ClientSession, stack: Stack, tasks: dict[str, str]) -> None:
    status = await _json(http, stack, "/v1/status")
    assert set(status) == STATUS_KEYS
    assert status["version"] == metadata.version("llama-orch")
    assert isinstance(status["generated_at_ms"], int) and status["generated_at_ms"] > 0

    # pools: GET /v1/pools' items, each replica with its free slots too
    pools = await _json(http, stack, "/v1/pools")
    [pool] = status["pools"]
    assert set(pool) == set(pools[0]) and pool["pool_id"] == "mock-a" and pool["state"] == "Ready"
    assert {k: v for k, v in pool.items() if k not in ("replicas", "metrics")} == {
        k: v for k, v in pools[0].items() if k not in ("replicas", "metrics")
    }
    [replica] = pool["replicas"]
    assert {"replica_id", "state", "slots_total", "slots_free"} <= set(replica)
    assert set(replica) - {"slots_free"} == set(pools[0]["replicas"][0])
    assert (replica["replica_id"], replica["state"], replica["slots_total"], replica["slots_free"]) == (
        "mock-a-r0",
        "Ready",
        1,
        0,
    )

    [gpu] = status["gpus"]
    assert set(gpu) == {"device", "name", "vram_total_bytes", "vram_used_bytes", "utilization", "pools"}
    assert (gpu["device"], gpu["name"], gpu["vram_total_bytes"]) == ("0", "Fake 12GB", 12288 << 20)
    assert 2 * GIB <= gpu["vram_used_bytes"] <= gpu["vram_total_bytes"]
    assert gpu["utilization"] == 37.0 and gpu["pools"] == ["mock-a"]

    # replica sets: GET /v1/replicasets' items
    [rs] = status["replica_sets"]
    [listed] = await _json(http, stack, "/v1/replicasets")
    assert set(rs) == set(listed) and rs["id"] == listed["id"] and rs["pools"] == ["mock-a"]
    assert rs["queue_depth"] == {"interactive": 1, "batch": 1}

    [running] = status["running"]
    assert set(running) == RUNNING_KEYS
    assert {k: running[k] for k in ("task_id", "model", "pool_id", "replica_id", "priority")} == {
        "task_id": tasks["running"],
        "model": "mock-tiny",
        "pool_id": "mock-a",
        "replica_id": "mock-a-r0",
        "priority": "interactive",
    }
    assert running["tokens_out"] >= 1 and 0 < running["started_ms"] <= status["generated_at_ms"]

    [error] = status["recent_errors"]
    assert set(error) == {"task_id", "code", "message", "at_ms"}
    assert error["task_id"] == tasks["failed"] and error["code"] == "DEADLINE_UNMET"
    assert error["message"] and 0 < error["at_ms"] <= status["generated_at_ms"]


async def _check_tasks(http: aiohttp.ClientSession, stack: Stack, tasks: dict[str, str]) -> None:
    """/v1/tasks: newest first, the failure's code, never a prompt."""
    listed_tasks = (await _json(http, stack, "/v1/tasks"))["tasks"]
    assert all(set(t) == TASK_KEYS for t in listed_tasks)
    assert [(t["task_id"], t["state"], t["priority"], t["code"]) for t in listed_tasks] == [
        (tasks["batch"], "queued", "batch", None),
        (tasks["interactive"], "queued", "interactive", None),
        (tasks["running"], "running", "interactive", None),
        (tasks["failed"], "failed", "interactive", "DEADLINE_UNMET"),
    ]
    assert all(t["model"] == "mock-tiny" and t["created_ms"] > 0 for t in listed_tasks)
    assert listed_tasks[2]["tokens_out"] >= 1
    created = [t["created_ms"] for t in listed_tasks]
    assert created == sorted(created, reverse=True)
    two = (await _json(http, stack, "/v1/tasks?limit=2"))["tasks"]
    assert [t["task_id"] for t in two] == [tasks["batch"], tasks["interactive"]]
    assert len((await _json(http, stack, "/v1/tasks?limit=200"))["tasks"]) == 4


async def _check_stream(http: aiohttp.ClientSession, stack: Stack, tasks: dict[str, str]) -> None:
    """The same JSON at once, then again about once a second; while the scheduler is away, comments
    that say so, and the stream stays open."""
    frames: list[dict[str, Any]] = []
    unavailable = False
    async with (
        asyncio.timeout(60),
        http.get(f"{stack.url}/v1/status/stream", headers=stack.headers) as r,
    ):
        assert r.status == 200 and r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        async for kind, payload in _sse(r):
            if kind == "status":
                frames.append(payload)
                if len(frames) == 2:
                    client = Client(stack, http)
                    for name in ("running", "interactive", "batch"):  # a quick stop at teardown
                        assert await client.cancel(tasks[name]) == 204
                    stack.procs["scheduler"].stop()
            elif payload.startswith("unavailable") and not unavailable:
                assert len(frames) >= 2 and payload == "unavailable POOL_UNREADY"
                unavailable = True
                async with http.get(f"{stack.url}/v1/status", headers=stack.headers) as once:
                    assert once.status == 503 and (await once.json())["code"] == "POOL_UNREADY"
                # A gateway that stops ends the stream cleanly (the loop ends at its end of body).
                await asyncio.to_thread(stack.procs["gateway"].stop)
    assert unavailable
    first, second = frames[:2]
    assert set(first) == set(second) == STATUS_KEYS
    assert [t["task_id"] for t in first["running"]] == [tasks["running"]]
    assert second["generated_at_ms"] > first["generated_at_ms"]


BAD_LIMITS = ["limit=0", "limit=201", "limit=abc", "limit=-1", "limit=1.5", "limit=", "limit=1&limit=2"]


async def test_bad_limits_and_tokens_are_refused_and_the_page_needs_none(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    for query in BAD_LIMITS:
        async with http.get(f"{stack.url}/v1/tasks?{query}", headers=stack.headers) as r:
            body = await r.json()
            assert r.status == 400, (query, body)
            assert r.headers["X-Correlation-Id"]
        assert body["code"] == "INVALID_PARAMS" and body["field"] == "limit", (query, body)
        assert body["retriable"] is False and "1 to 200" in body["message"]

    for path in ("/v1/status", "/v1/status/stream", "/v1/tasks"):
        async with http.get(f"{stack.url}{path}") as r:
            assert r.status == 401 and (await r.json())["code"] == "UNAUTHENTICATED", path
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
        async with http.get(f"{stack.url}{path}", headers={"Authorization": "Bearer not-the-token"}) as r:
            assert r.status == 403 and (await r.json())["code"] == "FORBIDDEN", path

    # The page: static, no token, no data in it; its CSP lets exactly its own inline code run.
    async with http.get(f"{stack.url}/") as r:
        assert r.status == 200 and r.headers["Content-Type"] == "text/html; charset=utf-8"
        page = await r.text()
        csp = r.headers["Content-Security-Policy"]
    assert stack.token not in page and "https://" not in page and "http://" not in page
    assert "connect-src 'self'" in csp and "default-src 'none'" in csp
    for kind, content in re.findall(r"<(script|style)>(.*?)</\1>", page, re.DOTALL):
        digest = base64.b64encode(hashlib.sha256(content.encode()).digest()).decode()
        assert f"{kind}-src 'sha256-{digest}'" in csp
    assert "/v1/status/stream" in page and "sessionStorage" in page
