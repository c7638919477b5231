"""The startup self-test (ORCH-3049): a replica turns Ready only after it passes.

Steps, all within the pool's `timeouts.selftest_ms`: (1) read the engine's version, slots and ctx;
(2) decode one greedy token of "Hello"; (3) start a streaming request for 16 tokens, abort it after
the first token and check the engine shows no busy slot within 2 s; (4) read the engine's metrics
where it has them. The caller checks its own metrics afterwards (it records the outcome).

Step 3's window is SPEC's 2 s, or :data:`ABORT_WINDOW_DECODES` times step 2's one-token decode when the
engine is slower than that: a CPU engine that shares its cores (the old generation decoding beside the
new during a reload, on a small box) may need longer than 2 s only to reach the point where it sees the
closed connection. A slot that never frees still fails.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

from llorch.adapters.base import EngineAdapter, EngineProps, Finished, GenerateRequest, Token
from llorch.errors import OrchestratorError

IDLE_AFTER_ABORT_S: Final = 2.0
ABORT_WINDOW_DECODES: Final = 8
_POLL_S: Final = 0.05


class SelfTestFailed(Exception):
    pass


async def _one_token(adapter: EngineAdapter) -> float:
    """Decode one greedy token; returns how long it took (s)."""
    began = time.monotonic()
    request = GenerateRequest(task_id="selftest-decode", prompt="Hello", max_tokens=1, seed=0)
    finished: Finished | None = None
    async for item in adapter.stream(request):
        if isinstance(item, Finished):
            finished = item
    if finished is None:
        raise SelfTestFailed("step 2: the greedy decode of 'Hello' did not finish")
    return time.monotonic() - began


async def _abort_frees_slot(adapter: EngineAdapter, window_s: float) -> None:
    request = GenerateRequest(task_id="selftest-abort", prompt="Hello", max_tokens=16, seed=0)
    stream = adapter.stream(request)
    try:
        async for item in stream:
            if isinstance(item, Token | Finished):
                break
    finally:
        await stream.aclose()
    deadline = time.monotonic() + window_s
    while True:
        busy = await adapter.busy_slots()
        if busy is None or busy == 0:
            return
        if time.monotonic() >= deadline:
            raise SelfTestFailed(f"step 3: {busy} slot(s) still busy {window_s:.1f} s after abort")
        await asyncio.sleep(_POLL_S)


async def run_selftest(adapter: EngineAdapter, timeout_s: float) -> EngineProps:
    """Run steps 1-4; returns the engine's properties, raises SelfTestFailed naming the failed step."""
    step = "step 1: read version, slots and ctx"
    try:
        async with asyncio.timeout(timeout_s):
            props = await adapter.props()
            step = "step 2: greedy decode of 'Hello'"
            decode_s = await _one_token(adapter)
            step = "step 3: abort after the first token"
            await _abort_frees_slot(adapter, max(IDLE_AFTER_ABORT_S, ABORT_WINDOW_DECODES * decode_s))
            step = "step 4: engine metrics"
            await adapter.metrics()
            return props
    except TimeoutError as exc:
        raise SelfTestFailed(f"{step}: no answer within timeouts.selftest_ms ({timeout_s:.0f} s)") from exc
    except OrchestratorError as exc:
        raise SelfTestFailed(f"{step}: {exc.code.value}: {exc.message}") from exc
