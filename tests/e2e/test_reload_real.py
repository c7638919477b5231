"""Reload (SPEC §5.6) on the real llama-server + SmolLM2 behind the whole stack, public API only.

The second catalog model is the same GGUF with bytes appended: llama-server loads it (the GGUF reader
stops at the tensor data it declares), its digest differs, and its weights are the same, so a seeded
request gives the same tokens before and after the swap. A catalog model whose file is not a GGUF at all
makes the new llama-server exit while loading: the reload fails and rolls back.
"""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path
from typing import Any

import aiohttp

from tests.support.stack import Client, SseEvent, Stack

POOL = "smollm2-cpu"
MODEL, MODEL_V2, BROKEN = "smollm2-135m", "smollm2-v2", "not-a-gguf"
# Raw completion of a count: SmolLM2 keeps counting up to max_tokens rather than stopping early.
COUNT = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10,"
SEEDED = {"prompt": "Write one sentence about GPUs.", "seed": 1234, "max_tokens": 16}


def _stack(stack_factory: Any, llama_server_bin: Path, model_gguf: Path, tmp_path: Path) -> Stack:
    v2 = tmp_path / "smollm2-v2.gguf"
    v2.write_bytes(model_gguf.read_bytes() + b"\nllorch reload e2e\n")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"this is not a GGUF model\n" * 64)
    stack: Stack = stack_factory(
        models=[
            {"id": MODEL, "path": str(model_gguf)},
            {"id": MODEL_V2, "path": str(v2)},
            {"id": BROKEN, "path": str(broken)},
        ],
        pools=[
            {
                "id": POOL,
                "engine": "llamacpp",
                "model": MODEL,
                "devices": "cpu",
                "allow_cpu": True,
                "ctx": 2048,
                "slots": 1,
                "engine_bin": str(llama_server_bin),
                "engine_args": ["--threads", "1"],
                "queue": {"capacity": 8, "full_policy": "reject"},
            }
        ],
    )
    return stack


async def _reload(http: aiohttp.ClientSession, stack: Stack, model_ref: str) -> tuple[int, Any]:
    url = f"{stack.url}/v1/pools/{POOL}/reload?wait=true"
    async with http.post(url, json={"new_model_ref": model_ref}, headers=stack.headers) as r:
        return r.status, await r.json()


async def _health(http: aiohttp.ClientSession, stack: Stack) -> dict[str, Any]:
    async with http.get(f"{stack.url}/v1/pools/{POOL}/health", headers=stack.headers) as r:
        assert r.status == 200, await r.text()
        return dict(await r.json())


async def _running(client: Client, task_id: str) -> tuple[asyncio.Task[list[SseEvent]], asyncio.Event]:
    """Follow the task in the background; the event is set once its first token has arrived."""
    first_token = asyncio.Event()

    async def follow() -> list[SseEvent]:
        events = []
        async for event in client.follow(task_id):
            events.append(event)
            if event.event == "token":
                first_token.set()
        first_token.set()  # ended without a token: the assertions on the events say so
        return events

    return asyncio.create_task(follow()), first_token


async def _seeded(client: Client, model_ref: str) -> tuple[list[str], dict[str, Any]]:
    task_id = await client.admit(model_ref=model_ref, **SEEDED)
    events = await client.events(task_id)
    assert events[-1].event == "end", events[-1]
    return [e.data["t"] for e in events if e.event == "token"], await client.status(task_id)


async def test_reload_onto_a_second_gguf_swaps_under_a_running_task(
    stack_factory: Any,
    http: aiohttp.ClientSession,
    llama_server_bin: Path,
    model_gguf: Path,
    tmp_path: Path,
) -> None:
    stack = _stack(stack_factory, llama_server_bin, model_gguf, tmp_path)
    await stack.start()
    client = Client(stack, http)
    before_tokens, before_status = await _seeded(client, MODEL)
    assert before_status["replica_id"] == f"{POOL}-r0"
    before = await _health(http, stack)

    # 120 tokens outlast the reload on the 2-core box (the old engine drains it after the swap); on a
    # faster one it may end before the swap, and the assertions still hold.
    long_task = await client.admit(model_ref=MODEL, prompt=COUNT, seed=7, max_tokens=120)
    follower, first_token = await _running(client, long_task)
    async with asyncio.timeout(120):
        await first_token.wait()  # it runs on the old engine when the reload starts
    status, done = await _reload(http, stack, MODEL_V2)
    assert status == 200, done
    v2 = tmp_path / "smollm2-v2.gguf"
    digest = "sha256:" + hashlib.sha256(v2.read_bytes()).hexdigest()
    assert done["model_ref"] == MODEL_V2 and done["model_digest"] == digest, done
    assert done["state"] == "Ready" and done["model_digest"] != before["model_digest"]
    assert done["engine_version"] == before["engine_version"]

    events = await follower
    assert events[-1].event == "end", events[-1]  # finished on the old engine, not cut by the swap
    assert events[-1].data["tokens_out"] == 120
    dispatch = next(e.data for e in events if e.event == "metrics" and e.data.get("phase") == "dispatch")
    assert dispatch["replica_id"] == f"{POOL}-r0"

    after_tokens, after_status = await _seeded(client, MODEL_V2)
    assert after_status["replica_id"] == f"{POOL}-r0-g1"
    assert after_tokens == before_tokens  # the same weights behind a new digest
    health = await _health(http, stack)
    assert health["model_ref"] == MODEL_V2 and health["model_digest"] == digest
    assert [r["replica_id"] for r in health["replicas"]] == [f"{POOL}-r0-g1"]


async def test_reload_onto_a_file_that_is_not_a_gguf_rolls_back(
    stack_factory: Any,
    http: aiohttp.ClientSession,
    llama_server_bin: Path,
    model_gguf: Path,
    tmp_path: Path,
) -> None:
    stack = _stack(stack_factory, llama_server_bin, model_gguf, tmp_path)
    await stack.start()
    client = Client(stack, http)
    before = await _health(http, stack)

    during = await client.admit(model_ref=MODEL, prompt=COUNT, seed=7, max_tokens=40)
    follower, first_token = await _running(client, during)
    async with asyncio.timeout(120):
        await first_token.wait()
    status, failed = await _reload(http, stack, BROKEN)
    assert status == 409, failed
    assert failed["code"] == "RELOAD_FAILED" and failed["rolled_back"] is True, failed
    assert failed["last_error"]["code"] == "PRELOAD_FAILED", failed  # llama-server exits: no model
    assert (await follower)[-1].event == "end"

    health = await _health(http, stack)
    assert health["state"] == "Ready" and health["model_ref"] == MODEL
    assert health["model_digest"] == before["model_digest"]
    assert health["last_error"]["code"] == "RELOAD_FAILED"
    assert [r["replica_id"] for r in health["replicas"]] == [f"{POOL}-r0"]
    tokens, status_after = await _seeded(client, MODEL)
    assert tokens and status_after["replica_id"] == f"{POOL}-r0"
