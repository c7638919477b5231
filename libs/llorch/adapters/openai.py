"""The OpenAI-compatible adapter (SPEC §8 "vLLM"): vLLM's ``vllm serve``, and any OpenAI-style server.

Wire facts used, checked against documentation and the stub only (ENGINE-PROTOCOLS.md, vLLM 0.33 source
and docs; no real vLLM has been run against this adapter):

- Health [F]: ``GET /health`` 200 (empty body) when up; 503 on EngineDeadError (500 before ~0.11). A
  server that answers at all is *live*; *ready* [R] = ``/health`` 200 and ``GET /v1/models`` lists the
  served model. While the model loads, real vLLM refuses connections (not live); the stub answers 503.
- Version [F/?]: ``GET /version`` → ``{"version": ...}``; servers without it report ``unknown``.
- Props: vLLM reports no slot count, so ``slots_total`` is the launch's ``--max-num-seqs`` (a
  constructor argument); ``ctx`` is the model card's ``max_model_len`` when present [F], else the
  constructor's.
- Stream [F]: ``POST /v1/completions {model, prompt, max_tokens, temperature, top_p, seed, stream: true,
  stream_options: {include_usage: true}}`` → ``data: {"choices": [{"text", "finish_reason"}], ...}``
  lines, a usage chunk (``choices: []``, ``usage: {prompt_tokens, completion_tokens}``), then
  ``data: [DONE]``, which also follows an error. One :class:`Token` per non-empty ``text``;
  ``finish_reason`` ``length`` → length, anything else → stop, ``abort`` → INTERNAL. Without usage the
  token count is the number of non-empty chunks.
- Sampling: greedy (temperature ≤ 0 or top_k 1) is ``temperature: 0``. vLLM's extras ``top_k``,
  ``min_p``, ``repetition_penalty`` and ``ignore_eos`` are sent only when they differ from the OpenAI
  defaults, so plain OpenAI servers see plain requests. Determinism is best-effort only (SPEC §8).
- Errors [F]: ``{"error": {"message", "type", "param", "code"}}`` (since 0.10.1) or the older flat
  ``{"object": "error", "message", ...}``; before the stream as an HTTP status, after it as a
  ``data:`` event. 503 or 429 at submit (vLLM's opt-in queue caps; other servers' rate limits) and any
  out-of-memory text → REPLICA_EXHAUSTED; a 400 about the context length → INVALID_PARAMS; the rest →
  INTERNAL with the engine's text.
- Cancel [?]: closing the connection; vLLM aborts the request on disconnect (``AsyncLLM.generate``).
  SPEC's contract test (``vllm:num_requests_running`` drops) has not been run against a real vLLM.
- Metrics [F]: ``GET /metrics``; KV use is ``vllm:kv_cache_usage_perc``, on older releases
  ``vllm:gpu_cache_usage_perc`` [?] (0..1, mean over label sets). No KV erase.
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
    sample_values,
    worker_reset,
)
from llorch.adapters._sse import DONE, loads
from llorch.adapters.base import (
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

_KV_METRICS: Final = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_BUSY_METRICS: Final = ("vllm:num_requests_running", "vllm:num_requests_waiting")
_NAME: Final = "openai server"


class OpenAIAdapter(HttpAdapter):
    """An :class:`~llorch.adapters.base.EngineAdapter` for one OpenAI-compatible server at ``base_url``.

    ``model`` is the served model name sent in every request (vLLM's default is the path given to
    ``vllm serve``). ``slots_total`` and ``ctx`` are the launch's ``--max-num-seqs`` and
    ``--max-model-len``; ``model_path`` (default ``model``) is reported by :meth:`props`. Session and
    timeouts as in :class:`~llorch.adapters.llamacpp.LlamaCppAdapter`.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        slots_total: int,
        ctx: int,
        model_path: str | None = None,
        session: aiohttp.ClientSession | None = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.slots_total = slots_total
        self.ctx = ctx
        self.model_path = model if model_path is None else model_path
        self._http = EngineHttp("OpenAIAdapter", session, request_timeout_s)

    async def health(self) -> EngineHealth:
        """No answer → not live; ``/health`` not 200 → live, not ready; ready once the model is listed."""
        status = await self._http.probe(f"{self.base_url}/health")
        if status != 200:
            return EngineHealth(live=status is not None, ready=False)
        try:
            card = await self._model_card()
        except OrchestratorError:
            return EngineHealth(live=True, ready=False)
        return EngineHealth(live=True, ready=card is not None)

    async def props(self) -> EngineProps:
        status, body = await self._http.fetch("GET", f"{self.base_url}/version", f"{_NAME} /version")
        version = "unknown"
        if status == 200:
            decoded = decode_body(body)
            if isinstance(decoded, dict) and decoded.get("version"):
                version = str(decoded["version"])
        card = await self._model_card()
        max_len = card.get("max_model_len") if card is not None else None
        return EngineProps(
            engine_version=version,
            slots_total=self.slots_total,
            ctx=max_len if isinstance(max_len, int) and max_len > 0 else self.ctx,
            model_path=self.model_path,
        )

    async def metrics(self) -> dict[str, float]:
        """``GET /metrics`` as ``{sample name: value}`` (see :func:`llorch.adapters._http.parse_metrics`)."""
        return parse_metrics((await self._get("/metrics")).decode())

    async def kv_info(self) -> KvInfo:
        metrics = await self.metrics()
        for name in _KV_METRICS:
            values = sample_values(metrics, name)
            if values:
                return KvInfo(usage_ratio=sum(values) / len(values))
        return KvInfo(usage_ratio=None)

    async def erase_kv(self, slot_id: int) -> bool:
        """vLLM has no per-request KV eviction route: a no-op."""
        return False

    async def busy_slots(self) -> int | None:
        """Requests running or waiting (``vllm:num_requests_*``); None when the server does not say."""
        return busy_from(await self.metrics(), _BUSY_METRICS)

    async def stream(self, request: GenerateRequest) -> AsyncGenerator[Token | Finished, None]:
        """Yield a :class:`Token` per non-empty ``text``, then one :class:`Finished` after ``[DONE]``.

        Closing the generator (``aclose()``) closes the HTTP connection; vLLM aborts the request.
        """
        url = f"{self.base_url}/v1/completions"
        async with self._http.open_stream(
            url, self._payload(request), f"the {_NAME}", _submit_error
        ) as stream:
            reason: str | None = None
            usage: dict[str, object] = {}
            seen = 0
            while (data := await stream.reader.next_data()) is not None and data != DONE:
                event = loads(data)
                if not isinstance(event, dict):
                    continue
                if event.get("error") is not None or event.get("object") == "error":
                    raise _engine_error(event.get("error", event), status=None, at_submit=False)
                for choice in event.get("choices") or ():
                    text = choice.get("text")
                    if text:
                        seen += 1
                        yield Token(text)
                    reason = choice.get("finish_reason") or reason
                if isinstance(event.get("usage"), dict):
                    usage = event["usage"]
            if reason is None:
                raise worker_reset(f"the {_NAME} ended the stream without a finish_reason")
            stream.finished = _finished(reason, usage, seen)
        yield stream.result()

    def _payload(self, request: GenerateRequest) -> dict[str, object]:
        payload: dict[str, object] = {
            "model": self.model,
            "prompt": request.prompt,
            "max_tokens": request.max_tokens,
            "seed": request.seed,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        payload.update(_sampling(request.sampler))
        payload.update(request.overrides)  # OpenAI's names: temperature, top_p, stop
        if request.ignore_eos:
            payload["ignore_eos"] = True
        return payload

    async def _model_card(self) -> dict[str, object] | None:
        """This server's card for :attr:`model` from ``GET /v1/models``, or None when it is not listed."""
        body = await self._get("/v1/models")
        decoded = decode_body(body)
        cards = decoded.get("data") if isinstance(decoded, dict) else None
        for card in cards if isinstance(cards, list) else ():
            if isinstance(card, dict) and card.get("id") == self.model:
                return card
        return None

    def chat(self, request: GenerateRequest) -> AsyncGenerator[Token | Finished, None]:
        """``POST /v1/chat/completions``: the server's own chat template renders the messages."""
        payload = chat_payload(request, self.model, extra_sampling=False)
        url = f"{self.base_url}/v1/chat/completions"
        return chat_stream(self._http, url, payload, f"the {_NAME}", _submit_error, _in_stream_error)

    async def embed(self, inputs: list[str]) -> Embedded:
        url = f"{self.base_url}/v1/embeddings"
        return await embed(self._http, url, self.model, inputs, f"the {_NAME}", _submit_error)

    async def _get(self, path: str) -> bytes:
        status, body = await self._http.fetch("GET", f"{self.base_url}{path}", f"{_NAME} {path}")
        if status != 200:
            raise _status_error(status, body, at_submit=False)
        return body


def _sampling(sampler: Sampler) -> dict[str, object]:
    if sampler.temperature <= 0 or sampler.top_k == 1:
        return {"temperature": 0.0, "top_p": 1.0}
    out: dict[str, object] = {"temperature": sampler.temperature, "top_p": sampler.top_p}
    if sampler.top_k > 1:
        out["top_k"] = sampler.top_k
    if sampler.min_p > 0:
        out["min_p"] = sampler.min_p
    if sampler.repeat_penalty != 1.0:
        out["repetition_penalty"] = sampler.repeat_penalty
    return out


def _finished(reason: str, usage: dict[str, object], seen: int) -> Finished:
    if reason == "abort":
        raise OrchestratorError(Code.INTERNAL, f"the {_NAME} aborted the request")
    finish: Literal["stop", "length"] = "length" if reason == "length" else "stop"
    prompt_tokens = usage.get("prompt_tokens")
    completion_tokens = usage.get("completion_tokens")
    return Finished(
        finish_reason=finish,
        tokens_in=prompt_tokens if isinstance(prompt_tokens, int) else 0,
        tokens_out=completion_tokens if isinstance(completion_tokens, int) else seen,
    )


def _error_fields(error: object) -> tuple[str, str]:
    """(message, param) of an OpenAI error object (nested or flat), tolerating a bare string."""
    if isinstance(error, dict):
        inner = error.get("error", error)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner), str(inner.get("param") or "")
        return str(inner), ""
    return str(error), ""


