"""TritonAdapter against the Triton stub process (launched through llorch.adapters.launch).

The model uses non-default tensor names, so every stream also checks that the adapter takes them from
the pool's ``adapter`` options.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from llorch.adapters.base import (
    EngineHealth,
    Finished,
    KvInfo,
    Sampler,
    Token,
)
from llorch.adapters.triton import TritonAdapter
from llorch.config import PoolConfig
from llorch.errors import Code, OrchestratorError
from tests.stubs import StartStub, StubEngine, collect, failure, request, stub_engines
from tests.stubs.common import completion_text
from tests.support.procs import free_port, wait_until

IO = {"model_name": "llm", "input": "prompt", "output": "completion", "max_tokens_input": "max_new"}
IO_FLAGS = ("--stub-input", "prompt", "--stub-output", "completion", "--stub-max-tokens-input", "max_new")


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[StartStub]:
    async with stub_engines(tmp_path) as start:
        yield start


@pytest.fixture
def repository(tmp_path: Path) -> Path:
    """A model repository in Triton's layout with one model, ``llm``."""
    (tmp_path / "models" / "llm" / "1").mkdir(parents=True)
    (tmp_path / "models" / "llm" / "config.pbtxt").write_text('name: "llm"\nbackend: "tensorrtllm"\n')
    return tmp_path / "models"


async def triton(
    start: StartStub, repository: Path, *knobs: str, ready: bool = True, adapter: dict[str, str] | None = None
) -> StubEngine:
    pool = {"id": "triton-a", "engine": "triton", "model": "m", "devices": [0], "ctx": 512, "slots": 1}
    engine_args = [*IO_FLAGS, *knobs]
    config = PoolConfig.model_validate({**pool, "adapter": adapter or IO, "engine_args": engine_args})
    return await start(config, repository, ready=ready)


async def test_stream_uses_the_configured_tensor_names(start: StartStub, repository: Path) -> None:
    stub = await triton(start, repository)
    req = request(max_tokens=8)
    events = await collect(stub.adapter, req)

    tokens, finished = events[:-1], events[-1]
    assert all(isinstance(event, Token) for event in tokens) and len(tokens) == 8
    # The adapter sends no seed (see llorch.adapters.triton), so the stub draws with seed 0.
    assert "".join(e.text for e in tokens if isinstance(e, Token)) == completion_text(req.prompt, 0, 8)
    assert finished == Finished(finish_reason="length", tokens_in=0, tokens_out=8)
    assert await stub.last_request() == {"prompt": req.prompt, "max_new": 8, "stream": True, "top_k": 1}


async def test_stream_ending_early_finishes_with_stop(start: StartStub, repository: Path) -> None:
    stub = await triton(start, repository, "--stub-eos-after", "3")
    events = await collect(stub.adapter, request(max_tokens=10))
    assert [type(e) for e in events] == [Token, Token, Token, Finished]
    assert isinstance(events[-1], Finished)
    assert (events[-1].finish_reason, events[-1].tokens_out) == ("stop", 3)


async def test_sampling_sends_the_trtllm_inputs(start: StartStub, repository: Path) -> None:
    stub = await triton(start, repository)
    sampler = Sampler(temperature=0.7, top_k=40, top_p=0.9, min_p=0.05, repeat_penalty=1.1)
    await collect(stub.adapter, request(max_tokens=2, sampler=sampler))
    sent = await stub.last_request()
    assert (sent["temperature"], sent["top_k"], sent["top_p"], sent["repetition_penalty"]) == (
        0.7,
        40,
        0.9,
        1.1,
    )
    assert "seed" not in sent and "random_seed" not in sent


async def test_closing_the_stream_cancels_the_request(start: StartStub, repository: Path) -> None:
    stub = await triton(start, repository, "--stub-token-delay-ms", "5")
    stream = stub.adapter.stream(request(max_tokens=3000))
    assert isinstance(await anext(stream), Token)
    assert isinstance(await anext(stream), Token)
    assert (await stub.stats())["active"] == 1
    assert await stub.adapter.busy_slots() == 1
    await stream.aclose()

    async def engine_saw_abort() -> bool:
        stats = await stub.stats()
        return bool(stats["aborted_total"] == 1 and stats["active"] == 0)

    await wait_until(engine_saw_abort, what="the stub to count the abort")
    assert await stub.adapter.busy_slots() == 0
    assert isinstance((await collect(stub.adapter, request(max_tokens=2)))[-1], Finished)


async def test_error_chunk_after_the_200_is_internal(start: StartStub, repository: Path) -> None:
    stub = await triton(start, repository, "--stub-fail-after-tokens", "2")
    err, seen = await failure(stub.adapter, request(max_tokens=20))
    assert err.code is Code.INTERNAL
    assert "stub fault after 2 tokens" in err.message
    assert len(seen) == 2


