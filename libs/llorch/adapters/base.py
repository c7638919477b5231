"""The seam between a pool manager and an engine's wire protocol.

An adapter turns a :class:`GenerateRequest` into the engine's streaming request and yields
:class:`Token` pieces followed by exactly one :class:`Finished`. Failures are raised as
``OrchestratorError`` with SPEC §4's mapping: connection refused/reset or process exit → WORKER_RESET,
an engine error object or 5xx → INTERNAL (engine text in the message), a capacity refusal
(no free slot, 503 busy, out of memory at submit) → REPLICA_EXHAUSTED.
Cancel is closing the iterator (``aclose()``), which closes the HTTP stream; the engine frees the slot.

Implementations: ``llamacpp`` (llama-server and the mock engine), ``openai`` (vLLM and other
OpenAI-compatible servers), ``tgi`` and ``triton``; ``launch`` builds each engine's command line and
picks the adapter for a pool.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple, Protocol


@dataclass(frozen=True, slots=True)
class Sampler:
    temperature: float = 0.0
    top_k: int = 1
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A completion (``prompt``) or, with ``chat`` set, a chat: the client's OpenAI chat request
    (messages, tools, tool_choice, response_format, stop, sampling), which the adapter sends to the
    engine's chat endpoint with ``max_tokens``, ``seed`` and the profile's sampling where it gives none.
    ``overrides``: a completion's client sampling (``temperature``, ``top_p``, ``stop``), over the profile."""

    task_id: str
    prompt: str
    max_tokens: int
    seed: int
    sampler: Sampler = field(default_factory=Sampler)
    cache_prompt: bool = False
    ignore_eos: bool = False
    chat: dict[str, object] | None = None
    overrides: dict[str, object] = field(default_factory=dict)


class Token(NamedTuple):
    """A piece of the answer: text, or (chat) one streamed ``delta.tool_calls`` list, unchanged.

    A named tuple, not a frozen dataclass: one is built per token, at half the cost."""

    text: str
    tool_calls: list[dict[str, object]] | None = None


FinishReason = Literal["stop", "length", "tool_calls"]


@dataclass(frozen=True, slots=True)
class Finished:
    finish_reason: FinishReason
    tokens_in: int
    tokens_out: int


@dataclass(frozen=True, slots=True)
class Embedded:
    """The vectors of an embedding request, one per input in order, and the tokens read."""

    vectors: list[list[float]]
    tokens_in: int


@dataclass(frozen=True, slots=True)
class EngineHealth:
    live: bool
    ready: bool


@dataclass(frozen=True, slots=True)
class EngineProps:
    engine_version: str
    slots_total: int
    ctx: int
    model_path: str


@dataclass(frozen=True, slots=True)
class KvInfo:
    """KV-cache occupancy as the engine reports it.

    ``usage_ratio`` is the used fraction of the whole cache (0..1), or None when the engine does not
    report one (TGI, llama.cpp builds without ``llamacpp:kv_cache_usage_ratio``); callers then estimate
    from the tokens they have sent. ``per_slot`` holds one ratio per slot where the engine gives them,
    else it is empty.
    """

    usage_ratio: float | None
    per_slot: tuple[float, ...] = ()


KV_UNREPORTED: Final = KvInfo(usage_ratio=None)


class EngineAdapter(Protocol):
    async def health(self) -> EngineHealth: ...

    async def props(self) -> EngineProps: ...

    def stream(self, request: GenerateRequest) -> AsyncGenerator[Token | Finished, None]: ...

    def chat(self, request: GenerateRequest) -> AsyncGenerator[Token | Finished, None]:
        """Like :meth:`stream`, through the engine's chat endpoint (``request.chat``)."""
        ...

    async def embed(self, inputs: list[str]) -> Embedded:
        """One vector per input, from the engine's embeddings endpoint."""
        ...

    async def metrics(self) -> dict[str, float]: ...

    async def kv_info(self) -> KvInfo:
        """The engine's KV-cache occupancy; ``usage_ratio`` None when it is not reported."""
        ...

    async def erase_kv(self, slot_id: int) -> bool:
        """Evict one slot's KV cache. True = erased; False = this engine (or build) cannot, a no-op."""
        ...

    async def busy_slots(self) -> int | None:
        """Requests the engine is working on or holding; None when it does not report them."""
        ...

    async def aclose(self) -> None: ...
