"""The mock engine as a real process: llama-server's wire format, determinism and every fault knob."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llorch_mockengine.generation import WORDS, completion_text
from tests.support.mockengine import FIXTURE_MODEL, Mock, StartMock
from tests.support.procs import Proc, free_port, python_module, wait_until

TOKEN_KEYS = ["index", "content", "tokens", "stop", "id_slot", "tokens_predicted", "tokens_evaluated"]
LOADING = {"error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def get_json(http: aiohttp.ClientSession, url: str) -> Any:
    async with http.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def control(http: aiohttp.ClientSession, mock: Mock, **knobs: object) -> Any:
    async with http.post(f"{mock.url}/mock/control", json=knobs) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def stream_events(
    http: aiohttp.ClientSession, mock: Mock, **body: object
) -> tuple[list[bytes], list[dict[str, Any]]]:
    """POST a streaming /completion, return the raw ``data:`` events and their JSON."""
    async with http.post(f"{mock.url}/completion", json={"stream": True, **body}) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.read()
    assert raw.endswith(b"\n\n")
    events = raw.split(b"\n\n")[:-1]
    return events, [json.loads(event.removeprefix(b"data: ")) for event in events]


async def read_event(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The next ``data:`` event of an open stream."""
    while True:
        line = await resp.content.readline()
        assert line, "stream ended"
        if line.startswith(b"data: "):
            event: dict[str, Any] = json.loads(line[6:])
            return event


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(chunk["content"] for chunk in chunks if not chunk["stop"])


def prompt_est(prompt: str) -> int:
    return max(1, math.ceil(len(prompt.encode()) / 4))


async def stats(http: aiohttp.ClientSession, mock: Mock) -> dict[str, int]:
    result: dict[str, int] = await get_json(http, f"{mock.url}/mock/stats")
    return result


async def slots_idle(http: aiohttp.ClientSession, mock: Mock) -> bool:
    return not any(slot["is_processing"] for slot in await get_json(http, f"{mock.url}/slots"))


