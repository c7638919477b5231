"""The task event contract (SPEC §3): the one home of every event's name and payload.

Every producer (admission, the queue watch, cancel, the sweeper, the pool manager's executor) builds
its events here, already encoded as the compact JSON the log stores and SSE relays verbatim. The
payload models are also the source of ``contracts/events.schema.json`` (:func:`json_schema`), which
the integration suite validates every event it reads against.

Encoding is ``json.dumps`` of a plain dict with ``None`` fields left out (the models are the schema,
not the hot path); ``token`` is hand-encoded because it runs once per token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import StrEnum
from json.encoder import encode_basestring
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from llorch.errors import Code, JsonValue, OrchestratorError

Priority = Literal["interactive", "batch"]


class EventName(StrEnum):
    STARTED = "started"
    METRICS = "metrics"
    TOKEN = "token"
    END = "end"
    ERROR = "error"


TERMINAL: Final = frozenset({EventName.END.value, EventName.ERROR.value})


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Started(_Payload):
    task_id: str
    queue_position: int = Field(ge=0)
    predicted_start_ms: int = Field(ge=0)
    on_time_probability: float = Field(ge=0, le=1)
    priority: Priority
    phase: Literal["loading"] | None = Field(
        default=None, description="present when the task waits for its on-demand model to load"
    )


class QueuedMetrics(_Payload):
    phase: Literal["queued"] = "queued"
    queue_position: int = Field(ge=0)
    predicted_start_ms: int = Field(ge=0)
    queue_depth: int = Field(ge=0)
    on_time_probability: float = Field(ge=0, le=1)


class LoadingMetrics(_Payload):
    """A queued task whose model is being loaded: the queued fields plus what the load costs."""

    phase: Literal["loading"] = "loading"
    queue_position: int = Field(ge=0)
    predicted_start_ms: int = Field(ge=0)
    queue_depth: int = Field(ge=0)
    on_time_probability: float = Field(ge=0, le=1)
    load_eta_ms: int = Field(ge=0)
    waiting_for: str | None = Field(
        default=None, description="why the load itself waits (busy or protected residents), if it does"
    )


class DispatchMetrics(_Payload):
    phase: Literal["dispatch"] = "dispatch"
    pool_id: str
    replica_id: str
    engine: str
    engine_version: str
    kv_warmth: bool
    kv_migrated: Literal[False] = False
    queue_time_ms: int = Field(ge=0)
    seed: int
    determinism: Literal["strict", "best_effort"]
    sampler_profile_version: str


class DecodeMetrics(_Payload):
    phase: Literal["decode"] = "decode"
    queue_depth: int = Field(ge=0)
    on_time_probability: float = Field(ge=0, le=1)
    kv_warmth: bool
    tokens_out_so_far: int = Field(ge=0)
    tokens_budget_remaining: int | None = None
    time_budget_remaining_ms: int | None = None
    cost_budget_remaining: float | None = None


class TokenEvent(_Payload):
    t: str
    i: int = Field(ge=0)
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None,
        description="chat only: one streamed OpenAI delta.tool_calls list, as the engine sent it",
    )


class End(_Payload):
    tokens_out: int = Field(ge=0)
    decode_ms: int = Field(ge=0)
    tokens_in: int = Field(ge=0)
    queue_time_ms: int = Field(ge=0)
    first_token_ms: int = Field(ge=0)
    finish_reason: Literal["stop", "length", "tool_calls"]
    pool_id: str
    replica_id: str
    embeddings: list[list[float]] | None = None
    scores: list[float] | None = None


class ErrorEvent(BaseModel):
    """The terminal error: SPEC §2.1's envelope (with its code's context fields) plus ``tokens_out``."""

    model_config = ConfigDict(extra="allow", frozen=True)
    code: Code
    message: str
    retriable: bool
    tokens_out: int = Field(ge=0)
    engine: str | None = None
    pool_id: str | None = None
    replica_id: str | None = None


METRICS_PHASES: Final[dict[str, type[_Payload]]] = {
    "queued": QueuedMetrics,
    "loading": LoadingMetrics,
    "dispatch": DispatchMetrics,
    "decode": DecodeMetrics,
}
PAYLOADS: Final[dict[str, tuple[type[BaseModel], ...]]] = {
    EventName.STARTED: (Started,),
    EventName.METRICS: tuple(METRICS_PHASES.values()),
    EventName.TOKEN: (TokenEvent,),
    EventName.END: (End,),
    EventName.ERROR: (ErrorEvent,),
}


def _encode(payload: Mapping[str, Any]) -> str:
    return json.dumps(
        {k: v for k, v in payload.items() if v is not None}, separators=(",", ":"), ensure_ascii=False
    )


# -- constructors: (event name, encoded payload) ----------------------------------------------------


def started(
    task_id: str,
    queue_position: int,
    predicted_start_ms: int,
    on_time_probability: float,
    priority: Priority,
    loading: bool = False,
) -> str:
    return _encode(
        {
            "task_id": task_id,
            "queue_position": queue_position,
            "predicted_start_ms": predicted_start_ms,
            "on_time_probability": on_time_probability,
            "priority": priority,
            "phase": "loading" if loading else None,
        }
    )


def queued(queue_position: int, predicted_start_ms: int, queue_depth: int, on_time_probability: float) -> str:
    return _encode(
        {
            "phase": "queued",
            "queue_position": queue_position,
            "predicted_start_ms": predicted_start_ms,
            "queue_depth": queue_depth,
            "on_time_probability": on_time_probability,
        }
    )


def loading(
    queue_position: int,
    predicted_start_ms: int,
    queue_depth: int,
    on_time_probability: float,
    load_eta_ms: int,
    waiting_for: str | None = None,
) -> str:
    return _encode(
        {
            "phase": "loading",
            "queue_position": queue_position,
            "predicted_start_ms": predicted_start_ms,
            "queue_depth": queue_depth,
            "on_time_probability": on_time_probability,
            "load_eta_ms": load_eta_ms,
            "waiting_for": waiting_for,
        }
    )


def dispatch(
    *,
    pool_id: str,
    replica_id: str,
    engine: str,
    engine_version: str,
    kv_warmth: bool,
    queue_time_ms: int,
    seed: int,
    determinism: str,
    sampler_profile_version: str,
) -> str:
    return _encode(
        {
            "phase": "dispatch",
            "pool_id": pool_id,
            "replica_id": replica_id,
            "engine": engine,
            "engine_version": engine_version,
            "kv_warmth": kv_warmth,
            "kv_migrated": False,
            "queue_time_ms": queue_time_ms,
            "seed": seed,
            "determinism": determinism,
            "sampler_profile_version": sampler_profile_version,
        }
    )


def decode(
    *,
    queue_depth: int,
    on_time_probability: float,
    kv_warmth: bool,
    tokens_out_so_far: int,
    budgets: Mapping[str, JsonValue] | None = None,
) -> str:
    """``budgets``: the session's remaining budgets, top-level as SPEC §3 names them
    (``tokens_budget_remaining``, ``time_budget_remaining_ms``, ``cost_budget_remaining``)."""
    return _encode(
        {
            "phase": "decode",
            "queue_depth": queue_depth,
            "on_time_probability": on_time_probability,
            "kv_warmth": kv_warmth,
            "tokens_out_so_far": tokens_out_so_far,
            **{k: budgets.get(k) for k in _BUDGET_KEYS if budgets},
        }
    )


_BUDGET_KEYS: Final = ("tokens_budget_remaining", "time_budget_remaining_ms", "cost_budget_remaining")


def token(text: str, i: int, tool_calls: list[dict[str, Any]] | None = None) -> str:
    """`{"t":...,"i":...}` without a dict and an encoder pass per token (the hot path); a chat's
    tool-call delta adds ``tool_calls``."""
    if tool_calls is not None:
        return _encode({"t": text, "i": i, "tool_calls": tool_calls})
    return f'{{"t":{encode_basestring(text)},"i":{i}}}'


def end(
    *,
    tokens_out: int,
    decode_ms: int,
    tokens_in: int,
    queue_time_ms: int,
    first_token_ms: int,
    finish_reason: str,
    pool_id: str,
    replica_id: str,
    embeddings: list[list[float]] | None = None,
) -> str:
    return _encode(
        {
            "tokens_out": tokens_out,
            "decode_ms": decode_ms,
            "tokens_in": tokens_in,
            "queue_time_ms": queue_time_ms,
            "first_token_ms": first_token_ms,
            "finish_reason": finish_reason,
            "pool_id": pool_id,
            "replica_id": replica_id,
            "embeddings": embeddings,
        }
    )


def error(exc: OrchestratorError, tokens_out: int = 0, **where: str | None) -> str:
    """The terminal ``error`` payload from the error tree: the envelope, ``tokens_out`` and where it
    ran (``engine``, ``pool_id``, ``replica_id``; empty values are left out). Writers that end a task
    from outside the token path pass 0: the store's terminate step fills in the tokens already sent."""
    return _encode({**exc.envelope(), "tokens_out": tokens_out, **{k: v or None for k, v in where.items()}})


