"""The Hugging Face text-generation-inference adapter (SPEC §8 "TGI", a legacy target).

Wire facts used, checked against documentation and the stub only (ENGINE-PROTOCOLS.md, TGI v3.3.7
router source; no real TGI has been run against this adapter):

- Health [F]: ``GET /health`` 200 (empty body) when ready; 503 ``{"error": "unhealthy", "error_type":
  "healthcheck"}`` otherwise. An answer of any kind = live. While shards load, real TGI refuses
  connections (not live); the stub answers 503.
- Info [F]: ``GET /info`` has ``version`` and ``model_id``. Its length-limit names vary by version [?]:
  ``max_total_tokens`` is the context when present, else the constructor's ``ctx`` (1.x-2.0
  ``max_input_length`` and 2.1+ ``max_input_tokens`` bound the prompt only). ``max_concurrent_requests``
  (= the launch's ``--max-concurrent-requests``) is the slot count, else the constructor's.
- Stream [F]: ``POST /generate_stream {inputs, parameters: {max_new_tokens, seed, do_sample,
  temperature?, top_p?, top_k?, details: true}}`` → ``data:{"token": {"id", "text", "logprob",
  "special"}, "generated_text", "details"}`` (no space after ``data:``, no ``[DONE]``: the body ends
  after the event with ``details``). Tokens with ``special: true`` are skipped [R]; ``details``
  ``finish_reason`` ``length`` → length, ``eos_token``/``stop_sequence`` → stop; ``generated_tokens``
  (which counts a special EOS token) and ``input_length`` (v2.3+, else 0) are the counts.
- Sampling: greedy (temperature ≤ 0 or top_k 1) = ``do_sample: false`` with temperature, top_p and
  top_k left out, since each of them switches sampling on and TGI rejects temperature ≤ 0 [F]. When
  sampling, ``top_p`` is sent only inside (0, 1) and ``top_k`` only when > 0 (TGI's validation ranges);
  ``min_p`` has no TGI equivalent and ``repeat_penalty`` is not sent. ``seed`` is sent when ≥ 0 (u64).
- Errors [F]: ``{"error": "...", "error_type": "..."}``. On ``/generate_stream`` every error, including
  the overload refusal past ``--max-concurrent-requests``, is a ``data:`` event after HTTP 200;
  ``/generate`` and older routers use the HTTP status (429 overloaded, 422 validation, 424
  generation). ``overloaded`` or 429, 503 at submit, and out-of-memory text → REPLICA_EXHAUSTED; a
  ``validation`` error about the ``inputs`` length → INVALID_PARAMS; the rest → INTERNAL.
- Cancel [?]: closing the connection; the router drops the request at the next batching step. Not
  confirmed against a real TGI.
- Metrics [F]: ``GET /metrics`` (``tgi_*``, names vary by version [?]); TGI reports no KV usage, so
  :meth:`TgiAdapter.kv_info` says None. No KV erase.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Final, Literal

import aiohttp

from llorch.adapters._chat import chat_payload, chat_stream, embed
from llorch.adapters._http import (
    DEFAULT_REQUEST_TIMEOUT_S,
    EngineHttp,
    HttpAdapter,
    busy_from,
    decode_body,
    mentions_oom,
    parse_metrics,
    worker_reset,
)
from llorch.adapters._sse import loads
from llorch.adapters.base import (
    KV_UNREPORTED,
    Embedded,
    EngineHealth,
    EngineProps,
    Finished,
    GenerateRequest,
    KvInfo,
    Sampler,
    Token,
)
from llorch.errors import Code, OrchestratorError

_NAME: Final = "TGI"
_BUSY_METRICS: Final = ("tgi_batch_current_size", "tgi_queue_size")


class TgiAdapter(HttpAdapter):
    """An :class:`~llorch.adapters.base.EngineAdapter` for one TGI router at ``base_url``.

    ``slots_total``, ``ctx`` and ``model_path`` are the launch's values, used where ``/info`` is silent.
    Session and timeouts as in :class:`~llorch.adapters.llamacpp.LlamaCppAdapter`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        slots_total: int,
        ctx: int,
        model_path: str,
        session: aiohttp.ClientSession | None = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.slots_total = slots_total
        self.ctx = ctx
        self.model_path = model_path
        self._http = EngineHttp("TgiAdapter", session, request_timeout_s)

    async def health(self) -> EngineHealth:
        """200 → ready; any other answer → live but not ready; no answer → not live."""
        status = await self._http.probe(f"{self.base_url}/health")
        return EngineHealth(live=status is not None, ready=status == 200)

    async def props(self) -> EngineProps:
        info = decode_body(await self._get("/info"))
        if not isinstance(info, dict):
            raise OrchestratorError(Code.INTERNAL, f"{_NAME}: /info is not a JSON object")
        total = info.get("max_total_tokens")
        slots = info.get("max_concurrent_requests")
        return EngineProps(
            engine_version=str(info.get("version") or "unknown"),
            slots_total=slots if isinstance(slots, int) and slots > 0 else self.slots_total,
            ctx=total if isinstance(total, int) and total > 0 else self.ctx,
            model_path=str(info.get("model_id") or self.model_path),
        )

    async def metrics(self) -> dict[str, float]:
        """``GET /metrics`` as ``{sample name: value}`` (see :func:`llorch.adapters._http.parse_metrics`)."""
        return parse_metrics((await self._get("/metrics")).decode())

    async def kv_info(self) -> KvInfo:
        """TGI exports no KV-cache gauge."""
        return KV_UNREPORTED

    async def erase_kv(self, slot_id: int) -> bool:
        """TGI has no KV eviction route: a no-op."""
        return False

    async def busy_slots(self) -> int | None:
        """``tgi_batch_current_size`` + ``tgi_queue_size``; None when neither is exported."""
        return busy_from(await self.metrics(), _BUSY_METRICS)

    async def stream(self, request: GenerateRequest) -> AsyncGenerator[Token | Finished, None]:
        """Yield a :class:`Token` per non-special token, then one :class:`Finished` from ``details``.

        Closing the generator (``aclose()``) closes the HTTP connection; TGI drops the request.
        """
        payload = {"inputs": request.prompt, "parameters": _parameters(request)}
        url = f"{self.base_url}/generate_stream"
        async with self._http.open_stream(url, payload, _NAME, _submit_error) as stream:
            seen = 0
            while True:
                data = await stream.reader.next_data()
                if data is None:
                    raise worker_reset(f"{_NAME} closed the stream before the final event")
                event = loads(data)
                if not isinstance(event, dict):
                    continue
                if event.get("error") is not None:
                    raise _engine_error(event, status=None, at_submit=False)
                token = event.get("token")
                if isinstance(token, dict) and not token.get("special") and token.get("text"):
                    seen += 1
                    yield Token(str(token["text"]))
                if event.get("details") is not None or event.get("generated_text") is not None:
                    stream.finished = _finished(event.get("details"), seen)
                    break
        yield stream.result()

    def chat(self, request: GenerateRequest) -> AsyncGenerator[Token | Finished, None]:
        """``POST /v1/chat/completions``: the server's own chat template renders the messages."""
        payload = chat_payload(request, "tgi", extra_sampling=False)
        url = f"{self.base_url}/v1/chat/completions"
        return chat_stream(self._http, url, payload, "TGI", _submit_error, _in_stream_error)

    async def embed(self, inputs: list[str]) -> Embedded:
        url = f"{self.base_url}/v1/embeddings"
        return await embed(self._http, url, "tgi", inputs, "TGI", _submit_error)

    async def _get(self, path: str) -> bytes:
        status, body = await self._http.fetch("GET", f"{self.base_url}{path}", f"{_NAME} {path}")
        if status != 200:
            raise _status_error(status, body, at_submit=False)
        return body


