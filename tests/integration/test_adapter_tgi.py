"""TgiAdapter against the TGI stub process (launched through llorch.adapters.launch)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from llorch.adapters import tgi
from llorch.adapters.base import (
    EngineHealth,
    Finished,
    KvInfo,
    Sampler,
    Token,
)
from llorch.config import PoolConfig
from llorch.errors import Code, OrchestratorError
from tests.stubs import StartStub, StubEngine, collect, failure, request, stub_engines
from tests.stubs.common import completion_text, prompt_tokens
from tests.support.procs import free_port, wait_until

MODEL = Path("/models/bigscience-bloom-560m")


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[StartStub]:
    async with stub_engines(tmp_path) as start:
        yield start


async def tgi_stub(start: StartStub, *engine_args: str, ready: bool = True, **keys: Any) -> StubEngine:
    pool = {"id": "tgi-a", "engine": "tgi", "model": "m", "devices": [0], "ctx": 512, "slots": 2}
    config = PoolConfig.model_validate({**pool, **keys, "engine_args": list(engine_args)})
    return await start(config, MODEL, ready=ready)


async def test_greedy_stream_yields_tokens_then_finished_from_details(start: StartStub) -> None:
    stub = await tgi_stub(start)
    req = request(max_tokens=8)
    events = await collect(stub.adapter, req)

    tokens, finished = events[:-1], events[-1]
    assert all(isinstance(event, Token) for event in tokens) and len(tokens) == 8
    assert "".join(e.text for e in tokens if isinstance(e, Token)) == completion_text(req.prompt, 42, 8)
    assert finished == Finished(finish_reason="length", tokens_in=prompt_tokens(req.prompt), tokens_out=8)
    # Greedy: do_sample false and no sampling keys at all (TGI rejects temperature 0).
    sent = await stub.last_request()
    assert sent == {
        "inputs": req.prompt,
        "parameters": {"max_new_tokens": 8, "details": True, "seed": 42, "do_sample": False},
    }


async def test_eos_skips_the_special_token_and_finishes_with_stop(start: StartStub) -> None:
    stub = await tgi_stub(start, "--stub-eos-after", "3")
    events = await collect(stub.adapter, request(max_tokens=10))
    assert [type(e) for e in events] == [Token, Token, Token, Finished]
    assert all("</s>" not in e.text for e in events if isinstance(e, Token))
    # TGI's generated_tokens counts the EOS token it generated.
    assert isinstance(events[-1], Finished)
    assert (events[-1].finish_reason, events[-1].tokens_out) == ("stop", 4)


async def test_sampling_sends_only_values_tgi_accepts(start: StartStub) -> None:
    stub = await tgi_stub(start)
    sampler = Sampler(temperature=0.7, top_k=40, top_p=1.0, min_p=0.05, repeat_penalty=1.1)
    events = await collect(stub.adapter, request(max_tokens=3, sampler=sampler))
    assert isinstance(events[-1], Finished) and events[-1].tokens_out == 3
    params = (await stub.last_request())["parameters"]
    # top_p 1.0 is outside TGI's open range (0, 1), so it stays out; min_p has no TGI equivalent.
    expected = {"max_new_tokens": 3, "details": True, "seed": 42, "do_sample": True, "temperature": 0.7}
    assert params == {**expected, "top_k": 40}


async def test_closing_the_stream_drops_the_request(start: StartStub) -> None:
    stub = await tgi_stub(start, "--stub-token-delay-ms", "5")
    stream = stub.adapter.stream(request(max_tokens=400))
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


async def test_overloaded_at_submit_is_replica_exhausted(start: StartStub) -> None:
    stub = await tgi_stub(start, "--stub-token-delay-ms", "5", slots=1)
    first = stub.adapter.stream(request(max_tokens=400))
    try:
        assert isinstance(await anext(first), Token)
        err, seen = await failure(stub.adapter, request(prompt="one too many"))
        assert err.code is Code.REPLICA_EXHAUSTED and seen == []
        assert "overloaded" in err.message
    finally:
        await first.aclose()
    metrics = await stub.adapter.metrics()
    assert metrics['tgi_request_failure_total{err="overloaded"}'] == 1


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (429, {"error": "Model is overloaded", "error_type": "overloaded"}, Code.REPLICA_EXHAUSTED),
        (503, {"error": "busy", "error_type": "unhealthy"}, Code.REPLICA_EXHAUSTED),
        (
            422,
            {
                "error": "Input validation error: `inputs` must have less than 8 tokens",
                "error_type": "validation",
            },
            Code.INVALID_PARAMS,
        ),
        (424, {"error": "Request failed during generation: boom", "error_type": "generation"}, Code.INTERNAL),
        (500, {"error": "Incomplete generation", "error_type": "incomplete_generation"}, Code.INTERNAL),
    ],
)
def test_http_status_at_submit_is_mapped(status: int, body: dict[str, str], code: Code) -> None:
    # /generate and older routers answer with the HTTP status; the stub (like TGI 3) streams errors after 200.
    error = tgi._status_error(status, json.dumps(body).encode(), at_submit=True)
    assert error.code is code and body["error"] in error.message


async def test_generation_error_event_is_internal(start: StartStub) -> None:
    stub = await tgi_stub(start, "--stub-fail-after-tokens", "2")
    err, seen = await failure(stub.adapter, request(max_tokens=20))
    assert err.code is Code.INTERNAL
    assert "Request failed during generation" in err.message and "stub fault after 2 tokens" in err.message
    assert len(seen) == 2


@pytest.mark.parametrize("fail_after", [0, 3])
async def test_out_of_memory_is_replica_exhausted(start: StartStub, fail_after: int) -> None:
    stub = await tgi_stub(start)
    await stub.control(fail_after_tokens=fail_after, fail_kind="oom")
    err, seen = await failure(stub.adapter, request(max_tokens=20))
    assert err.code is Code.REPLICA_EXHAUSTED
    assert "out of memory" in err.message and len(seen) == fail_after


async def test_crash_mid_stream_is_worker_reset(start: StartStub) -> None:
    stub = await tgi_stub(start, "--stub-crash-after-tokens", "2")
    err, seen = await failure(stub.adapter, request(max_tokens=20))
    assert err.code is Code.WORKER_RESET
    assert len(seen) == 2 and all(isinstance(event, Token) for event in seen)


async def test_prompt_over_max_total_tokens_is_invalid_params(start: StartStub) -> None:
    stub = await tgi_stub(start, ctx=256)
    err, _ = await failure(stub.adapter, request(prompt="x" * 2000))
    assert err.code is Code.INVALID_PARAMS
    assert "`inputs` must have less than 256 tokens" in err.message


async def test_health_follows_the_loading_phase(start: StartStub) -> None:
    stub = await tgi_stub(start, "--stub-start-delay-ms", "600000", ready=False)
    assert await stub.adapter.health() == EngineHealth(live=True, ready=False)
    with pytest.raises(OrchestratorError) as err:
        await stub.adapter.props()
    assert err.value.code is Code.POOL_UNREADY

    await stub.control(start_delay_ms=0)
    assert await stub.adapter.health() == EngineHealth(live=True, ready=True)

    stub.proc.stop()
    assert await stub.adapter.health() == EngineHealth(live=False, ready=False)


async def test_props_come_from_info(start: StartStub) -> None:
    stub = await tgi_stub(start, "--stub-version", "2.4.1", ctx=1024, slots=3)
    props = await stub.adapter.props()
    assert props.engine_version == "2.4.1"
    assert (props.slots_total, props.ctx, props.model_path) == (3, 1024, str(MODEL))


async def test_metrics_without_kv_info(start: StartStub) -> None:
    stub = await tgi_stub(start)
    await collect(stub.adapter, request(max_tokens=5))
    metrics = await stub.adapter.metrics()
    assert metrics["tgi_request_success_total"] == 1
    assert metrics["tgi_batch_current_size"] == 0
    assert await stub.adapter.kv_info() == KvInfo(usage_ratio=None)
    assert await stub.adapter.erase_kv(0) is False


async def test_connection_refused_is_worker_reset() -> None:
    adapter = tgi.TgiAdapter(f"http://127.0.0.1:{free_port()}", slots_total=1, ctx=512, model_path="m")
    try:
        err, _ = await failure(adapter, request())
        assert err.code is Code.WORKER_RESET
        with pytest.raises(OrchestratorError) as exc:
            await adapter.props()
        assert exc.value.code is Code.WORKER_RESET
        assert await adapter.health() == EngineHealth(live=False, ready=False)
    finally:
        await adapter.aclose()