async def test_stream_chunks_follow_llama_server_format(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    mock = await start_mock()
    prompt = "Tell me about GPUs, please."
    raw, chunks = await stream_events(http, mock, prompt=prompt, n_predict=5, seed=7)

    assert all(event.startswith(b"data: {") for event in raw)
    assert len(chunks) == 6
    for k, chunk in enumerate(chunks[:5], start=1):
        assert list(chunk) == TOKEN_KEYS
        assert chunk["index"] == 0 and chunk["stop"] is False and chunk["id_slot"] == -1
        assert chunk["content"].startswith(" ") and chunk["content"][1:] in WORDS
        assert chunk["tokens"] == [1000 + WORDS.index(chunk["content"][1:])]
        assert chunk["tokens_predicted"] == k
        assert chunk["tokens_evaluated"] == prompt_est(prompt)
    final = chunks[-1]
    assert final["stop"] is True and final["content"] == "" and final["stop_type"] == "limit"
    assert final["tokens_predicted"] == 5 and final["tokens_evaluated"] == prompt_est(prompt)
    assert final["id_slot"] == 0 and final["model"] == "mock"
    timings = final["timings"]
    assert timings["prompt_n"] == prompt_est(prompt) and timings["predicted_n"] == 5
    assert {"prompt_ms", "predicted_ms", "predicted_per_second"} <= set(timings)


async def test_non_streaming_returns_the_same_text(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    mock = await start_mock()
    _, chunks = await stream_events(http, mock, prompt="abc", n_predict=4, seed=3)
    async with http.post(f"{mock.url}/completion", json={"prompt": "abc", "n_predict": 4, "seed": 3}) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["content"] == text_of(chunks)
    assert body["stop"] is True and body["stop_type"] == "limit"
    assert body["tokens_predicted"] == 4 and body["tokens_evaluated"] == 1


async def test_output_is_deterministic_per_model_prompt_and_seed(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    with_model = await start_mock("--model", str(FIXTURE_MODEL), "--token-delay-ms", "0")
    without_model = await start_mock("--token-delay-ms", "0")
    digest = hashlib.sha256(FIXTURE_MODEL.read_bytes()).hexdigest()

    async def text(mock: Mock, prompt: str, seed: int) -> str:
        _, chunks = await stream_events(http, mock, prompt=prompt, n_predict=16, seed=seed)
        return text_of(chunks)

    first = await text(with_model, "Once upon a time", 42)
    assert first == await text(with_model, "Once upon a time", 42)
    assert first == completion_text(digest, "Once upon a time", 42, 16)  # the SPEC formula
    assert first != await text(with_model, "Once upon a time", 43)
    assert first != await text(with_model, "Once upon a time!", 42)
    other_model = await text(without_model, "Once upon a time", 42)
    assert other_model != first
    assert other_model == completion_text("none", "Once upon a time", 42, 16)


async def test_n_predict_default_and_eos_after(start_mock: StartMock, http: aiohttp.ClientSession) -> None:
    mock = await start_mock("--eos-after", "3", "--token-delay-ms", "0")

    _, chunks = await stream_events(http, mock, prompt="p", n_predict=10, seed=1)
    assert (chunks[-1]["stop_type"], chunks[-1]["tokens_predicted"], len(chunks)) == ("eos", 3, 4)

    _, chunks = await stream_events(http, mock, prompt="p", n_predict=2, seed=1)
    assert (chunks[-1]["stop_type"], chunks[-1]["tokens_predicted"]) == ("limit", 2)

    _, chunks = await stream_events(http, mock, prompt="p", n_predict=10, seed=1, ignore_eos=True)
    assert (chunks[-1]["stop_type"], chunks[-1]["tokens_predicted"]) == ("limit", 10)

    _, chunks = await stream_events(http, mock, prompt="p", seed=1, ignore_eos=True)
    assert (chunks[-1]["stop_type"], chunks[-1]["tokens_predicted"]) == ("limit", 16)


async def test_start_delay_answers_loading_until_loaded(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    mock = await start_mock("--start-delay-ms", "600000", ready=False)
    async with http.get(f"{mock.url}/health") as resp:
        assert resp.status == 503
        assert await resp.json() == LOADING
    async with http.post(f"{mock.url}/completion", json={"prompt": "x"}) as resp:
        assert resp.status == 503
    await control(http, mock, start_delay_ms=0)
    async with http.get(f"{mock.url}/health") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}


async def test_short_start_delay_ends_by_itself(start_mock: StartMock, http: aiohttp.ClientSession) -> None:
    mock = await start_mock("--start-delay-ms", "300", ready=False)

    async def healthy() -> bool:
        async with http.get(f"{mock.url}/health") as resp:
            return resp.status == 200

    await wait_until(healthy, timeout_s=30, what="the start delay to end")


async def test_preload_fail_exit(tmp_path: Path) -> None:
    port = free_port()
    proc = Proc(
        python_module("llorch_mockengine", "--port", str(port), "--preload-fail", "exit"), tmp_path / "m.log"
    )
    try:

        async def exited() -> bool:
            return not proc.alive()

        await wait_until(exited, timeout_s=60, what="the mock to exit")
        assert proc.popen.returncode == 1
        assert "failed to load model" in proc.log_text()
    finally:
        proc.stop()


async def test_preload_fail_health(start_mock: StartMock, http: aiohttp.ClientSession) -> None:
    mock = await start_mock("--preload-fail", "health", ready=False)

    async def failing() -> bool:
        async with http.get(f"{mock.url}/health") as resp:
            return resp.status == 500 and await resp.json() == {"status": "error"}

    await wait_until(failing, timeout_s=30, what="/health to answer 500")
    for _ in range(3):
        assert await failing()
    assert mock.alive()


@pytest.mark.parametrize(
    ("fail_code", "expected"),
    [
        ("500", (500, "server_error", "mock fault")),
        ("503", (503, "unavailable_error", "mock fault")),
        ("oom", (500, "server_error", "CUDA out of memory")),
    ],
)
async def test_fail_after_tokens_sends_an_error_object(
    start_mock: StartMock, http: aiohttp.ClientSession, fail_code: str, expected: tuple[int, str, str]
) -> None:
    code, kind, needle = expected
    mock = await start_mock("--fail-after-tokens", "2", "--fail-code", fail_code)
    _, chunks = await stream_events(http, mock, prompt="p", n_predict=10, seed=1)
    assert [chunk.get("tokens_predicted") for chunk in chunks[:2]] == [1, 2]
    assert len(chunks) == 3
    error = chunks[2]["error"]
    assert (error["code"], error["type"]) == (code, kind)
    assert needle in error["message"]
    assert (await stats(http, mock))["aborted_total"] == 0


async def test_fail_before_the_first_token_is_an_http_status(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    mock = await start_mock("--fail-after-tokens", "0", "--fail-code", "503")
    async with http.post(f"{mock.url}/completion", json={"prompt": "p", "stream": True}) as resp:
        assert resp.status == 503
        body = await resp.json()
    assert body["error"]["code"] == 503 and body["error"]["type"] == "unavailable_error"


@pytest.mark.parametrize("exit_args", [(), ("--crash-exit-code", "7")])
async def test_crash_after_tokens_exits_mid_stream(
    start_mock: StartMock, http: aiohttp.ClientSession, exit_args: tuple[str, ...]
) -> None:
    mock = await start_mock("--crash-after-tokens", "3", "--token-delay-ms", "0", *exit_args)
    received: list[bytes] = []
    with pytest.raises(aiohttp.ClientError):
        async with http.post(
            f"{mock.url}/completion", json={"prompt": "p", "n_predict": 50, "stream": True}
        ) as r:
            async for line in r.content:
                if line.startswith(b"data: "):
                    received.append(line)

    async def exited() -> bool:
        return not mock.alive()

    await wait_until(exited, timeout_s=30, what="the mock to exit")
    assert mock.proc.popen.returncode == (int(exit_args[1]) if exit_args else 134)
    assert len(received) == 3


async def test_hang_after_tokens_keeps_the_connection_open(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    mock = await start_mock("--hang-after-tokens", "2", "--token-delay-ms", "0")
    body = {"prompt": "p", "n_predict": 6, "stream": True}
    async with http.post(f"{mock.url}/completion", json=body) as resp:
        assert [(await read_event(resp))["tokens_predicted"] for _ in range(2)] == [1, 2]
        slot = (await get_json(http, f"{mock.url}/slots"))[0]
        assert slot["is_processing"] is True and slot["next_token"][0]["n_decoded"] == 2
        # Nothing more arrives although the connection stays open (without the knob, 6 tokens come at once).
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(read_event(resp), timeout=0.5)
        assert not resp.content.at_eof()
        # Lifting the knob lets the hung stream finish.
        await control(http, mock, hang_after_tokens=None)
        rest = [await read_event(resp) for _ in range(5)]
    assert [chunk["tokens_predicted"] for chunk in rest] == [3, 4, 5, 6, 6]
    assert rest[-1]["stop"] is True

    await control(http, mock, hang_after_tokens=1)
    async with http.post(f"{mock.url}/completion", json=body) as resp:
        await read_event(resp)
    # The client left the hung stream: an abort, and the slot is free again.

    async def aborted() -> bool:
        return (await stats(http, mock))["aborted_total"] == 1

    await wait_until(aborted, what="the hung stream to count as aborted")
    await wait_until(lambda: slots_idle(http, mock), what="the slot to be free")


async def test_parallel_slots_defer_excess_requests(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    mock = await start_mock("--parallel", "2", "--hang-after-tokens", "1", "--token-delay-ms", "0")
    body = {"prompt": "p", "n_predict": 5, "stream": True}
    first = await http.post(f"{mock.url}/completion", json=body)
    second = await http.post(f"{mock.url}/completion", json=body)
    try:
        assert (await read_event(first))["tokens_predicted"] == 1
        assert (await read_event(second))["tokens_predicted"] == 1
        slots = await get_json(http, f"{mock.url}/slots")
        assert [slot["is_processing"] for slot in slots] == [True, True]
        third = asyncio.create_task(http.post(f"{mock.url}/completion", json=body))

        async def deferred() -> bool:
            async with http.get(f"{mock.url}/metrics") as resp:
                return "llamacpp:requests_deferred 1\n" in await resp.text()

        await wait_until(deferred, what="the third request to be deferred")
        assert (await stats(http, mock))["deferred"] == 1
        assert not third.done()

        first.close()  # frees a slot: the deferred request gets it
        third_resp = await third
        try:
            assert (await read_event(third_resp))["tokens_predicted"] == 1
            current = await stats(http, mock)
            assert (current["deferred"], current["deferred_total"], current["aborted_total"]) == (0, 1, 1)
        finally:
            third_resp.close()
    finally:
        first.close()
        second.close()

    async def all_aborted() -> bool:
        current = await stats(http, mock)
        return current["aborted_total"] == 3 and current["active"] == 0

    await wait_until(all_aborted, what="three aborts")
    await wait_until(lambda: slots_idle(http, mock), what="both slots free")


async def test_client_close_counts_as_aborted_and_frees_the_slot(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    mock = await start_mock()
    async with http.post(
        f"{mock.url}/completion", json={"prompt": "p", "n_predict": 3000, "stream": True, "ignore_eos": True}
    ) as resp:
        await read_event(resp)
        await read_event(resp)
        assert (await stats(http, mock))["active"] == 1
        resp.close()

    async def aborted() -> bool:
        current = await stats(http, mock)
        return current["aborted_total"] == 1 and current["active"] == 0

    await wait_until(aborted, what="the abort to be counted")
    await wait_until(lambda: slots_idle(http, mock), what="the slot to be free")
    assert (await stats(http, mock))["requests_total"] == 1


async def test_control_changes_knobs_at_runtime(start_mock: StartMock, http: aiohttp.ClientSession) -> None:
    mock = await start_mock("--token-delay-ms", "0")
    knobs = await get_json(http, f"{mock.url}/mock/control")
    assert knobs["eos_after"] is None and knobs["parallel"] == 1 and knobs["fail_code"] == "500"

    updated = await control(http, mock, eos_after=2, **{"first-token-delay-ms": 1})
    assert updated["eos_after"] == 2 and updated["first_token_delay_ms"] == 1.0
    _, chunks = await stream_events(http, mock, prompt="p", n_predict=10, seed=1)
    assert (chunks[-1]["stop_type"], chunks[-1]["tokens_predicted"]) == ("eos", 2)

    await control(http, mock, eos_after=None, parallel=3, version="9.9")
    _, chunks = await stream_events(http, mock, prompt="p", n_predict=10, seed=1)
    assert chunks[-1]["tokens_predicted"] == 10
    props = await get_json(http, f"{mock.url}/props")
    assert (props["total_slots"], props["build_info"]) == (3, "mock-9.9")
    assert len(await get_json(http, f"{mock.url}/slots")) == 3

    for bad in ({"no_such_knob": 1}, {"token_delay_ms": "fast"}, {"port": 1}, {"fail_code": "404"}):
        async with http.post(f"{mock.url}/mock/control", json=bad) as resp:
            assert resp.status == 400, bad
            assert next(iter(bad)) in (await resp.json())["error"]
    assert (await get_json(http, f"{mock.url}/mock/control"))["token_delay_ms"] == 0.0

    await control(http, mock, fail_after_tokens=1, fail_code="oom")
    _, chunks = await stream_events(http, mock, prompt="p", n_predict=10, seed=1)
    assert "CUDA out of memory" in chunks[-1]["error"]["message"]


async def test_llama_server_command_line_and_routes(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    mock = await start_mock(
        *("-m", str(FIXTURE_MODEL), "-c", "4096", "-np", "2", "--threads", "2", "-ngl", "999"),
        *("--metrics", "--no-webui", "--no-cont-batching", "--alias", "tiny", "--version", "1.2.3"),
        *("--vram-used-bytes", "1000", "--vram-total-bytes", "8000", "--gpu-util", "37.5"),
    )
    props = await get_json(http, f"{mock.url}/props")
    assert props["total_slots"] == 2 and props["default_generation_settings"]["n_ctx"] == 2048
    assert (props["model_path"], props["model_alias"]) == (str(FIXTURE_MODEL), "tiny")
    assert props["build_info"] == "mock-1.2.3"
    slots = await get_json(http, f"{mock.url}/slots")
    assert [(slot["id"], slot["n_ctx"], slot["is_processing"]) for slot in slots] == [
        (0, 2048, False),
        (1, 2048, False),
    ]

    models = await get_json(http, f"{mock.url}/v1/models")
    assert models["object"] == "list" and models["data"][0]["id"] == "tiny"
    assert await get_json(http, f"{mock.url}/mock/telemetry") == {
        "vram_used_bytes": 1000,
        "vram_total_bytes": 8000,
        "gpu_util": 37.5,
    }

    async with http.post(f"{mock.url}/tokenize", json={"content": "Hello there!"}) as resp:
        assert len((await resp.json())["tokens"]) == 3
    async with http.post(
        f"{mock.url}/apply-template", json={"messages": [{"role": "user", "content": "hi"}]}
    ) as r:
        assert (await r.json())["prompt"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    prompt = "Count the GPUs in the rack."
    await stream_events(http, mock, prompt=prompt, n_predict=4, seed=1)
    async with http.get(f"{mock.url}/metrics") as resp:
        text = await resp.text()
    for name in ("prompt_tokens_total", "tokens_predicted_total", "requests_processing", "requests_deferred"):
        assert f"# TYPE llamacpp:{name} " in text
    assert f"llamacpp:prompt_tokens_total {prompt_est(prompt)}\n" in text
    assert "llamacpp:tokens_predicted_total 4\n" in text

    async with http.post(f"{mock.url}/slots/0?action=erase") as resp:
        assert await resp.json() == {"id_slot": 0, "n_erased": prompt_est(prompt) + 4}
    async with http.post(f"{mock.url}/slots/9?action=erase") as resp:
        assert resp.status == 400


async def test_prompt_beyond_the_context_is_rejected(
    start_mock: StartMock, http: aiohttp.ClientSession
) -> None:
    mock = await start_mock("-c", "64")
    async with http.post(f"{mock.url}/completion", json={"prompt": "x" * 400, "stream": True}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "exceed_context_size_error" and error["n_ctx"] == 64


def test_bare_version_flag_prints_the_build() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "llorch_mockengine", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.startswith("version: mock-")
