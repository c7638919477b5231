"""OpenAIAdapter against the vLLM stub process (launched through llorch.adapters.launch)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from llorch.adapters._http import sample_values
from llorch.adapters.base import (
    EngineHealth,
    Finished,
    KvInfo,
    Sampler,
    Token,
)
from llorch.adapters.openai import OpenAIAdapter
from llorch.config import PoolConfig
from llorch.errors import Code, OrchestratorError
from tests.stubs import StartStub, StubEngine, collect, failure, request, stub_engines
from tests.stubs.common import completion_text, prompt_tokens
from tests.support.procs import free_port, wait_until

MODEL = Path("/models/Meta-Llama-3.1-8B-Instruct-AWQ")


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[StartStub]:
    async with stub_engines(tmp_path) as start:
        yield start


async def vllm(start: StartStub, *engine_args: str, ready: bool = True, **keys: Any) -> StubEngine:
    pool = {"id": "vllm-a", "engine": "vllm", "model": "m", "devices": [0], "ctx": 512, "slots": 2}
    config = PoolConfig.model_validate({**pool, **keys, "engine_args": list(engine_args)})
    return await start(config, MODEL, ready=ready)


async def test_stream_yields_tokens_then_finished_with_usage(start: StartStub) -> None:
    stub = await vllm(start)
    req = request(max_tokens=8)
    events = await collect(stub.adapter, req)

    tokens, finished = events[:-1], events[-1]
    assert all(isinstance(event, Token) for event in tokens) and len(tokens) == 8
    assert "".join(e.text for e in tokens if isinstance(e, Token)) == completion_text(req.prompt, 42, 8)
    assert finished == Finished(finish_reason="length", tokens_in=prompt_tokens(req.prompt), tokens_out=8)
    sent = await stub.last_request()
    assert sent["model"] == str(MODEL)  # vLLM serves the model under the path given to `serve`
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert (sent["seed"], sent["temperature"], sent["max_tokens"]) == (42, 0.0, 8)
    assert "ignore_eos" not in sent and "top_k" not in sent  # greedy needs no vLLM extras


async def test_eos_finishes_with_stop(start: StartStub) -> None:
    stub = await vllm(start, "--stub-eos-after", "3")
    events = await collect(stub.adapter, request(max_tokens=10))
    assert [type(e) for e in events] == [Token, Token, Token, Finished]
    assert isinstance(events[-1], Finished)
    assert (events[-1].finish_reason, events[-1].tokens_out) == ("stop", 3)


async def test_sampling_sends_the_vllm_extras(start: StartStub) -> None:
    stub = await vllm(start)
    sampler = Sampler(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1)
    await collect(stub.adapter, request(sampler=sampler, ignore_eos=True))
    sent = await stub.last_request()
    assert (sent["temperature"], sent["top_p"], sent["top_k"]) == (0.7, 0.9, 40)
    assert (sent["min_p"], sent["repetition_penalty"], sent["ignore_eos"]) == (0.05, 1.1, True)


async def test_closing_the_stream_aborts_the_request(start: StartStub) -> None:
    stub = await vllm(start, "--stub-token-delay-ms", "5")
    stream = stub.adapter.stream(request(max_tokens=3000, ignore_eos=True))
    assert isinstance(await anext(stream), Token)
    assert isinstance(await anext(stream), Token)
    assert (await stub.stats())["active"] == 1
    await stream.aclose()

    async def engine_saw_abort() -> bool:
        stats = await stub.stats()
        return bool(stats["aborted_total"] == 1 and stats["active"] == 0)

    await wait_until(engine_saw_abort, what="the stub to count the abort")
    assert await stub.adapter.busy_slots() == 0
    assert isinstance((await collect(stub.adapter, request(max_tokens=2)))[-1], Finished)


async def test_requests_beyond_max_num_seqs_wait_in_the_queue(start: StartStub) -> None:
    stub = await vllm(start, "--stub-token-delay-ms", "5", slots=1)
    first = stub.adapter.stream(request(max_tokens=3000, ignore_eos=True))
    assert isinstance(await anext(first), Token)
    second = stub.adapter.stream(request(prompt="queued", max_tokens=2))
    head = asyncio.ensure_future(anext(second))

    async def queued() -> bool:
        return sample_values(await stub.adapter.metrics(), "vllm:num_requests_waiting") == [1.0]

    await wait_until(queued, what="the second request to wait for a sequence slot")
    assert not head.done()
    assert await stub.adapter.busy_slots() == 2
    await first.aclose()
    assert isinstance(await head, Token)
    rest = [event async for event in second]
    assert isinstance(rest[-1], Finished) and rest[-1].tokens_out == 2


async def test_engine_error_event_is_internal(start: StartStub) -> None:
    stub = await vllm(start, "--stub-fail-after-tokens", "2")
    err, seen = await failure(stub.adapter, request(max_tokens=20))
    assert err.code is Code.INTERNAL
    assert "stub fault after 2 tokens" in err.message
    assert len(seen) == 2


@pytest.mark.parametrize("fail_after", [0, 3])
async def test_out_of_memory_is_replica_exhausted(start: StartStub, fail_after: int) -> None:
    stub = await vllm(start)
    await stub.control(fail_after_tokens=fail_after, fail_kind="oom")
    err, seen = await failure(stub.adapter, request(max_tokens=20))
    assert err.code is Code.REPLICA_EXHAUSTED
    assert "out of memory" in err.message and len(seen) == fail_after


async def test_crash_mid_stream_is_worker_reset(start: StartStub) -> None:
    stub = await vllm(start, "--stub-crash-after-tokens", "2")
    err, seen = await failure(stub.adapter, request(max_tokens=20))
    assert err.code is Code.WORKER_RESET
    assert len(seen) == 2 and all(isinstance(event, Token) for event in seen)


async def test_prompt_over_max_model_len_is_invalid_params(start: StartStub) -> None:
    stub = await vllm(start, ctx=256)
    err, _ = await failure(stub.adapter, request(prompt="x" * 2000))
    assert err.code is Code.INVALID_PARAMS
    assert "maximum context length is 256" in err.message


async def test_health_follows_the_loading_phase(start: StartStub) -> None:
    stub = await vllm(start, "--stub-start-delay-ms", "600000", ready=False)
    assert await stub.adapter.health() == EngineHealth(live=True, ready=False)
    with pytest.raises(OrchestratorError) as err:
        await stub.adapter.props()
    assert err.value.code is Code.POOL_UNREADY

    await stub.control(start_delay_ms=0)
    assert await stub.adapter.health() == EngineHealth(live=True, ready=True)

    stub.proc.stop()
    assert await stub.adapter.health() == EngineHealth(live=False, ready=False)


async def test_props_capture_version_and_launch_values(start: StartStub) -> None:
    stub = await vllm(start, "--stub-version", "0.10.2", ctx=1024, slots=4)
    props = await stub.adapter.props()
    assert props.engine_version == "0.10.2"
    assert (props.slots_total, props.ctx, props.model_path) == (4, 1024, str(MODEL))


async def test_a_server_without_version_or_unlisted_model(start: StartStub) -> None:
    stub = await vllm(start)
    other = OpenAIAdapter(stub.url, "not-served", slots_total=1, ctx=128)
    try:
        assert await other.health() == EngineHealth(live=True, ready=False)
        assert (await other.props()).ctx == 128  # no card for this model: the launch value
        err, _ = await failure(other, request())
        assert err.code is Code.INTERNAL and "does not exist" in err.message
    finally:
        await other.aclose()


@pytest.mark.parametrize(
    ("kv_metric", "expected"),
    [("kv_cache_usage_perc", 0.0), ("gpu_cache_usage_perc", 0.0), ("none", None)],
)
async def test_metrics_and_kv_info(start: StartStub, kv_metric: str, expected: float | None) -> None:
    stub = await vllm(start, "--stub-kv-metric", kv_metric)
    await collect(stub.adapter, request(max_tokens=5))
    metrics = await stub.adapter.metrics()
    labels = f'{{engine="0",model_name="{MODEL}"}}'
    assert metrics[f"vllm:generation_tokens_total{labels}"] == 5
    assert metrics[f"vllm:num_requests_running{labels}"] == 0
    assert await stub.adapter.kv_info() == KvInfo(usage_ratio=expected)
    assert await stub.adapter.erase_kv(0) is False


async def test_kv_info_reports_the_gauge_while_busy(start: StartStub) -> None:
    stub = await vllm(start, "--stub-token-delay-ms", "5", slots=2)
    stream = stub.adapter.stream(request(max_tokens=3000, ignore_eos=True))
    try:
        assert isinstance(await anext(stream), Token)
        assert await stub.adapter.kv_info() == KvInfo(usage_ratio=0.5)
    finally:
        await stream.aclose()


async def test_connection_refused_is_worker_reset() -> None:
    adapter = OpenAIAdapter(f"http://127.0.0.1:{free_port()}", "m", slots_total=1, ctx=512)
    try:
        err, _ = await failure(adapter, request())
        assert err.code is Code.WORKER_RESET
        with pytest.raises(OrchestratorError) as exc:
            await adapter.props()
        assert exc.value.code is Code.WORKER_RESET
        assert await adapter.health() == EngineHealth(live=False, ready=False)
    finally:
        await adapter.aclose()
