"""What every HTTP engine adapter shares: session ownership, requests, metrics parsing, error helpers.

Adapters keep their own wire formats and error mapping; this module holds only what is engine-neutral.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Final, Self

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from llorch import tracing
from llorch.adapters._sse import SseReader
from llorch.adapters._stream import post_stream
from llorch.adapters.base import Finished
from llorch.errors import Code, OrchestratorError

DEFAULT_REQUEST_TIMEOUT_S: Final = 10.0
# llama-server (cpp-httplib) drops keep-alive connections idle for 5 s, and vLLM's uvicorn does too. aiohttp
# reuses the oldest idle connection first, so a request can land on one the server is closing: owned
# sessions stop reusing connections well before that, and a request whose connection broke before any
# answer is sent once more.
_KEEPALIVE_S: Final = 2.0
_OOM_MARKERS: Final = ("out of memory", "out_of_memory", "outofmemory")
_SSE_DATA: Final = b"data:"


@dataclass
class EngineStream:
    """An open streaming answer: read its events from `reader`; set `finished` from the final one."""

    reader: SseReader
    finished: Finished | None = None

    def result(self) -> Finished:
        if self.finished is None:
            raise worker_reset("the engine stream ended without a final chunk")
        return self.finished


class HttpAdapter:
    """Async context management and close for the adapters that hold an :class:`EngineHttp`."""

    _http: EngineHttp

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session if this adapter created it; idempotent, safe before first use."""
        await self._http.aclose()


class EngineHttp:
    """One adapter's HTTP client: a borrowed or owned aiohttp session for control calls, a connection
    of its own for each stream (:meth:`open_stream`), and the two timeout policies.

    ``session`` is borrowed when given (the caller closes it); otherwise one is created on first use,
    without a connection limit, and :meth:`aclose` closes it. ``request_timeout_s`` bounds control calls
    and the connect phase of a stream; a stream itself has no read deadline (the scheduler owns decode
    timeouts). ``owner`` names the adapter in the error raised after close.
    """

    def __init__(self, owner: str, session: aiohttp.ClientSession | None, request_timeout_s: float) -> None:
        self._owner = owner
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self.control_timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self.connect_timeout_s = request_timeout_s

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            if self._closed:
                raise RuntimeError(f"{self._owner} is closed")
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE_S)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def aclose(self) -> None:
        """Close the session if this client created it; idempotent, safe before first use."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    async def request(self, method: str, url: str, payload: object = None) -> aiohttp.ClientResponse:
        """Send once, and once more if a stale keep-alive connection broke before any answer.

        The caller owns the response (``async with`` it, or close/release it). Inside a span (the
        pool manager's engine span) the request carries its ``traceparent``.
        """
        session = self.session()
        limits = self.control_timeout
        headers = tracing.http_headers()
        try:
            return await session.request(method, url, json=payload, timeout=limits, headers=headers)
        except aiohttp.ClientConnectorError:
            raise  # nothing listens: no point in a second try
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            # A stale keep-alive connection (see _KEEPALIVE_S); a dead engine fails again at connect.
            return await session.request(method, url, json=payload, timeout=limits, headers=headers)

    @asynccontextmanager
    async def open_stream(
        self, url: str, payload: object, what: str, status_error: Callable[[int, bytes], OrchestratorError]
    ) -> AsyncIterator[EngineStream]:
        """POST a streaming request on a connection of its own (:mod:`llorch.adapters._stream`) and read
        it inside the block. A refused submit or a broken body is WORKER_RESET, an unparseable chunk
        INTERNAL, a non-200 answer ``status_error``. Leaving the block drops the connection, so an
        engine left before its final chunk (an abort, an error) stops. Inside a span (the pool
        manager's engine span) the request carries its ``traceparent``."""
        if self._closed:
            raise RuntimeError(f"{self._owner} is closed")
        try:
            answer = await post_stream(url, payload, tracing.http_headers(), self.connect_timeout_s)
        except (OSError, TimeoutError) as exc:
            raise worker_reset(f"cannot reach {what} to submit", exc) from exc
        try:
            status = answer.head.result()
            if status != 200:
                raise status_error(status, await answer.body())
            yield EngineStream(answer.reader)
        except ConnectionError as exc:
            raise worker_reset(f"{what} stream broke", exc) from exc
        except ValueError as exc:  # json.JSONDecodeError, a line over the limit
            raise OrchestratorError(Code.INTERNAL, f"{what} sent an unparseable chunk: {exc}") from exc
        finally:
            answer.close()

    async def fetch(self, method: str, url: str, what: str) -> tuple[int, bytes]:
        """``(status, body)`` of a control call; an engine that does not answer is WORKER_RESET."""
        try:
            async with await self.request(method, url) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise worker_reset(f"{what} unreachable", exc) from exc

    async def probe(self, url: str) -> int | None:
        """The status of ``GET url``, or None when nothing answers (a health probe never raises)."""
        try:
            async with await self.request("GET", url) as resp:
                await resp.read()
                return resp.status
        except (aiohttp.ClientError, TimeoutError):
            return None


def worker_reset(message: str, cause: BaseException | None = None) -> OrchestratorError:
    """SPEC §4: refused, reset or exited → WORKER_RESET. The engine's address stays out of the message,
    because errors reach clients (OC-ADAPT-5002)."""
    detail = f" ({type(cause).__name__})" if cause is not None else ""
    return OrchestratorError(Code.WORKER_RESET, message + detail)


def mentions_oom(message: str) -> bool:
    lowered = message.lower()
    return any(marker in lowered for marker in _OOM_MARKERS)


def decode_body(body: bytes) -> object:
    """A response body as JSON, or as JSON inside one SSE ``data:`` line (Triton's generate_stream
    answers a failed first response that way); a body that is neither gives the start of its text."""
    text = body.strip()
    if text.startswith(_SSE_DATA):
        text = text[len(_SSE_DATA) :].split(b"\n", 1)[0].strip()
    try:
        decoded: object = json.loads(text)
    except ValueError:
        return body[:500].decode(errors="replace")
    return decoded


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text as ``{sample name: value}``; labelled samples are keyed ``name{k="v",...}``.

    Names are prometheus_client's: a counter exposed without ``_total`` (``llamacpp:n_tokens_max``)
    is keyed with it (``llamacpp:n_tokens_max_total``).
    """
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if sample.labels:
                labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                key = f"{key}{{{labels}}}"
            out[key] = float(sample.value)
    return out


def sample_values(metrics: dict[str, float], name: str, **labels: str) -> list[float]:
    """Values of every sample called ``name`` (any labels) whose labels include ``labels``."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    out: list[float] = []
    for key, value in metrics.items():
        if key == name and not wanted:
            out.append(value)
        elif key.startswith(name + "{"):
            # parse_metrics writes labels as k="v" joined by ","; match whole items only.
            inner = "," + key[len(name) + 1 : -1] + ","
            if all(f",{item}," in inner for item in wanted):
                out.append(value)
    return out


def busy_from(metrics: dict[str, float], names: tuple[str, ...]) -> int | None:
    """The sum of the named gauges (requests running, waiting...); None when none is exported."""
    found = [sample_values(metrics, name) for name in names]
    if not any(found):
        return None
    return round(sum(sum(values) for values in found))
