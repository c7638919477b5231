"""Client side of every benchmark: one stream's timeline, through the stack or straight at an engine.

Streams are read in whatever chunks the socket delivers and tokens are counted by a marker, so the
client stays cheap at 25k tokens/s; tokens that arrive in one chunk count as arriving together (a gap
of 0), which is what a client sees.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Protocol

import aiohttp

STACK_TOKEN = b"event: token\n"
DIRECT_TOKEN = b'"stop":false'
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(slots=True)
class StreamTrace:
    """When a stream was asked for, and when (and how many) tokens reached the client."""

    t_send: float
    times: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    error: str | None = None
    ending: bytes = b""  # the stream's last bytes, to say why a short stream ended

    @property
    def tokens(self) -> int:
        return sum(self.counts)

    @property
    def t_first(self) -> float | None:
        return self.times[0] if self.times else None

    @property
    def t_last(self) -> float | None:
        return self.times[-1] if self.times else None

    def ttft_ms(self) -> float | None:
        return None if not self.times else (self.times[0] - self.t_send) * 1000

    def gaps_ms(self) -> list[float]:
        """Gaps between consecutive tokens (the first token has none)."""
        gaps: list[float] = []
        prev: float | None = None
        for t, n in zip(self.times, self.counts, strict=True):
            if prev is not None:
                gaps.append((t - prev) * 1000)
            gaps.extend([0.0] * (n - 1))
            prev = t
        return gaps


async def _count(content: aiohttp.StreamReader, marker: bytes, trace: StreamTrace) -> None:
    keep = len(marker) - 1
    tail = b""
    async for chunk in content.iter_any():
        now = perf_counter()
        buf = tail + chunk
        # A match cannot lie wholly inside the kept tail, so none is counted twice.
        hits = buf.count(marker)
        if hits:
            trace.times.append(now)
            trace.counts.append(hits)
        tail = buf[-keep:]
        trace.ending = (trace.ending + chunk)[-240:]


class Target(Protocol):
    name: str

    async def stream(
        self, session: aiohttp.ClientSession, index: int, max_tokens: int, trace: StreamTrace
    ) -> None: ...


class StackTarget:
    """``POST /v1/tasks``, then ``GET`` its stream right after the 202."""

    name = "stack"

    def __init__(self, url: str, headers: dict[str, str], model_ref: str) -> None:
        self.url = url
        self.headers = {**headers, **JSON_HEADERS}
        self.model_ref = model_ref

    def body(self, index: int, max_tokens: int) -> dict[str, object]:
        return {"model_ref": self.model_ref, "prompt": f"bench {index}", "max_tokens": max_tokens}

    async def stream(
        self, session: aiohttp.ClientSession, index: int, max_tokens: int, trace: StreamTrace
    ) -> None:
        body = json.dumps(self.body(index, max_tokens))
        trace.t_send = perf_counter()
        async with session.post(f"{self.url}/v1/tasks", data=body, headers=self.headers) as resp:
            if resp.status != 202:
                trace.error = f"submit {resp.status}: {(await resp.text())[:200]}"
                return
            stream_url = (await resp.json())["stream_url"]
        async with session.get(f"{self.url}{stream_url}", headers=self.headers) as resp:
            if resp.status != 200:
                trace.error = f"stream {resp.status}"
                return
            await _count(resp.content, STACK_TOKEN, trace)


class DirectTarget:
    """``POST /completion`` with ``stream: true`` straight at the engines, spread round-robin."""

    name = "direct"

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)

    async def stream(
        self, session: aiohttp.ClientSession, index: int, max_tokens: int, trace: StreamTrace
    ) -> None:
        body = json.dumps({"prompt": f"bench {index}", "n_predict": max_tokens, "stream": True})
        url = self.urls[index % len(self.urls)]
        trace.t_send = perf_counter()
        async with session.post(f"{url}/completion", data=body, headers=JSON_HEADERS) as resp:
            if resp.status != 200:
                trace.error = f"completion {resp.status}"
                return
            await _count(resp.content, DIRECT_TOKEN, trace)


async def wave(
    session: aiohttp.ClientSession, target: Target, streams: int, max_tokens: int, timeout_s: float
) -> list[StreamTrace]:
    """``streams`` concurrent streams started at once; each must deliver all ``max_tokens``.

    Streams still open after ``timeout_s`` are cut and reported as errors, with what they delivered.
    """
    traces = [StreamTrace(perf_counter()) for _ in range(streams)]

    async def one(index: int) -> None:
        trace = traces[index]
        try:
            await target.stream(session, index, max_tokens, trace)
        except aiohttp.ClientError as exc:
            trace.error = f"{type(exc).__name__}: {exc}"
        except asyncio.CancelledError:
            trace.error = f"still open after {timeout_s:g} s"
            raise
        if trace.error is None and trace.tokens != max_tokens:
            ending = trace.ending.decode(errors="replace").strip().replace("\n", " | ")
            trace.error = f"got {trace.tokens} of {max_tokens} tokens; the stream ended with: {ending}"

    tasks = [asyncio.create_task(one(i)) for i in range(streams)]
    _, pending = await asyncio.wait(tasks, timeout=timeout_s)
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return traces
