"""LlamaCppAdapter against the real llama-server (SPEC §8 llama.cpp; the pinned build b11434)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest

from llorch.adapters.base import Finished, GenerateRequest, Sampler, Token
from llorch.adapters.llamacpp import LlamaCppAdapter
from tests.support.procs import wait_until

pytestmark = pytest.mark.e2e


class LlamaServer(Protocol):
    """What the ``llama_server`` fixture (conftest.py) gives."""

    url: str
    model: Path


PROMPT = "<|im_start|>user\nName three things a GPU is good at.<|im_end|>\n<|im_start|>assistant\n"


async def slots(server: LlamaServer) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as session, session.get(f"{server.url}/slots") as resp:
        assert resp.status == 200
        result: list[dict[str, Any]] = await resp.json()
        return result


async def run(adapter: LlamaCppAdapter, seed: int, max_tokens: int = 24) -> tuple[str, Finished]:
    req = GenerateRequest(task_id="e2e", prompt=PROMPT, max_tokens=max_tokens, seed=seed, sampler=Sampler())
    events = [event async for event in adapter.stream(req)]
    assert events and isinstance(events[-1], Finished), events
    assert all(isinstance(event, Token) for event in events[:-1])
    text = "".join(event.text for event in events[:-1] if isinstance(event, Token))
    return text, events[-1]


async def test_health_goes_ready_and_props_show_the_build(llama_server: LlamaServer) -> None:
    async with LlamaCppAdapter(llama_server.url, request_timeout_s=30) as adapter:

        async def ready() -> bool:
            health = await adapter.health()
            assert health.live
            return health.ready

        await wait_until(ready, timeout_s=120, what="llama-server to load the model")
        props = await adapter.props()
    assert props.engine_version.startswith("b11434"), props
    assert props.slots_total == 1
    assert props.ctx == 2048
    assert props.model_path == str(llama_server.model)


async def test_seeded_greedy_stream_is_repeatable(ready_adapter: LlamaCppAdapter) -> None:
    text, finished = await run(ready_adapter, seed=1234)
    assert text
    assert finished.tokens_out >= 1 and finished.tokens_in >= 1
    assert finished.finish_reason in ("stop", "length")

    again, finished_again = await run(ready_adapter, seed=1234)
    assert again == text
    assert finished_again == finished

    metrics = await ready_adapter.metrics()
    assert metrics["llamacpp:tokens_predicted_total"] >= 2 * finished.tokens_out
    assert metrics["llamacpp:requests_processing"] == 0


async def test_cancel_via_aclose_frees_the_slot(
    ready_adapter: LlamaCppAdapter, llama_server: LlamaServer
) -> None:
    req = GenerateRequest(
        task_id="e2e-cancel", prompt=PROMPT, max_tokens=1500, seed=7, sampler=Sampler(), ignore_eos=True
    )
    stream = ready_adapter.stream(req)
    assert isinstance(await anext(stream), Token)
    assert isinstance(await anext(stream), Token)
    assert (await slots(llama_server))[0]["is_processing"] is True
    await stream.aclose()

    async def slot_free() -> bool:
        return not any(slot["is_processing"] for slot in await slots(llama_server))

    await wait_until(slot_free, timeout_s=30, what="llama-server to free the slot after the disconnect")
    assert (await ready_adapter.metrics())["llamacpp:requests_processing"] == 0
    # The replica serves the next request normally.
    _, finished = await run(ready_adapter, seed=7, max_tokens=4)
    assert finished.tokens_out >= 1


async def test_erase_evicts_an_idle_slot_and_reports_busy_slots(ready_adapter: LlamaCppAdapter) -> None:
    request = GenerateRequest(task_id="e", prompt="Hello there", max_tokens=2, seed=1, cache_prompt=True)
    async for _ in ready_adapter.stream(request):
        pass
    assert await ready_adapter.busy_slots() == 0
    assert await ready_adapter.erase_kv(0) is True
