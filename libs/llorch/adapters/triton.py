"""The Triton Inference Server adapter, generate extension (SPEC §8 "Triton"), e.g. a TensorRT-LLM ensemble.

Wire facts used, checked against documentation and the stub only (ENGINE-PROTOCOLS.md, Triton's
``docs/protocol/extension_generate.md``; no real Triton has been run against this adapter):

- Health [F]: live = ``GET /v2/health/live`` 200; ready = live, ``GET /v2/health/ready`` 200 and
  ``GET /v2/models/{m}/ready`` 200. Triton answers "not ready" with 400. Real Triton listens only after
  its models load (refused meanwhile); the stub answers live 200, ready 400 while "loading".
- Version [F]: ``GET /v2`` → ``{name, version, extensions}``. ``trtllm_version`` has no endpoint [?]; it
  comes from the pool's ``adapter.trtllm_version``. Format: ``engine_version =
  "triton-<version>+trtllm-<trtllm_version|unknown>"``, e.g. ``triton-2.54.0+trtllm-unknown``.
- Props: Triton reports no slot count or context length, so both are the launch's values.
- Stream [F]: ``POST /v2/models/{m}/generate_stream`` with a JSON object whose keys are the model's own
  input names [R], from the pool's adapter options (SPEC §7): ``{<input>: prompt, <max_tokens_input>:
  max_tokens, "stream": true, ...sampling}`` with defaults ``text_input`` / ``max_tokens`` /
  ``text_output`` (the TensorRT-LLM ensemble's names [?]). The answer is SSE ``data: {json}`` chunks,
  each carrying the new text under ``<output>``; there is no ``[DONE]`` and no final flag in the JSON:
  the body simply ends. One :class:`Token` per chunk with non-empty text; the chunk count is
  ``tokens_out``. Triton gives no finish reason or prompt count, so ``finish_reason`` is ``length``
  when ``tokens_out`` reached ``max_tokens`` and ``stop`` otherwise, and ``tokens_in`` is 0.
- Sampling: the TensorRT-LLM ensemble's optional inputs ``top_k``, ``top_p``, ``temperature`` and
  ``repetition_penalty``: greedy (temperature ≤ 0 or top_k 1) sends only ``top_k: 1``; sampling sends
  the values inside the ranges TensorRT-LLM accepts. A key that is not a model input becomes a request
  parameter, which other models ignore [?].
- Seed: not sent. Its input name changed between TensorRT-LLM versions (``random_seed`` up to v0.19,
  ``seed`` from v0.20), the v1 adapter options have no key to name it, and greedy decoding — the only
  determinism Triton is held to (SPEC §8: one instance, no in-flight batching, ``slots: 1``) — does not
  read it. Sampled requests on Triton are therefore not reproducible.
- Errors [F]: ``{"error": "..."}``. Before inference: an HTTP status with that JSON; a failed first
  response: its status with an SSE ``data:`` body; later: a ``data: {"error": ...}`` chunk after the
  200. 503 at submit (``max_queue_size`` exceeded) and out-of-memory text → REPLICA_EXHAUSTED; the rest
  → INTERNAL with Triton's text. A body cut off mid-chunk (the server died) → WORKER_RESET.
- Cancel [?]: closing the connection; Triton ≥ 2.41 cancels the request, and TensorRT-LLM honours it.
  Not confirmed against a real server.
- Metrics [F]: ``GET <metrics_url>`` (the separate ``--metrics-port``), ``nv_inference_*`` and
  TensorRT-LLM's ``nv_trt_llm_*``. KV use = ``nv_trt_llm_kv_cache_block_metrics`` ``used`` / ``max``
  blocks when exported [?], else None. No KV erase.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Mapping
from typing import Final, Literal
from urllib.parse import quote

import aiohttp

from llorch.adapters._http import (
    DEFAULT_REQUEST_TIMEOUT_S,
    EngineHttp,
    HttpAdapter,
    decode_body,
    mentions_oom,
    parse_metrics,
    sample_values,
)
from llorch.adapters._sse import loads
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

_NAME: Final = "Triton"
DEFAULT_INPUT: Final = "text_input"
DEFAULT_OUTPUT: Final = "text_output"
DEFAULT_MAX_TOKENS_INPUT: Final = "max_tokens"
_KV_BLOCKS: Final = "nv_trt_llm_kv_cache_block_metrics"
_REQUESTS: Final = "nv_trt_llm_request_metrics"


class TritonAdapter(HttpAdapter):
    """An :class:`~llorch.adapters.base.EngineAdapter` for one model of one Triton server at ``base_url``.

    ``model_name`` is the model (or ensemble) to call; ``input_name``, ``output_name`` and
    ``max_tokens_input`` are its tensor names; ``metrics_url`` is the full URL of the metrics port's
    ``/metrics``. ``slots_total``, ``ctx`` and ``model_path`` (the model repository) are the launch's
    values. Build it from a pool's ``adapter`` options with :meth:`from_options`. Session and timeouts
    as in :class:`~llorch.adapters.llamacpp.LlamaCppAdapter`.
    """

    def __init__(
        self,
        base_url: str,
        *,
        model_name: str,
        metrics_url: str,
        slots_total: int,
        ctx: int,
        model_path: str,
        input_name: str = DEFAULT_INPUT,
        output_name: str = DEFAULT_OUTPUT,
        max_tokens_input: str = DEFAULT_MAX_TOKENS_INPUT,
        trtllm_version: str | None = None,
        session: aiohttp.ClientSession | None = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model_name = model_name
        self.metrics_url = metrics_url
        self.slots_total = slots_total
        self.ctx = ctx
        self.model_path = model_path
        self.input_name = input_name
        self.output_name = output_name
        self.max_tokens_input = max_tokens_input
        self.trtllm_version = trtllm_version
        self._model_url = f"{self.base_url}/v2/models/{quote(model_name, safe='')}"
        self._http = EngineHttp("TritonAdapter", session, request_timeout_s)

    @classmethod
    def from_options(
        cls,
        base_url: str,
        options: Mapping[str, str],
        *,
        metrics_url: str,
        slots_total: int,
        ctx: int,
        model_path: str,
        session: aiohttp.ClientSession | None = None,
        request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
    ) -> TritonAdapter:
        """From a pool's ``adapter`` map (SPEC §7): ``model_name`` (required), ``input``, ``output``,
        ``max_tokens_input``, ``trtllm_version``."""
        return cls(
            base_url,
            model_name=options["model_name"],
            metrics_url=metrics_url,
            slots_total=slots_total,
            ctx=ctx,
            model_path=model_path,
            input_name=options.get("input", DEFAULT_INPUT),
            output_name=options.get("output", DEFAULT_OUTPUT),
            max_tokens_input=options.get("max_tokens_input", DEFAULT_MAX_TOKENS_INPUT),
            trtllm_version=options.get("trtllm_version"),
            session=session,
            request_timeout_s=request_timeout_s,
        )

    async def health(self) -> EngineHealth:
        if await self._http.probe(f"{self.base_url}/v2/health/live") != 200:
            return EngineHealth(live=False, ready=False)
        ready = (
            await self._http.probe(f"{self.base_url}/v2/health/ready") == 200
            and await self._http.probe(f"{self._model_url}/ready") == 200
        )
        return EngineHealth(live=True, ready=ready)

    async def props(self) -> EngineProps:
        status, body = await self._http.fetch("GET", f"{self.base_url}/v2", f"{_NAME} /v2")
        if status != 200:
            raise _status_error(status, body, at_submit=False)
        server = decode_body(body)
        version = server.get("version") if isinstance(server, dict) else None
        return EngineProps(
            engine_version=f"triton-{version or 'unknown'}+trtllm-{self.trtllm_version or 'unknown'}",
            slots_total=self.slots_total,
            ctx=self.ctx,
            model_path=self.model_path,
        )

    async def metrics(self) -> dict[str, float]:
        """``GET <metrics_url>`` as ``{sample name: value}``, like the other adapters."""
        status, body = await self._http.fetch("GET", self.metrics_url, f"{_NAME} metrics")
        if status != 200:
            raise _status_error(status, body, at_submit=False)
        return parse_metrics(body.decode())

    async def kv_info(self) -> KvInfo:
        metrics = await self.metrics()
        used = sample_values(metrics, _KV_BLOCKS, kv_cache_block_type="used")
        total = sample_values(metrics, _KV_BLOCKS, kv_cache_block_type="max")
        if not used or not total or sum(total) <= 0:
            return KvInfo(usage_ratio=None)
        return KvInfo(usage_ratio=sum(used) / sum(total))

    async def erase_kv(self, slot_id: int) -> bool:
        """Triton has no KV eviction route: a no-op."""
        return False

    async def busy_slots(self) -> int | None:
        """TensorRT-LLM's active requests; None for models that do not export them."""
        active = sample_values(await self.metrics(), _REQUESTS, request_type="active")
        return round(sum(active)) if active else None

    def chat(self, request: GenerateRequest) -> AsyncGenerator[Token | Finished, None]:
        """Triton serves no chat endpoint; its pools never list the chat workload."""
        raise OrchestratorError(Code.INVALID_PARAMS, "Triton pools do not serve chat", field="messages")

    async def embed(self, inputs: list[str]) -> Embedded:
        raise OrchestratorError(Code.INVALID_PARAMS, "Triton pools do not serve embeddings", field="input")

    async def stream(self, request: GenerateRequest) -> AsyncGenerator[Token | Finished, None]:
        """Yield a :class:`Token` per chunk with non-empty output text, then one :class:`Finished` at the
        end of the body.

        Closing the generator (``aclose()``) closes the HTTP connection; Triton cancels the request.
        """
        payload: dict[str, object] = {
            self.input_name: request.prompt,
            self.max_tokens_input: request.max_tokens,
            "stream": True,
        }
        payload.update(_sampling(request.sampler))
        # temperature and top_p keep their names; Triton's generate has no stop words.
        payload.update({k: v for k, v in request.overrides.items() if k in ("temperature", "top_p")})
        if request.overrides.get("stop"):
            raise OrchestratorError(Code.INVALID_PARAMS, "Triton pools do not take stop", field="stop")
        url = f"{self._model_url}/generate_stream"
        async with self._http.open_stream(url, payload, _NAME, _submit_error) as stream:
            seen = 0
            while (data := await stream.reader.next_data()) is not None:
                event = loads(data)
                if not isinstance(event, dict):
                    continue
                if event.get("error") is not None:
                    raise _engine_error(event["error"], status=None, at_submit=False)
                text = _text(event.get(self.output_name))
                if text:
                    seen += 1
                    yield Token(text)
            finish: Literal["stop", "length"] = "length" if seen >= request.max_tokens else "stop"
            stream.finished = Finished(finish_reason=finish, tokens_in=0, tokens_out=seen)
        yield stream.result()


