"""The engine-side SSE reader: lines split across reads, several events in one read, and the JSON
fast path behave exactly like line-by-line reading and ``json.loads``."""

from __future__ import annotations

import asyncio
import json

import pytest

from llorch.adapters._sse import MAX_LINE_BYTES, SseReader, loads

BODY = (
    b": keep-alive\n\n"
    b'data: {"content":" a","stop":false}\n\n'
    b'data:{"content":"b"}\r\n\r\n'
    b"event: ignored\n"
    b"data: \n\n"
    b'data: {"content":"\xc3\xa9","stop":true}\n\n'
    b"data: [DONE]"  # the last line may lack its newline
)
EXPECTED = [
    b'{"content":" a","stop":false}',
    b'{"content":"b"}',
    b'{"content":"\xc3\xa9","stop":true}',
    b"[DONE]",
]


async def _all(chunks: list[bytes]) -> list[bytes]:
    reader = SseReader()
    for chunk in chunks:
        reader.feed(chunk)
    reader.end()
    out = []
    while (data := await reader.next_data()) is not None:
        out.append(data)
    assert await reader.next_data() is None
    return out


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, 64, len(BODY)])
async def test_any_split_of_the_body_gives_the_same_events(size: int) -> None:
    chunks = [BODY[i : i + size] for i in range(0, len(BODY), size)]
    assert await _all(chunks) == EXPECTED


async def test_a_waiting_reader_wakes_for_each_piece_and_at_the_end() -> None:
    reader = SseReader()
    first = asyncio.ensure_future(reader.next_data())
    await asyncio.sleep(0)  # the reader is waiting now (an ordering step, not a timed wait)
    assert not first.done()
    reader.feed(b"data: 1\n")
    assert await first == b"1"
    last = asyncio.ensure_future(reader.next_data())
    await asyncio.sleep(0)
    reader.feed(b"data: 2")  # no newline yet: nothing to hand over
    await asyncio.sleep(0)
    assert not last.done()
    reader.end()
    assert await last == b"2"
    assert await reader.next_data() is None


async def test_a_failure_comes_after_the_payloads_before_it() -> None:
    reader = SseReader()
    reader.feed(b"data: 1\ndata: 2\ndata: cut")
    reader.fail(ConnectionResetError("cut"))
    assert [await reader.next_data(), await reader.next_data()] == [b"1", b"2"]
    with pytest.raises(ConnectionResetError):
        await reader.next_data()
    reader.end()  # an end after the failure does not hide it
    with pytest.raises(ConnectionResetError):
        await reader.next_data()


async def test_an_endless_line_is_refused() -> None:
    piece = b"data: " + b"x" * (1 << 20)
    reader = SseReader()
    with pytest.raises(ValueError, match="too big"):  # the limit is crossed mid-loop
        for _ in range(MAX_LINE_BYTES // len(piece) + 2):
            reader.feed(piece)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"content":" hi","tokens":[3],"stop":false,"n":1.5e3,"x":null}',
        b'"\xe2\x82\xac"',
        b"[1, 2]",
        b'{"a":1,"a":2}',  # the last one wins
        # what orjson refuses and json.loads takes
        b"\xef\xbb\xbf{}",  # a BOM
        b'{"n":NaN,"m":-Infinity}',
        b'"\\ud800"',  # a lone surrogate, escaped
    ],
)
def test_loads_is_json_loads(raw: bytes) -> None:
    assert loads(raw) == json.loads(raw)


@pytest.mark.parametrize("raw", [b"{", b'{"a":1} x', b"nope", b"\xff{}", b""])
def test_loads_raises_what_json_loads_raises(raw: bytes) -> None:
    with pytest.raises(ValueError) as ours:
        loads(raw)
    with pytest.raises(ValueError) as theirs:
        json.loads(raw)
    assert type(ours.value) is type(theirs.value)
