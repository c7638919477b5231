"""The llama.cpp ``llama-server`` adapter (SPEC §8): health, props, streaming ``/completion``, metrics, KV.

Wire format (ENGINES.md): ``POST /completion`` with ``stream: true`` answers ``data: {json}`` lines; token
chunks carry ``content``, the last chunk has ``stop: true`` with ``stop_type``, ``tokens_predicted`` and
``tokens_evaluated``. Errors after the 200 arrive as ``data: {"error": {...}}``; errors before the first
token arrive as an HTTP status with the same object. Cancel is closing the connection.

KV (SPEC §8): ``llamacpp:kv_cache_usage_ratio`` is on some builds only [?]; the pinned b11434 has none,
so :meth:`LlamaCppAdapter.kv_info` reports None there. ``POST /slots/{id}?action=erase`` [F] answers 501
``not_supported_error`` unless llama-server was started with ``--slot-save-path`` (checked against the
real b11434); :meth:`LlamaCppAdapter.erase_kv` returns False then.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator

import aiohttp

from llorch.adapters._chat import chat_payload, chat_stream, embed
from llorch.adapters._http import (
    DEFAULT_REQUEST_TIMEOUT_S,
    EngineHttp,
    HttpAdapter,
    decode_body,
    mentions_oom,
    parse_metrics,
    sample_values,
    worker_reset,
)
from llorch.adapters._sse import loads
from llorch.adapters.base import (
    Embedded,
    EngineHealth,
    EngineProps,
    Finished,
    GenerateRequest,
    KvInfo,
    Token,
)
from llorch.errors import Code, OrchestratorError

__all__ = ["DEFAULT_REQUEST_TIMEOUT_S", "LlamaCppAdapter"]

_KV_USAGE = "llamacpp:kv_cache_usage_ratio"


class LlamaCppAdapter(HttpAdapter):
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
        self._http = EngineHttp("LlamaCppAdapter", session, request_timeout_s)

    async def health(self) -> EngineHealth:
        """200 → ready; any other answer → live but not ready (503 while loading); no answer → not live."""
        status = await self._http.probe(f"{self.base_url}/health")
        return EngineHealth(live=status is not None, ready=status == 200)

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
        """``GET /metrics`` as ``{sample name: value}`` (see :func:`llorch.adapters._http.parse_metrics`)."""
        return parse_metrics((await self._get("/metrics")).decode())

    async def kv_info(self) -> KvInfo:
        """``llamacpp:kv_cache_usage_ratio`` when this build exports it, else ``usage_ratio`` None."""
        values = sample_values(await self.metrics(), _KV_USAGE)
        return KvInfo(usage_ratio=max(values) if values else None)

    async def erase_kv(self, slot_id: int) -> bool:
        """``POST /slots/{id}?action=erase``; False when the server does not support slot actions."""
        what = "llama-server /slots"
        status, body = await self._http.fetch("POST", f"{self.base_url}/slots/{slot_id}?action=erase", what)
        if status == 501:
            return False  # started without --slot-save-path
        if status != 200:
            raise _status_error(status, body, at_submit=False)
        return True

    async def busy_slots(self) -> int | None:
        """Slots with ``is_processing`` in ``GET /slots``; None when the endpoint is off (501)."""
        status, body = await self._http.fetch("GET", f"{self.base_url}/slots", "llama-server /slots")
        if status == 501:
            return None
        if status != 200:
            raise _status_error(status, body, at_submit=False)
        slots = json.loads(body)
        return sum(1 for slot in slots if isinstance(slot, dict) and slot.get("is_processing"))

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
            **request.overrides,  # the same names as llama-server's: temperature, top_p, stop
        }
        async with self._http.open_stream(
            f"{self.base_url}/completion", payload, "llama-server", _submit_error
        ) as stream:
            while True:
                data = await stream.reader.next_data()
                if data is None:
                    raise worker_reset("llama-server closed the stream before the stop chunk")
                event = loads(data)
                content = event.get("content")
                if content:
                    yield Token(content)
                if event.get("stop"):
                    stream.finished = _finished(event)
                    break
                error = event.get("error")
                if error is not None:
                    raise _engine_error(error, status=None, at_submit=False)
        yield stream.result()

    def chat(self, request: GenerateRequest) -> AsyncGenerator[Token | Finished, None]:
        """``POST /v1/chat/completions``: the model's own chat template (``--jinja``) renders the
        messages; tools, tool_choice and response_format (a grammar) are the server's."""
        payload = chat_payload(request, "llama-server", extra_sampling=True)
        payload["cache_prompt"] = request.cache_prompt
        url = f"{self.base_url}/v1/chat/completions"
        return chat_stream(self._http, url, payload, "llama-server", _submit_error, _in_stream_error)

    async def embed(self, inputs: list[str]) -> Embedded:
        """``POST /v1/embeddings`` (the server runs with ``--embeddings``)."""
        url = f"{self.base_url}/v1/embeddings"
        return await embed(self._http, url, "llama-server", inputs, "llama-server", _submit_error)

    async def _get(self, path: str) -> bytes:
        status, body = await self._http.fetch("GET", f"{self.base_url}{path}", f"llama-server {path}")
        if status != 200:
            raise _status_error(status, body, at_submit=False)
        return body


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
    INVALID_PARAMS with both numbers; anything else the engine reports → INTERNAL with its text."""
    message, kind = _error_fields(error)
    if mentions_oom(message) or (at_submit and status == 503):
        return OrchestratorError(Code.REPLICA_EXHAUSTED, f"llama-server: {message}")
    if kind == "exceed_context_size_error":
        numbers = {}
        if isinstance(error, dict):
            numbers = {
                name: error[key]
                for name, key in (("prompt_tokens", "n_prompt_tokens"), ("context_length", "n_ctx"))
                if isinstance(error.get(key), int)
            }
        return OrchestratorError(Code.INVALID_PARAMS, f"llama-server: {message}", field="prompt", **numbers)
    return OrchestratorError(Code.INTERNAL, f"llama-server: {message}")


def _in_stream_error(error: object) -> OrchestratorError:
    return _engine_error(error, status=None, at_submit=False)


def _status_error(status: int, body: bytes, at_submit: bool) -> OrchestratorError:
    decoded = decode_body(body)
    error: object = decoded.get("error", decoded) if isinstance(decoded, dict) else decoded
    if status == 503 and not at_submit:
        # A 503 on a control route means "Loading model": the replica is not ready yet.
        message, _ = _error_fields(error)
        return OrchestratorError(Code.POOL_UNREADY, f"llama-server: {message}")
    if isinstance(error, dict) and "message" in error:
        return _engine_error(error, status, at_submit)
    return _engine_error({"message": f"HTTP {status}: {error}"}, status, at_submit)


def _submit_error(status: int, body: bytes) -> OrchestratorError:
    return _status_error(status, body, at_submit=True)