def _engine_error(error: object, status: int | None, at_submit: bool) -> OrchestratorError:
    """SPEC §4: capacity at submit or out of memory → REPLICA_EXHAUSTED; a prompt over the context →
    INVALID_PARAMS; anything else the server reports → INTERNAL with its text."""
    message, param = _error_fields(error)
    if mentions_oom(message) or (at_submit and status in (429, 503)):
        return OrchestratorError(Code.REPLICA_EXHAUSTED, f"{_NAME}: {message}")
    if status == 400 and (param == "input_tokens" or "maximum context length" in message.lower()):
        return OrchestratorError(Code.INVALID_PARAMS, f"{_NAME}: {message}", field="prompt")
    return OrchestratorError(Code.INTERNAL, f"{_NAME}: {message}")


def _status_error(status: int, body: bytes, at_submit: bool) -> OrchestratorError:
    error = decode_body(body)
    if status == 503 and not at_submit:
        # A 503 on a control route: the server is up but its engine is not serving.
        return OrchestratorError(Code.POOL_UNREADY, f"{_NAME}: {_error_fields(error)[0] or 'HTTP 503'}")
    if isinstance(error, dict):
        return _engine_error(error, status, at_submit)
    return _engine_error(f"HTTP {status}: {error}", status, at_submit)


def _in_stream_error(error: object) -> OrchestratorError:
    return _engine_error(error, status=None, at_submit=False)


def _submit_error(status: int, body: bytes) -> OrchestratorError:
    return _status_error(status, body, at_submit=True)