def _text(value: object) -> str:
    """An output tensor as text: one element is a scalar, more are a list (batch by beam)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(item for item in value if isinstance(item, str))
    return ""


def _sampling(sampler: Sampler) -> dict[str, object]:
    if sampler.temperature <= 0 or sampler.top_k == 1:
        return {"top_k": 1}
    out: dict[str, object] = {"temperature": sampler.temperature}
    if sampler.top_k > 0:
        out["top_k"] = sampler.top_k
    if 0 < sampler.top_p <= 1:
        out["top_p"] = sampler.top_p
    if sampler.repeat_penalty != 1.0:
        out["repetition_penalty"] = sampler.repeat_penalty
    return out


def _message(error: object) -> str:
    if isinstance(error, dict):
        return str(error.get("error") or error)
    return str(error)


def _engine_error(error: object, status: int | None, at_submit: bool) -> OrchestratorError:
    """SPEC §4 for Triton: a full queue at submit or OOM → REPLICA_EXHAUSTED; the rest → INTERNAL."""
    message = _message(error)
    if mentions_oom(message) or (at_submit and status == 503):
        return OrchestratorError(Code.REPLICA_EXHAUSTED, f"{_NAME}: {message}")
    return OrchestratorError(Code.INTERNAL, f"{_NAME}: {message}")


def _status_error(status: int, body: bytes, at_submit: bool) -> OrchestratorError:
    error = decode_body(body)
    if status == 503 and not at_submit:
        return OrchestratorError(Code.POOL_UNREADY, f"{_NAME}: {_message(error) or 'HTTP 503'}")
    if isinstance(error, dict) and "error" in error:
        return _engine_error(error, status, at_submit)
    return _engine_error(f"HTTP {status}: {error}", status, at_submit)


def _submit_error(status: int, body: bytes) -> OrchestratorError:
    return _status_error(status, body, at_submit=True)
