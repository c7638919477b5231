"""Reading ``data:`` lines from an engine's server-sent-event response.

The engines frame events differently: llama-server and vLLM write ``data: {json}`` (with a space), TGI
writes ``data:{json}`` (none), Triton ``data: {json}``; vLLM ends with ``data: [DONE]``. None of them
uses ``event:``, ``id:`` or multi-line data, so one line is one event; comments (keep-alives) and blank
separators are skipped.

This is the pool manager's hottest read: the body is taken in whatever pieces the connection has
buffered (under load, many events at once) and split into lines here, rather than one ``readline``
await per line, and :func:`loads` parses a chunk's JSON with orjson (a llama-server token chunk in
about a third of the C scanner's time, and a sixth of ``json.loads``'), falling back to ``json.loads``
for what orjson refuses, so the errors stay ``json.loads``' own.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, Final

import aiohttp
import orjson

DONE: Final = b"[DONE]"
# llama-server's stop chunk echoes the prompt and the generation settings, so a line can be far longer
# than aiohttp's default line limit (128 KiB).
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
    """Pull one ``data:`` payload at a time from ``resp`` (a method, not a generator, so a consumer that
    stops early leaves nothing suspended behind it)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._content = resp.content
        self._ready: deque[bytes] = deque()  # payloads read but not yet returned, in order
        self._partial: list[bytes] = []  # the pieces of a line whose newline has not come yet
        self._partial_len = 0
        self._eof = False

    async def next_data(self) -> bytes | None:
        """The next event's payload, stripped; None at the end of the body.

        Raises aiohttp's errors as they come: a body cut off mid-chunk (the engine died) is a
        ``ClientPayloadError``; a line over :data:`MAX_LINE_BYTES` is a ``ValueError``.
        """
        ready = self._ready
        while not ready:
            if self._eof:
                return None
            chunk = await self._content.readany()
            if chunk:
                self._feed(chunk)
            else:  # the end of the body: a last line without its newline still counts
                self._eof = True
                if self._partial:
                    self._lines([b"".join(self._partial)])
                    self._partial.clear()
        return ready.popleft()

    def _feed(self, chunk: bytes) -> None:
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

    def _lines(self, lines: list[bytes]) -> None:
        for line in lines:
            if line.startswith(_DATA):
                payload = line[5:].strip()
                if payload:
                    self._ready.append(payload)
