"""Reading ``data:`` lines from an engine's server-sent-event response.

The engines frame events differently: llama-server and vLLM write ``data: {json}`` (with a space), TGI
writes ``data:{json}`` (none), Triton ``data: {json}``; vLLM ends with ``data: [DONE]``. None of them
uses ``event:``, ``id:`` or multi-line data, so one line is one event; comments (keep-alives) and blank
separators are skipped.
"""

from __future__ import annotations

from typing import Final

import aiohttp

DONE: Final = b"[DONE]"
# llama-server's stop chunk echoes the prompt and the generation settings, so a line can be far longer
# than aiohttp's default line limit (128 KiB).
MAX_LINE_BYTES: Final = 64 * 1024 * 1024
_DATA: Final = b"data:"


class SseReader:
    """Pull one ``data:`` payload at a time from ``resp`` (a method, not a generator, so a consumer that
    stops early leaves nothing suspended behind it)."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._readline = resp.content.readline

    async def next_data(self) -> bytes | None:
        """The next event's payload, stripped; None at the end of the body.

        Raises aiohttp's errors as they come: a body cut off mid-chunk (the engine died) is a
        ``ClientPayloadError``.
        """
        while True:
            line = await self._readline(max_line_length=MAX_LINE_BYTES)
            if not line:
                return None
            if line.startswith(_DATA):
                payload = line[len(_DATA) :].strip()
                if payload:
                    return payload
