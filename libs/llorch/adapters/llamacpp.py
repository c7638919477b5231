"""The llama.cpp ``llama-server`` adapter (SPEC §8): health, props, streaming ``/completion``, metrics.

Wire format (ENGINES.md): ``POST /completion`` with ``stream: true`` answers ``data: {json}`` lines; token
chunks carry ``content``, the last chunk has ``stop: true`` with ``stop_type``, ``tokens_predicted`` and
``tokens_evaluated``. Errors after the 200 arrive as ``data: {"error": {...}}``; errors before the first
token arrive as an HTTP status with the same object. Cancel is closing the connection.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from types import TracebackType
from typing import Final

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from llorch.adapters.base import EngineHealth, EngineProps, Finished, GenerateRequest, Token
from llorch.errors import Code, OrchestratorError

DEFAULT_REQUEST_TIMEOUT_S: Final = 10.0
# The stop chunk echoes the prompt and the generation settings, so it can be far longer than aiohttp's
# default line limit (128 KiB).
_MAX_LINE_BYTES: Final = 64 * 1024 * 1024
_DATA: Final = b"data:"
# llama-server (cpp-httplib) drops keep-alive connections idle for 5 s. aiohttp reuses the oldest idle
# connection first, so a request can land on one the server is closing: owned sessions stop reusing
# connections well before that, and a request whose connection broke before any answer is sent once more.
_KEEPALIVE_S: Final = 2.0
_OOM_MARKERS: Final = ("out of memory", "out_of_memory", "outofmemory")


class LlamaCppAdapter:
    """An :class:`~llorch.adapters.base.EngineAdapter` for one llama-server replica at ``base_url``.

    ``session`` is borrowed when given (the caller closes it); otherwise the adapter creates one on first
    use, without a connection limit, and :meth:`aclose` closes it. ``request_timeout_s`` bounds the
    control calls and the connect phase of a stream; a stream itself has no read deadline (the
    scheduler owns decode timeouts).
    """

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession | None = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._session = session
        self._owns_session = session is None
        self._closed = False
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._stream_timeout = aiohttp.ClientTimeout(
            total=None, connect=request_timeout_s, sock_connect=request_timeout_s
        )

    async def __aenter__(self) -> LlamaCppAdapter:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            if self._closed:
                raise RuntimeError("LlamaCppAdapter is closed")
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=_KEEPALIVE_S)
            self._session = aiohttp.ClientSession(connector=connector)
        return self._session

    async def aclose(self) -> None:
        """Close the session if this adapter created it; idempotent, safe before first use."""
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session:
            await session.close()

    async def health(self) -> EngineHealth:
        """200 → ready; any other answer → live but not ready (503 while loading); no answer → not live."""
        try:
            async with await self._request("GET", "/health", self._timeout) as resp:
                await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError):
            return EngineHealth(live=False, ready=False)
        return EngineHealth(live=True, ready=status == 200)

    async def props(self) -> EngineProps:
        body = json.loads(await self._get("/props"))
        settings = body.get("default_generation_settings") or {}
        return EngineProps(
            engine_version=str(body.get("build_info") or "unknown"),
            slots_total=int(body.get("total_slots") or 0),
            ctx=int(settings.get("n_ctx") or 0),
            model_path=str(body.get("model_path") or ""),
        )

    async def metrics(self) -> dict[str, float]:
        """``GET /metrics`` as ``{sample name: value}``; labelled samples are keyed ``name{k="v",...}``.

        Names are prometheus_client's: a counter exposed without ``_total`` (``llamacpp:n_tokens_max``)
        is keyed with it (``llamacpp:n_tokens_max_total``).
        """
        text = (await self._get("/metrics")).decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = sample.name
                if sample.labels:
                    labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
                    key = f"{key}{{{labels}}}"
                out[key] = float(sample.value)
        return out

    async def stream(self, request: GenerateRequest) -> AsyncGenerator[Token | Finished, None]:
        """Yield a :class:`Token` per non-empty ``content``, then one :class:`Finished`.

        Closing the generator (``aclose()``) closes the HTTP connection, which makes llama-server stop
        the slot's task.
        """
        sampler = request.sampler
        payload = {
            "prompt": request.prompt,
            "n_predict": request.max_tokens,
            "seed": request.seed,
            "temperature": sampler.temperature,
            "top_k": sampler.top_k,
            "top_p": sampler.top_p,
            "min_p": sampler.min_p,
            "repeat_penalty": sampler.repeat_penalty,
            "stream": True,
            "cache_prompt": request.cache_prompt,
            "ignore_eos": request.ignore_eos,
        }
        try:
            resp = await self._request("POST", "/completion", self._stream_timeout, payload)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _reset("cannot reach llama-server to submit", exc) from exc
        finished: Finished | None = None
        try:
            if resp.status != 200:
                raise _status_error(resp.status, await resp.read(), at_submit=True)
            readline = resp.content.readline
            while True:
                line = await readline(max_line_length=_MAX_LINE_BYTES)
                if not line:
                    raise _reset("llama-server closed the stream before the stop chunk")
                if not line.startswith(_DATA):
                    continue  # blank separators, comments
                event = json.loads(line[5:])
                content = event.get("content")
                if content:
                    yield Token(content)
                if event.get("stop"):
                    finished = _finished(event)
                    break
                error = event.get("error")
                if error is not None:
                    raise _engine_error(error, status=None, at_submit=False)
        except aiohttp.ClientError as exc:
            raise _reset("llama-server stream broke", exc) from exc
        except ValueError as exc:  # json.JSONDecodeError
            raise OrchestratorError(Code.INTERNAL, f"llama-server sent an unparseable chunk: {exc}") from exc
        finally:
            if finished is None:
                resp.close()  # mid-stream: drop the connection so the engine frees the slot
            else:
                resp.release()
        yield finished

    async def _get(self, path: str) -> bytes:
        try:
            async with await self._request("GET", path, self._timeout) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise _reset(f"llama-server {path} unreachable", exc) from exc
        if status != 200:
            raise _status_error(status, body, at_submit=False)
        return body

    async def _request(
        self, method: str, path: str, limits: aiohttp.ClientTimeout, payload: object = None
    ) -> aiohttp.ClientResponse:
        session = self._http()
        url = f"{self.base_url}{path}"
        try:
            return await session.request(method, url, json=payload, timeout=limits)
        except aiohttp.ClientConnectorError:
            raise  # nothing listens: no point in a second try
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            # A stale keep-alive connection (see _KEEPALIVE_S); a dead engine fails again at connect.
            return await session.request(method, url, json=payload, timeout=limits)


def _reset(message: str, cause: BaseException | None = None) -> OrchestratorError:
    # The engine's address stays out of the message: errors reach clients (OC-ADAPT-5002).
    detail = f" ({type(cause).__name__})" if cause is not None else ""
    return OrchestratorError(Code.WORKER_RESET, message + detail)


def _finished(event: dict[str, object]) -> Finished:
    stop_type = event.get("stop_type")
    if stop_type is None and event.get("stopped_limit"):  # builds before stop_type
        stop_type = "limit"
    return Finished(
        finish_reason="length" if stop_type == "limit" else "stop",
        tokens_in=_int(event.get("tokens_evaluated")),
        tokens_out=_int(event.get("tokens_predicted")),
    )


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _error_fields(error: object) -> tuple[str, str]:
    """(message, type) of an engine error object, tolerating a bare string."""
    if isinstance(error, dict):
        return str(error.get("message") or error), str(error.get("type") or "")
    return str(error), ""


def _engine_error(error: object, status: int | None, at_submit: bool) -> OrchestratorError:
    """SPEC §4 mapping: out of memory or 503 at submit → REPLICA_EXHAUSTED; context overflow →
    INVALID_PARAMS; anything else the engine reports → INTERNAL with the engine's text."""
    message, kind = _error_fields(error)
    lowered = message.lower()
    if any(marker in lowered for marker in _OOM_MARKERS) or (at_submit and status == 503):
        return OrchestratorError(Code.REPLICA_EXHAUSTED, f"llama-server: {message}")
    if kind == "exceed_context_size_error":
        return OrchestratorError(Code.INVALID_PARAMS, f"llama-server: {message}", field="prompt")
    return OrchestratorError(Code.INTERNAL, f"llama-server: {message}")


def _status_error(status: int, body: bytes, at_submit: bool) -> OrchestratorError:
    try:
        decoded = json.loads(body)
        error: object = decoded.get("error", decoded) if isinstance(decoded, dict) else decoded
    except ValueError:
        error = body[:500].decode(errors="replace")
    if status == 503 and not at_submit:
        # A 503 on a control route means "Loading model": the replica is not ready yet.
        message, _ = _error_fields(error)
        return OrchestratorError(Code.POOL_UNREADY, f"llama-server: {message}")
    if isinstance(error, dict) and "message" in error:
        return _engine_error(error, status, at_submit)
    return _engine_error({"message": f"HTTP {status}: {error}"}, status, at_submit)
