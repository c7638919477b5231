"""Many small calls over one long-lived bidirectional gRPC stream (issue 16).

A grpc.aio unary call costs its client and its server a few hundred µs of CPU each on the 2-core box,
more than the work behind the hot calls (an admission, a task's start); one message on an open stream
costs a fraction of that. A :class:`CallChannel` numbers each call, sends every call that gathered while
its previous message was being written as one message (grpc allows one message in flight per stream),
and hands each result, matched by its number, to its caller. The server answers in messages of results
the same way (:mod:`llorch_scheduler.admit_stream`, the pool manager's ``StartStream``).

The stream opens on first use and again after it breaks. When it breaks (the server restarting, or
killed mid-write, which ends the stream with INTERNAL rather than UNAVAILABLE), every call waiting on it
fails with the channel's ``broken`` error, as a unary call to an unreachable server would; no answer
within the deadline is the same error (the call may still have happened, as after a unary call's
deadline). What a unary call's metadata carried per call (trace context, correlation id) travels in
each call; the stream's own metadata (the internal token) is sent once, when it opens.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable
from typing import Any, Generic, Protocol, TypeVar

import grpc.aio

from . import tracing
from .logs import correlation_id_var
from .rpc import CORRELATION_KEY, DEFAULT_DEADLINE_S


class Numbered(Protocol):
    call: int


C = TypeVar("C", bound=Numbered)
R = TypeVar("R", bound=Numbered)

StreamCall = Any
"""grpc.aio's StreamStreamCall (its stubs do not type the generic)."""


def call_context() -> dict[str, str]:
    """What a unary call's metadata would carry for this call: the current span's trace context and
    the correlation id of the request being served."""
    context = tracing.http_headers()
    if cid := correlation_id_var.get():
        context[CORRELATION_KEY] = cid
    return context


class CallChannel(Generic[C, R]):
    """Calls of type ``C`` answered by results of type ``R`` over one stream at a time.

    ``open_stream``: starts the stream call (the stub's method, called with no request iterator, so
    messages go by ``write``); ``pack``: the calls of one message → that message; ``unpack``: a
    message from the server → its results; ``broken``: why the waiting calls failed (``why`` names a
    gRPC status, or what ended the stream) → the exception they raise."""

    def __init__(
        self,
        open_stream: Callable[[], StreamCall],
        pack: Callable[[list[C]], object],
        unpack: Callable[[Any], Iterable[R]],
        broken: Callable[[str], Exception],
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> None:
        self._open_stream = open_stream
        self._pack = pack
        self._unpack = unpack
        self._broken = broken
        self._deadline_s = deadline_s
        self._numbers = itertools.count(1)
        self._stream: _Stream[C, R] | None = None

    async def call(self, call: C) -> R:
        """``call`` is numbered here; its result, or the channel's ``broken`` error."""
        call.call = next(self._numbers)
        stream = self._stream if self._stream and not self._stream.failure else self._open()
        answer = stream.send(call)
        # A bare timer rather than asyncio.timeout: the context manager's bookkeeping was a visible
        # share of an admission's CPU.
        late = asyncio.get_running_loop().call_later(self._deadline_s, self._expire, answer)
        try:
            return await answer
        finally:
            late.cancel()
            stream.forget(call.call)

    def _expire(self, answer: asyncio.Future[R]) -> None:
        if not answer.done():
            answer.set_exception(self._broken("DEADLINE_EXCEEDED"))

    def _open(self) -> _Stream[C, R]:
        self._stream = _Stream(self._open_stream(), self._pack, self._unpack, self._broken)
        return self._stream

    async def aclose(self) -> None:
        if self._stream is not None:
            await self._stream.aclose()


class _Stream(Generic[C, R]):
    """One stream call, its writer and its reader."""

    def __init__(
        self,
        call: StreamCall,
        pack: Callable[[list[C]], object],
        unpack: Callable[[Any], Iterable[R]],
        broken: Callable[[str], Exception],
    ) -> None:
        self._call = call
        self._pack = pack
        self._unpack = unpack
        self._broken = broken
        self._outbox: list[C] = []
        self._waiting: dict[int, asyncio.Future[R]] = {}
        self._wake = asyncio.Event()
        self.failure: Exception | None = None
        self._tasks = [asyncio.create_task(self._write()), asyncio.create_task(self._read())]

    def send(self, call: C) -> asyncio.Future[R]:
        answer: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        if self.failure is not None:
            answer.set_exception(self.failure)
            return answer
        self._waiting[call.call] = answer
        self._outbox.append(call)
        self._wake.set()
        return answer

    def forget(self, number: int) -> None:
        self._waiting.pop(number, None)

    async def _write(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                calls, self._outbox = self._outbox, []
                await self._call.write(self._pack(calls))
        except grpc.aio.AioRpcError as exc:
            self._fail(self._broken(exc.code().name))
        except (asyncio.InvalidStateError, grpc.aio.UsageError):  # the call ended under the writer
            self._fail(self._broken("stream ended"))

    async def _read(self) -> None:
        try:
            async for message in self._call:
                for result in self._unpack(message):
                    answer = self._waiting.pop(result.call, None)
                    if answer is not None and not answer.done():
                        answer.set_result(result)
            self._fail(self._broken("stream ended"))
        except grpc.aio.AioRpcError as exc:
            self._fail(self._broken(exc.code().name))

    def _fail(self, failure: Exception) -> None:
        """Every call waiting on this stream fails with ``failure``; the next one opens anew."""
        if self.failure is None:
            self.failure = failure
        self._call.cancel()  # nothing when it has ended already
        for answer in self._waiting.values():
            if not answer.done():
                answer.set_exception(self.failure)
        self._waiting.clear()

    async def aclose(self) -> None:
        self._fail(self._broken("closing"))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