# -- validation and the published schema -------------------------------------------------------------


def validate(name: str, data: str | Mapping[str, Any]) -> BaseModel:
    """Parse one event against the contract; raises ValueError naming what is wrong."""
    models = PAYLOADS.get(name)
    if models is None:
        raise ValueError(f"unknown event name {name!r}")
    payload = json.loads(data) if isinstance(data, str) else dict(data)
    if name == EventName.METRICS:
        model = METRICS_PHASES.get(str(payload.get("phase")))
        if model is None:
            raise ValueError(f"metrics event with unknown phase {payload.get('phase')!r}")
        models = (model,)
    return models[0].model_validate_json(json.dumps(payload), strict=True)


def json_schema() -> dict[str, Any]:
    """The contract as JSON Schema: ``{name: schema}`` under ``events``; ``metrics`` is one of its phases."""
    defs: dict[str, Any] = {}
    events: dict[str, Any] = {}
    for name, models in PAYLOADS.items():
        refs = []
        for model in models:
            schema = model.model_json_schema(ref_template="#/$defs/{model}")
            defs.update(schema.pop("$defs", {}))
            defs[model.__name__] = schema
            refs.append({"$ref": f"#/$defs/{model.__name__}"})
        events[str(name)] = refs[0] if len(refs) == 1 else {"oneOf": refs}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "llama-orch task events (SPEC §3)",
        "description": "Payload of each SSE event by event name; generated from llorch.events.",
        "$defs": dict(sorted(defs.items())),
        "events": events,
    }
