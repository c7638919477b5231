"""The decode loop every generating route shares: one request in one slot, paced and steered by the knobs.

The loop re-reads the knobs before every token, so ``POST /mock/control`` also steers streams in flight.
Faults before the first token are answered with an HTTP status (llama-server reports the first result's
error that way); later ones as an in-stream ``data: {"error": ...}`` event followed by the end of stream.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from aiohttp import web

from llorch_mockengine.engine import ANY_SLOT, Engine, Slot
from llorch_mockengine.replies import context_exceeded, error_body

log = logging.getLogger(__name__)

T = TypeVar("T")


class ClientGone(Exception):
    """The client closed the connection while a token was being written."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("client closed the stream")
        self.response = response


class EngineFault(Exception):
    """The ``--fail-after-tokens`` fault: an engine error object with llama-server's fields."""

    def __init__(self, fail_code: str, after: int) -> None:
        if fail_code == "oom":
            code, kind = 500, "server_error"
            message = (
                f"CUDA out of memory: failed to allocate compute buffer (mock fault after {after} tokens)"
            )
        elif fail_code == "503":
            code, kind = 503, "unavailable_error"
            message = f"Service temporarily unavailable (mock fault after {after} tokens)"
        else:
            code, kind = 500, "server_error"
            message = f"Internal server error (mock fault after {after} tokens)"
        super().__init__(message)
        self.code = code
        self.body = error_body(code, message, kind)


@dataclass(slots=True)
class Run:
    """One request's progress and timing, for the final answer and the counters."""

    n_prompt: int
    limit: int
    truncated: bool
    t_start: float
    t_first: float = 0.0
    t_end: float = 0.0
    n_out: int = 0
    stop_type: str = "limit"

    def timings(self) -> dict[str, float | int]:
        """llama-server's ``timings`` object."""
        prompt_ms = (self.t_first - self.t_start) * 1000
        predicted_ms = (self.t_end - self.t_first) * 1000
        return {
            "cache_n": 0,
            "prompt_n": self.n_prompt,
            "prompt_ms": prompt_ms,
            "prompt_per_token_ms": prompt_ms / self.n_prompt,
            "prompt_per_second": self.n_prompt / prompt_ms * 1000 if prompt_ms > 0 else 0.0,
            "predicted_n": self.n_out,
            "predicted_ms": predicted_ms,
            "predicted_per_token_ms": predicted_ms / self.n_out if self.n_out else 0.0,
            "predicted_per_second": self.n_out / predicted_ms * 1000 if predicted_ms > 0 else 0.0,
        }


async def generate(
    engine: Engine,
    slot: Slot,
    run: Run,
    tokens: Iterator[T],
    emit: Callable[[T, int], Awaitable[None]],
    ignore_eos: bool,
) -> None:
    """Feed ``tokens`` into ``emit`` until a stop condition; faults raise, crash exits, hang waits.

    A finite ``tokens`` (a structured answer) that runs out stops like an end-of-generation token.
    """
    counters = engine.counters
    while True:
        knobs = engine.knobs
        k = run.n_out
        if k >= run.limit:
            run.stop_type = "limit"
            break
        if not ignore_eos and knobs.eos_after is not None and k >= knobs.eos_after:
            run.stop_type = "eos"
            break
        if knobs.fail_after_tokens is not None and k >= knobs.fail_after_tokens:
            raise EngineFault(knobs.fail_code, k)
        if knobs.crash_after_tokens is not None and k >= knobs.crash_after_tokens:
            log.error("crashing after %d tokens (--crash-after-tokens)", k)
            os._exit(knobs.crash_exit_code)
        if knobs.hang_after_tokens is not None and k >= knobs.hang_after_tokens:
            await engine.knobs_changed()  # hangs until a control change (or the client leaves)
            continue
        token = next(tokens, None)
        if token is None:
            run.stop_type = "eos"
            break
        delay_ms = knobs.first_token_delay_ms if k == 0 else knobs.token_delay_ms
        await asyncio.sleep(delay_ms / 1000)
        if k == 0:
            run.t_first = time.monotonic()
            counters.prompt_seconds_total += run.t_first - run.t_start
        run.n_out = k + 1
        slot.n_decoded = k + 1
        slot.n_remain = run.limit - k - 1
        counters.tokens_predicted_total += 1
        counters.n_decode_total += 1
        await emit(token, k + 1)
    run.t_end = time.monotonic()
    if run.n_out == 0:
        run.t_first = run.t_end
    counters.tokens_predicted_seconds_total += run.t_end - run.t_first
    counters.n_tokens_max = max(counters.n_tokens_max, run.n_prompt + run.n_out)


Respond = Callable[[Slot, Run], Awaitable[web.StreamResponse]]


async def serve_in_slot(
    engine: Engine, n_prompt: int, n_predict: int, id_slot: int, respond: Respond
) -> web.StreamResponse:
    """Check the context, wait for a slot (deferred FIFO), let ``respond`` decode in it, keep the counts.

    ``n_predict`` outside ``0..room`` means "until the context is full", like llama-server's ``-1``.
    """
    n_ctx = engine.knobs.n_ctx_slot
    too_long = context_exceeded(n_prompt, n_ctx)
    if too_long is not None:
        return too_long
    want = id_slot if engine.slots.valid(id_slot) else ANY_SLOT
    counters = engine.counters
    counters.requests_total += 1
    counters.active += 1
    completed = False
    try:
        slot = await engine.slots.acquire(want)
        try:
            room = n_ctx - n_prompt
            limit = n_predict if 0 <= n_predict <= room else room
            truncated = not 0 <= n_predict <= room
            run = Run(n_prompt=n_prompt, limit=limit, truncated=truncated, t_start=time.monotonic())
            slot.id_task, slot.n_prompt_tokens, slot.n_decoded, slot.n_remain = (
                engine.next_task_id(),
                n_prompt,
                0,
                limit,
            )
            counters.prompt_tokens_total += n_prompt
            response = await respond(slot, run)
            completed = True
            slot.n_cached = run.n_prompt + run.n_out
            return response
        finally:
            engine.slots.release(slot)
    except ClientGone as gone:
        # aiohttp copes with returning the half-written response of a closed connection.
        return gone.response
    finally:
        counters.active -= 1
        if not completed:
            counters.aborted_total += 1