def _parameters(request: GenerateRequest) -> dict[str, object]:
    params: dict[str, object] = {"max_new_tokens": request.max_tokens, "details": True}
    if request.seed >= 0:
        params["seed"] = request.seed
    params.update(_sampling(request.sampler))
    overrides = dict(request.overrides)
    if isinstance(stop := overrides.pop("stop", None), str):
        stop = [stop]
    params.update(overrides)  # TGI's names: temperature, top_p; stop is a list
    if stop:
        params["stop"] = stop
    return params


def _sampling(sampler: Sampler) -> dict[str, object]:
    if sampler.temperature <= 0 or sampler.top_k == 1:
        return {"do_sample": False}
    out: dict[str, object] = {"do_sample": True, "temperature": sampler.temperature}
    if 0 < sampler.top_p < 1:
        out["top_p"] = sampler.top_p
    if sampler.top_k > 0:
        out["top_k"] = sampler.top_k
    return out


def _finished(details: object, seen: int) -> Finished:
    if not isinstance(details, dict):  # details were asked for; tolerate a router that leaves them out
        return Finished(finish_reason="stop", tokens_in=0, tokens_out=seen)
    finish: Literal["stop", "length"] = "length" if details.get("finish_reason") == "length" else "stop"
    generated = details.get("generated_tokens")
    input_length = details.get("input_length")
    return Finished(
        finish_reason=finish,
        tokens_in=input_length if isinstance(input_length, int) else 0,
        tokens_out=generated if isinstance(generated, int) else seen,
    )


def _error_fields(error: object) -> tuple[str, str]:
    """(message, error_type) of a TGI error body, tolerating other shapes."""
    if isinstance(error, dict):
        inner = error.get("error", error)
        if isinstance(inner, dict):  # the chat routes' {"error": {"message", "http_status_code"}}
            return str(inner.get("message") or inner), str(error.get("error_type") or "")
        return str(inner), str(error.get("error_type") or "")
    return str(error), ""


def _engine_error(error: object, status: int | None, at_submit: bool) -> OrchestratorError:
    """SPEC §4 for TGI: overload or OOM → REPLICA_EXHAUSTED; a too-long prompt → INVALID_PARAMS; the rest
    → INTERNAL with TGI's text."""
    message, kind = _error_fields(error)
    if kind == "overloaded" or mentions_oom(message) or (at_submit and status in (429, 503)):
        return OrchestratorError(Code.REPLICA_EXHAUSTED, f"{_NAME}: {message}")
    if (kind == "validation" or status == 422) and "`inputs`" in message:
        return OrchestratorError(Code.INVALID_PARAMS, f"{_NAME}: {message}", field="prompt")
    return OrchestratorError(Code.INTERNAL, f"{_NAME}: {message}")


def _status_error(status: int, body: bytes, at_submit: bool) -> OrchestratorError:
    error = decode_body(body)
    if status == 503 and not at_submit:
        return OrchestratorError(Code.POOL_UNREADY, f"{_NAME}: {_error_fields(error)[0] or 'HTTP 503'}")
    if isinstance(error, dict):
        return _engine_error(error, status, at_submit)
    return _engine_error(f"HTTP {status}: {error}", status, at_submit)


def _in_stream_error(error: object) -> OrchestratorError:
    return _engine_error(error, status=None, at_submit=False)


def _submit_error(status: int, body: bytes) -> OrchestratorError:
    return _status_error(status, body, at_submit=True)
