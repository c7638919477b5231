"""Reading ``data:`` lines from an engine's server-sent-event response.

The engines frame events differently: llama-server and vLLM write ``data: {json}`` (with a space), TGI
writes ``data:{json}`` (none), Triton ``data: {json}``; vLLM ends with ``data: [DONE]``. None of them
uses ``event:``, ``id:`` or multi-line data, so one line is one event; comments (keep-alives) and blank
separators are skipped.

This is the pool manager's hottest read: the connection (:mod:`llorch.adapters._stream`) hands the
body over in whatever pieces it reads (under load, many events at once), and they are split into lines
here rather than with one ``readline`` await per line. :func:`loads` parses a chunk's JSON with orjson
(a llama-server token chunk in about a third of the C scanner's time, and a sixth of ``json.loads``'),
falling back to ``json.loads`` for what orjson refuses, so the errors stay ``json.loads``' own.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from typing import Any, Final

import orjson

DONE: Final = b"[DONE]"
# llama-server's stop chunk echoes the prompt and the generation settings, so a line can be far longer
# than a usual line limit (aiohttp's is 128 KiB).
MAX_LINE_BYTES: Final = 64 * 1024 * 1024
_DATA: Final = b"data:"


def loads(data: bytes) -> Any:
    """``json.loads(data)`` for one event's payload, through orjson. What orjson refuses and
    ``json.loads`` may take (NaN, a BOM, a lone surrogate, other encodings) or rejects with its own
    message goes through ``json.loads`` itself. One difference stays: orjson reads an integer past
    64 bits as a float; no engine field (counts, token ids, slot ids) comes near that."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


class SseReader:
    """The ``data:`` payloads of one event stream, pushed in by the connection (:meth:`feed` with each
    piece of the body as it arrives, then :meth:`end` or :meth:`fail`) and pulled out one at a time by
    the adapter (:meth:`next_data`: a method, not a generator, so a consumer that stops early leaves
    nothing suspended behind it).

    Nothing pauses the connection: the pool manager's consumer takes every payload as soon as its task
    runs, so what waits here is at most what the event loop read in one pass.
    """

    def __init__(self) -> None:
        self._ready: deque[bytes] = deque()  # payloads read but not yet returned, in order
        self._partial: list[bytes] = []  # the pieces of a line whose newline has not come yet
        self._partial_len = 0
        self._eof = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def next_data(self) -> bytes | None:
        """The next event's payload, stripped; None at the end of the body.

        Payloads that arrived before a failure are returned first; then the failure is raised (a body
        cut off mid-chunk is a ``ConnectionError``; a line over :data:`MAX_LINE_BYTES` a ``ValueError``).
        """
        ready = self._ready
        while not ready:
            if self._error is not None:
                raise self._error
            if self._eof:
                return None
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return ready.popleft()

    def feed(self, chunk: bytes) -> None:
        """Take the next piece of the body; raises ``ValueError`` for a line over the limit. Pieces
        after a failure are dropped."""
        if self._error is not None:
            return
        if b"\n" not in chunk:
            self._partial.append(chunk)
            self._partial_len += len(chunk)
            if self._partial_len > MAX_LINE_BYTES:
                raise ValueError("Chunk too big")
            return
        if self._partial:
            self._partial.append(chunk)
            chunk = b"".join(self._partial)
            self._partial.clear()
        lines = chunk.split(b"\n")
        rest = lines.pop()
        if rest:
            self._partial.append(rest)
        self._partial_len = len(rest)
        self._lines(lines)
        if self._ready:
            self._wake()

    def end(self) -> None:
        """The body is complete: a last line without its newline still counts."""
        if self._error is not None:
            return
        if self._partial:
            self._lines([b"".join(self._partial)])
            self._partial.clear()
        self._eof = True
        self._wake()

    def fail(self, error: BaseException) -> None:
        """The body broke: :meth:`next_data` raises ``error`` once the complete payloads before it are
        read (a line cut off by the failure is dropped)."""
        if not self._eof and self._error is None:
            self._error = error
            self._partial.clear()
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _lines(self, lines: list[bytes]) -> None:
        for line in lines:
            if line.startswith(_DATA):
                payload = line[5:].strip()
                if payload:
                    self._ready.append(payload)