async def test_failed_first_response_is_internal(start: StartStub, repository: Path) -> None:
    # Triton answers a failed first response with its status and an SSE body.
    stub = await triton(start, repository, "--stub-fail-after-tokens", "0")
    err, seen = await failure(stub.adapter, request(max_tokens=20))
    assert err.code is Code.INTERNAL
    assert "stub fault after 0 tokens" in err.message and seen == []


@pytest.mark.parametrize("fail_after", [0, 3])
async def test_out_of_memory_is_replica_exhausted(
    start: StartStub, repository: Path, fail_after: int
) -> None:
    stub = await triton(start, repository)
    await stub.control(fail_after_tokens=fail_after, fail_kind="oom")
    err, seen = await failure(stub.adapter, request(max_tokens=20))
    assert err.code is Code.REPLICA_EXHAUSTED
    assert "out of memory" in err.message and len(seen) == fail_after


async def test_crash_mid_stream_is_worker_reset(start: StartStub, repository: Path) -> None:
    stub = await triton(start, repository, "--stub-crash-after-tokens", "2")
    err, seen = await failure(stub.adapter, request(max_tokens=20))
    assert err.code is Code.WORKER_RESET
    assert len(seen) == 2 and all(isinstance(event, Token) for event in seen)


async def test_wrong_tensor_names_are_internal(start: StartStub, repository: Path) -> None:
    stub = await triton(start, repository)
    default_names = TritonAdapter(
        stub.url,
        model_name="llm",
        metrics_url=stub.launch.metrics_url,
        slots_total=1,
        ctx=512,
        model_path="m",
    )
    try:
        err, _ = await failure(default_names, request())
        assert err.code is Code.INTERNAL and "missing required input" in err.message
    finally:
        await default_names.aclose()


async def test_health_follows_the_loading_phase(start: StartStub, repository: Path) -> None:
    stub = await triton(start, repository, "--stub-start-delay-ms", "600000", ready=False)
    assert await stub.adapter.health() == EngineHealth(live=True, ready=False)

    await stub.control(start_delay_ms=0)
    assert await stub.adapter.health() == EngineHealth(live=True, ready=True)

    stub.proc.stop()
    assert await stub.adapter.health() == EngineHealth(live=False, ready=False)


async def test_an_unknown_model_is_never_ready(start: StartStub, repository: Path) -> None:
    stub = await triton(start, repository)
    other = TritonAdapter(
        stub.url,
        model_name="nope",
        metrics_url=stub.launch.metrics_url,
        slots_total=1,
        ctx=512,
        model_path="m",
    )
    try:
        assert await other.health() == EngineHealth(live=True, ready=False)
        err, _ = await failure(other, request())
        assert err.code is Code.INTERNAL and "unknown model" in err.message
    finally:
        await other.aclose()


@pytest.mark.parametrize(
    ("trtllm", "version"),
    [(None, "triton-2.49.0+trtllm-unknown"), ("0.13.0", "triton-2.49.0+trtllm-0.13.0")],
)
async def test_props_capture_the_versions(
    start: StartStub, repository: Path, trtllm: str | None, version: str
) -> None:
    options = IO if trtllm is None else {**IO, "trtllm_version": trtllm}
    stub = await triton(start, repository, "--stub-version", "2.49.0", adapter=options)
    props = await stub.adapter.props()
    assert props.engine_version == version
    assert (props.slots_total, props.ctx, props.model_path) == (1, 512, str(repository))


async def test_metrics_come_from_the_metrics_port(start: StartStub, repository: Path) -> None:
    stub = await triton(start, repository)
    assert stub.launch.metrics_port is not None and stub.launch.metrics_port != stub.launch.port
    await collect(stub.adapter, request(max_tokens=5))
    metrics = await stub.adapter.metrics()
    assert metrics['nv_inference_request_success_total{model="llm",version="1"}'] == 1
    assert await stub.adapter.kv_info() == KvInfo(usage_ratio=0.0)
    assert await stub.adapter.erase_kv(0) is False


async def test_kv_info_while_busy(start: StartStub, repository: Path) -> None:
    stub = await triton(start, repository, "--stub-token-delay-ms", "5")
    stream = stub.adapter.stream(request(max_tokens=3000))
    try:
        assert isinstance(await anext(stream), Token)
        assert await stub.adapter.kv_info() == KvInfo(usage_ratio=16 / 1024)
    finally:
        await stream.aclose()


async def test_connection_refused_is_worker_reset() -> None:
    port = free_port()
    adapter = TritonAdapter(
        f"http://127.0.0.1:{port}",
        model_name="llm",
        metrics_url=f"http://127.0.0.1:{port}/metrics",
        slots_total=1,
        ctx=512,
        model_path="m",
    )
    try:
        err, _ = await failure(adapter, request())
        assert err.code is Code.WORKER_RESET
        with pytest.raises(OrchestratorError) as exc:
            await adapter.props()
        assert exc.value.code is Code.WORKER_RESET
        assert await adapter.health() == EngineHealth(live=False, ready=False)
    finally:
        await adapter.aclose()
