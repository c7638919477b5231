"""Server-Sent Events as the gateway sends them (SPEC §3): frames of ``id``/``event``/``data`` lines
ended by a blank line, comments (``: hb``) as keepalive."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class SseFrame:
    """One dispatched event: ``event`` defaults to ``message``; ``data`` lines are joined by newlines."""

    event: str
    data: str
    id: str | None = None


def sse_frames(lines: Iterable[bytes]) -> Iterator[SseFrame]:
    """The frames in a stream of lines (each with or without its line ending).

    Follows the SSE parsing rules the gateway needs: comments are skipped, one optional space after the
    colon is dropped, unknown fields are ignored and a frame without data is not dispatched. A frame
    cut off by the end of the stream is dropped, as a browser would."""
    event = ""
    data: list[str] = []
    last_id: str | None = None
    for raw in lines:
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        if not line:
            if data:
                yield SseFrame(event or "message", "\n".join(data), last_id)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            last_id = value
