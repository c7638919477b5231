"""The OpenAI chat and embeddings wire that llama-server, vLLM and TGI all serve (and the mock engine).

- Chat [F, ENGINES.md, ENGINE-PROTOCOLS.md]: ``POST /v1/chat/completions`` with ``stream: true`` and
  ``stream_options.include_usage`` answers ``data: {chat.completion.chunk}`` lines: ``delta.content``
  pieces, or ``delta.tool_calls`` pieces for a tool call, a chunk with ``finish_reason``, a usage chunk
  (``choices: []``) when the engine reports usage, then ``data: [DONE]``. Errors before the stream are
  an HTTP status with an error object (llama-server answers 400 even for a stream), after it a
  ``data: {"error": ...}`` line. The engine's own chat template renders the messages.
- Embeddings [F]: ``POST /v1/embeddings {model, input: [...]}`` → ``{data: [{index, embedding}],
  usage: {prompt_tokens}}``.

Where the engine omits usage, ``tokens_out`` is the number of pieces seen and ``tokens_in`` 0 (the
pool manager fills in its estimate).
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Callable
from typing import Final

import aiohttp

from llorch.adapters._http import EngineHttp, worker_reset
from llorch.adapters._sse import DONE, loads
from llorch.adapters.base import Embedded, Finished, FinishReason, GenerateRequest, Sampler, Token
from llorch.errors import Code, OrchestratorError

ErrorOf = Callable[[int, bytes], OrchestratorError]
"""(status, body) → the error of a refused request."""
StreamErrorOf = Callable[[object], OrchestratorError]
"""An error object inside the stream → its error."""

_FINISH: Final[dict[str, FinishReason]] = {"length": "length", "tool_calls": "tool_calls"}


def chat_payload(request: GenerateRequest, model: str, extra_sampling: bool) -> dict[str, object]:
    """The client's chat request for the engine: its fields win; ``max_tokens``, ``seed`` and the
    profile's sampling fill in what it left out. ``extra_sampling``: the engine takes ``top_k``,
    ``min_p`` and ``repeat_penalty`` too (llama-server)."""
    payload: dict[str, object] = dict(request.chat or {})
    payload["model"] = model
    payload["stream"] = True
    payload["stream_options"] = {"include_usage": True}
    payload["max_tokens"] = request.max_tokens
    payload.pop("max_completion_tokens", None)
    payload.setdefault("seed", request.seed)
    for key, value in _profile(request.sampler, extra_sampling).items():
        payload.setdefault(key, value)
    return payload


def _profile(sampler: Sampler, extra: bool) -> dict[str, object]:
    if sampler.temperature <= 0 or sampler.top_k == 1:
        return {"temperature": 0.0}
    out: dict[str, object] = {"temperature": sampler.temperature, "top_p": sampler.top_p}
    if extra:
        out.update(top_k=sampler.top_k, min_p=sampler.min_p, repeat_penalty=sampler.repeat_penalty)
    return out


async def chat_stream(
    http: EngineHttp,
    url: str,
    payload: dict[str, object],
    what: str,
    submit_error: ErrorOf,
    stream_error: StreamErrorOf,
) -> AsyncGenerator[Token | Finished, None]:
    """Relay one chat stream: a :class:`Token` per content or tool-call delta, then :class:`Finished`."""
    async with http.open_stream(url, payload, what, submit_error) as stream:
        reason: str | None = None
        usage: dict[str, object] = {}
        seen = 0
        while (data := await stream.reader.next_data()) is not None and data != DONE:
            event = loads(data)
            if not isinstance(event, dict):
                continue
            if event.get("error") is not None or event.get("object") == "error":
                raise stream_error(event.get("error", event))
            for choice in event.get("choices") or ():
                delta = choice.get("delta") or {}
                content = delta.get("content")
                tool_calls = delta.get("tool_calls")
                if content or tool_calls:
                    seen += 1
                    yield Token(content or "", tool_calls if isinstance(tool_calls, list) else None)
                reason = choice.get("finish_reason") or reason
            if isinstance(event.get("usage"), dict):
                usage = event["usage"]
        if reason is None:
            raise worker_reset(f"{what} ended the chat stream without a finish_reason")
        if reason == "abort":
            raise OrchestratorError(Code.INTERNAL, f"{what} aborted the request")
        stream.finished = Finished(
            finish_reason=_FINISH.get(reason, "stop"),
            tokens_in=_count(usage.get("prompt_tokens"), 0),
            tokens_out=_count(usage.get("completion_tokens"), seen),
        )
    yield stream.result()


async def embed(
    http: EngineHttp, url: str, model: str, inputs: list[str], what: str, status_error: ErrorOf
) -> Embedded:
    """The vectors of ``inputs``, in order."""
    try:
        resp = await http.request("POST", url, {"model": model, "input": inputs})
        async with resp:
            status, body = resp.status, await resp.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise worker_reset(f"cannot reach {what} to embed", exc) from exc
    if status != 200:
        raise status_error(status, body)
    try:
        answer = json.loads(body)
        rows = sorted(answer["data"], key=lambda row: row["index"])
        vectors = [[float(x) for x in row["embedding"]] for row in rows]
    except (ValueError, KeyError, TypeError) as exc:
        raise OrchestratorError(Code.INTERNAL, f"{what} sent an unreadable embeddings answer") from exc
    if len(vectors) != len(inputs):
        raise OrchestratorError(Code.INTERNAL, f"{what} answered {len(vectors)} vectors for {len(inputs)}")
    usage = answer.get("usage") if isinstance(answer, dict) else None
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return Embedded(vectors, _count(tokens, 0))


def _count(value: object, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default
