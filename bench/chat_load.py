"""Client side of P5: ``POST /v1/chat/completions``, streamed or not, at any OpenAI-shaped server (the
stack, a peer proxy, a mock engine), timed and checked.

A streamed answer is read line by line and every ``data:`` line parsed, so a token is a chunk whose
delta carries content, whatever the server's JSON layout; the role chunk a server may send first does
not count as the first token. An answer is an error unless it is a 200 with exactly ``max_tokens``
tokens and, when streamed, ends with ``data: [DONE]``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import aiohttp

from .stats import Dist

TIMEOUT = aiohttp.ClientTimeout(total=30, sock_connect=10)


@dataclass(frozen=True, slots=True)
class ChatTarget:
    name: str
    url: str
    headers: Mapping[str, str]
    model: str

    @property
    def endpoint(self) -> str:
        return f"{self.url}/v1/chat/completions"


@dataclass(slots=True)
class Call:
    t_send: float
    t_first: float | None = None  # the first content token reached the client
    t_end: float | None = None  # the whole answer had
    tokens: int = 0
    error: str | None = None

    def ttft_ms(self) -> float | None:
        return None if self.error or self.t_first is None else (self.t_first - self.t_send) * 1000

    def total_ms(self) -> float | None:
        return None if self.error or self.t_end is None else (self.t_end - self.t_send) * 1000


def _content(choices: Any, key: str) -> str:
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return ""
    part = choices[0].get(key)
    text = part.get("content") if isinstance(part, dict) else None
    return text if isinstance(text, str) else ""


async def _read_stream(content: aiohttp.StreamReader, call: Call) -> None:
    done = False
    async for line in content:
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            continue
        chunk = json.loads(data)
        if "error" in chunk:
            call.error = call.error or f"in-stream error: {str(chunk['error'])[:200]}"
        elif _content(chunk.get("choices"), "delta"):
            call.tokens += 1
            if call.t_first is None:
                call.t_first = perf_counter()
    call.t_end = perf_counter()
    if not done and call.error is None:
        call.error = "the stream ended without data: [DONE]"


def _read_whole(raw: bytes, call: Call) -> None:
    call.t_end = perf_counter()
    answer = json.loads(raw)
    text = _content(answer.get("choices"), "message")
    usage = answer.get("usage")
    counted = usage.get("completion_tokens") if isinstance(usage, dict) else None
    call.tokens = counted if isinstance(counted, int) else len(text.split())
    if not text:
        call.error = f"no content in {raw[:200].decode(errors='replace')}"


async def chat(
    session: aiohttp.ClientSession, target: ChatTarget, index: int, max_tokens: int, stream: bool
) -> Call:
    """One request; never raises for what the server or the connection does, that is ``Call.error``."""
    messages = [{"role": "user", "content": f"p5 {index}"}]
    body = {"model": target.model, "messages": messages, "max_tokens": max_tokens, "stream": stream}
    headers = {**target.headers, "Content-Type": "application/json"}
    call = Call(perf_counter())
    try:
        async with session.post(target.endpoint, data=json.dumps(body), headers=headers) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                call.error = f"{target.name}: HTTP {resp.status}: {text}"
                return call
            if stream:
                await _read_stream(resp.content, call)
            else:
                _read_whole(await resp.read(), call)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        call.error = f"{target.name}: {type(exc).__name__}: {exc}"
        return call
    if call.error is None and call.tokens != max_tokens:
        call.error = f"{target.name}: got {call.tokens} of {max_tokens} tokens"
    return call


async def waves(
    session: aiohttp.ClientSession, target: ChatTarget, concurrency: int, count: int, max_tokens: int
) -> list[Call]:
    """``count`` waves of ``concurrency`` streamed requests started together, one wave after another."""
    calls: list[Call] = []
    for wave in range(count):
        batch = [chat(session, target, wave * concurrency + i, max_tokens, True) for i in range(concurrency)]
        calls += await asyncio.gather(*batch)
    return calls


@dataclass(slots=True)
class Rate:
    """Answers of a closed loop: ``clients`` each sending the next request when the last one ended."""

    seconds: float = 0.0
    calls: list[Call] = field(default_factory=list)

    @property
    def ok(self) -> int:
        return sum(1 for c in self.calls if c.error is None)

    @property
    def errors(self) -> list[str]:
        return [c.error for c in self.calls if c.error is not None]

    @property
    def per_s(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        latency = Dist.of([ms for c in self.calls if (ms := c.total_ms()) is not None])
        return {
            "per_s": round(self.per_s, 1),
            "answers": self.ok,
            "errors": len(self.errors),
            "seconds": round(self.seconds, 2),
            "latency": latency.as_json(),
        }


async def hammer(
    session: aiohttp.ClientSession,
    target: ChatTarget,
    clients: int,
    duration_s: float,
    max_tokens: int,
    stream: bool,
    max_requests: int,
) -> Rate:
    """Closed loop for ``duration_s`` (no request starts after it) or ``max_requests`` requests;
    the rate is answers over the time from the first send to the last answer."""
    rate = Rate()
    started = perf_counter()
    deadline = started + duration_s

    async def client(first: int) -> None:
        index = first
        while perf_counter() < deadline and len(rate.calls) < max_requests:
            rate.calls.append(await chat(session, target, index, max_tokens, stream))
            index += clients

    await asyncio.gather(*(client(k) for k in range(clients)))
    ends = [c.t_end for c in rate.calls if c.t_end is not None]
    rate.seconds = (max(ends) if ends else perf_counter()) - started
    return rate
