"""LlamaCppAdapter against the mock engine process: events, cancel, error mapping, props, metrics."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from llorch.adapters.base import EngineHealth, Finished, GenerateRequest, Token
from llorch.adapters.llamacpp import LlamaCppAdapter
from llorch.errors import Code, OrchestratorError
from llorch_mockengine.generation import completion_text
from tests.support.mockengine import FIXTURE_MODEL, Mock, StartMock
from tests.support.procs import free_port, wait_until


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def adapters() -> AsyncIterator[Callable[[Mock | str], LlamaCppAdapter]]:
    made: list[LlamaCppAdapter] = []

    def make(target: Mock | str) -> LlamaCppAdapter:
        adapter = LlamaCppAdapter(target if isinstance(target, str) else target.url, request_timeout_s=30)
        made.append(adapter)
        return adapter

    yield make
    for adapter in made:
        await adapter.aclose()


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def control(http: aiohttp.ClientSession, mock: Mock, **knobs: object) -> None:
    async with http.post(f"{mock.url}/mock/control", json=knobs) as resp:
        assert resp.status == 200, await resp.text()


def request(prompt: str = "Say something about GPUs.", max_tokens: int = 8, **kw: Any) -> GenerateRequest:
    return GenerateRequest(task_id="t-1", prompt=prompt, max_tokens=max_tokens, seed=kw.pop("seed", 42), **kw)


async def collect(adapter: LlamaCppAdapter, req: GenerateRequest) -> list[Token | Finished]:
    return [event async for event in adapter.stream(req)]


async def test_stream_yields_tokens_then_one_finished(start_mock: StartMock, adapters: Any) -> None:
    mock = await start_mock("--token-delay-ms", "1")
    req = request(max_tokens=8)
    events = await collect(adapters(mock), req)

    tokens, finished = events[:-1], events[-1]
    assert all(isinstance(event, Token) for event in tokens) and len(tokens) == 8
    assert "".join(event.text for event in tokens if isinstance(event, Token)) == completion_text(
        "none", req.prompt, 42, 8
    )
    assert finished == Finished(
        finish_reason="length", tokens_in=math.ceil(len(req.prompt.encode()) / 4), tokens_out=8
    )


async def test_eos_finishes_with_stop(start_mock: StartMock, adapters: Any) -> None:
    mock = await start_mock("--eos-after", "3", "--token-delay-ms", "0")
    events = await collect(adapters(mock), request(max_tokens=10))
    assert len(events) == 4
    assert isinstance(events[-1], Finished)
    assert (events[-1].finish_reason, events[-1].tokens_out) == ("stop", 3)


async def test_aclose_cancels_the_engine_request(
    start_mock: StartMock, adapters: Any, http: aiohttp.ClientSession
) -> None:
    mock = await start_mock()
    adapter = adapters(mock)
    stream = adapter.stream(request(max_tokens=3000, ignore_eos=True))
    assert isinstance(await anext(stream), Token)
    assert isinstance(await anext(stream), Token)
    assert (await get_json(http, f"{mock.url}/slots"))[0]["is_processing"] is True
    await stream.aclose()

    async def engine_saw_abort() -> bool:
        stats = await get_json(http, f"{mock.url}/mock/stats")
        return bool(stats["aborted_total"] == 1 and stats["active"] == 0)

    async def slot_free() -> bool:
        return (await get_json(http, f"{mock.url}/slots"))[0]["is_processing"] is False

    await wait_until(engine_saw_abort, what="the mock to count the abort")
    await wait_until(slot_free, what="the slot to be free")
    # The adapter is still usable after a cancel.
    assert isinstance((await collect(adapter, request(max_tokens=2)))[-1], Finished)


async def test_crash_mid_stream_is_worker_reset(start_mock: StartMock, adapters: Any) -> None:
    mock = await start_mock("--crash-after-tokens", "2", "--token-delay-ms", "0")
    seen: list[Token | Finished] = []
    with pytest.raises(OrchestratorError) as err:
        async for event in adapters(mock).stream(request(max_tokens=20)):
            seen.append(event)
    assert err.value.code is Code.WORKER_RESET
    assert len(seen) == 2 and all(isinstance(event, Token) for event in seen)


async def test_engine_error_in_stream_is_internal(start_mock: StartMock, adapters: Any) -> None:
    mock = await start_mock("--fail-after-tokens", "2", "--fail-code", "500")
    seen: list[Token | Finished] = []
    with pytest.raises(OrchestratorError) as err:
        async for event in adapters(mock).stream(request(max_tokens=20)):
            seen.append(event)
    assert err.value.code is Code.INTERNAL
    assert "mock fault after 2 tokens" in err.value.message
    assert len(seen) == 2


@pytest.mark.parametrize("fail_after", ["0", "3"])
async def test_out_of_memory_is_replica_exhausted(
    start_mock: StartMock, adapters: Any, fail_after: str
) -> None:
    mock = await start_mock("--fail-after-tokens", fail_after, "--fail-code", "oom", "--token-delay-ms", "0")
    with pytest.raises(OrchestratorError) as err:
        await collect(adapters(mock), request(max_tokens=20))
    assert err.value.code is Code.REPLICA_EXHAUSTED
    assert "out of memory" in err.value.message


async def test_http_status_at_submit(
    start_mock: StartMock, adapters: Any, http: aiohttp.ClientSession
) -> None:
    mock = await start_mock("--fail-after-tokens", "0", "--fail-code", "503")
    with pytest.raises(OrchestratorError) as err:
        await collect(adapters(mock), request())
    assert err.value.code is Code.REPLICA_EXHAUSTED

    await control(http, mock, fail_code="500")
    with pytest.raises(OrchestratorError) as err:
        await collect(adapters(mock), request())
    assert err.value.code is Code.INTERNAL

    await control(http, mock, fail_after_tokens=None, ctx=64)
    with pytest.raises(OrchestratorError) as err:
        await collect(adapters(mock), request(prompt="x" * 400))
    assert err.value.code is Code.INVALID_PARAMS


async def test_health_follows_the_loading_phase(
    start_mock: StartMock, adapters: Any, http: aiohttp.ClientSession
) -> None:
    mock = await start_mock("--start-delay-ms", "600000", ready=False)
    adapter = adapters(mock)
    assert await adapter.health() == EngineHealth(live=True, ready=False)
    with pytest.raises(OrchestratorError) as err:
        await adapter.props()
    assert err.value.code is Code.POOL_UNREADY

    await control(http, mock, start_delay_ms=0)
    assert await adapter.health() == EngineHealth(live=True, ready=True)

    mock.proc.stop()
    assert await adapter.health() == EngineHealth(live=False, ready=False)


async def test_props_capture_version_slots_and_context(start_mock: StartMock, adapters: Any) -> None:
    model = FIXTURE_MODEL
    mock = await start_mock("-m", str(model), "-c", "8192", "--parallel", "4", "--version", "2.5")
    props = await adapters(mock).props()
    assert props.engine_version == "mock-2.5"
    assert (props.slots_total, props.ctx, props.model_path) == (4, 2048, str(model))


async def test_metrics_are_parsed(start_mock: StartMock, adapters: Any) -> None:
    mock = await start_mock("--token-delay-ms", "0")
    adapter = adapters(mock)
    req = request(prompt="How many tokens is this prompt?", max_tokens=5)
    await collect(adapter, req)
    metrics = await adapter.metrics()
    assert metrics["llamacpp:prompt_tokens_total"] == math.ceil(len(req.prompt.encode()) / 4)
    assert metrics["llamacpp:tokens_predicted_total"] == 5
    assert metrics["llamacpp:requests_processing"] == 0
    assert metrics["llamacpp:requests_deferred"] == 0


async def test_connection_refused_is_worker_reset(adapters: Any) -> None:
    adapter = adapters(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(OrchestratorError) as err:
        await collect(adapter, request())
    assert err.value.code is Code.WORKER_RESET
    with pytest.raises(OrchestratorError) as err:
        await adapter.props()
    assert err.value.code is Code.WORKER_RESET
    assert await adapter.health() == EngineHealth(live=False, ready=False)


async def test_borrowed_session_stays_open(start_mock: StartMock, http: aiohttp.ClientSession) -> None:
    mock = await start_mock()
    adapter = LlamaCppAdapter(mock.url, session=http)
    assert (await adapter.health()).ready
    await adapter.aclose()
    await adapter.aclose()
    assert not http.closed

    own = LlamaCppAdapter(mock.url)
    await own.aclose()  # safe before first use
    with pytest.raises(RuntimeError):
        await own.health()
