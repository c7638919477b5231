"""hiredis packs a command into exactly the bytes redis-py's asyncio connection does, and refuses what
redis-py refuses with the same error type."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from redis.asyncio.connection import Connection
from redis.exceptions import DataError

from llorch.respwire import HiredisConnection

ARG = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
)


def _both(*args: object) -> tuple[bytes, bytes]:
    return b"".join(Connection().pack_command(*args)), b"".join(HiredisConnection().pack_command(*args))


@given(
    st.sampled_from(["EVALSHA", "SET", "CONFIG GET", b"CLIENT SETNAME", b"XADD"]), st.lists(ARG, max_size=60)
)
def test_same_bytes_as_redis_py(name: str | bytes, args: list[object]) -> None:
    python, c = _both(name, *args)
    assert c == python


def test_buffers_are_packed_as_bytes() -> None:
    python, c = _both("SET", bytearray(b"k\r\n"), memoryview(b"v\x00"))
    assert c == python == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\nv\x00\r\n"


@pytest.mark.parametrize("bad", [None, True, [1], {"a": 1}])
def test_what_redis_py_refuses_is_a_data_error(bad: object) -> None:
    with pytest.raises(DataError):
        Connection().pack_command("SET", "k", bad)
    with pytest.raises(DataError):
        HiredisConnection().pack_command("SET", "k", bad)
