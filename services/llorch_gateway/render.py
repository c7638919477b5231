"""The scheduler's typed replies as the HTTP API's JSON (SPEC §2.2, §2.3): the one place they are
rendered. Absent values are null, integers are JSON numbers (never protobuf's int64-as-string)."""

from __future__ import annotations

import json

from google.protobuf.message import Message

from llorch.v1 import scheduler_pb2


def task_status(status: scheduler_pb2.TaskStatus) -> dict[str, object]:
    """TaskStatus; `queue_position` and `predicted_start_ms` only while the task is queued."""
    body: dict[str, object] = {
        "task_id": status.task_id,
        "session_id": status.session_id or None,
        "state": status.state,
        "priority": status.priority,
        "model_ref": status.model_ref,
        "replica_set_id": status.replica_set_id,
        "pool_id": status.pool_id or None,
        "replica_id": status.replica_id or None,
        "tokens_out": status.tokens_out,
        "error": json.loads(status.error_json) if status.error_json else None,
    }
    if status.HasField("queue_position"):
        body["queue_position"] = status.queue_position
    if status.HasField("predicted_start_ms"):
        body["predicted_start_ms"] = status.predicted_start_ms
    return body


def session(info: scheduler_pb2.SessionInfo) -> dict[str, object]:
    """SessionInfo; a budget field appears only when that budget is set."""
    body: dict[str, object] = {
        "session_id": info.session_id,
        "ttl_ms_remaining": info.ttl_ms_remaining,
        "turns": info.turns,
        "max_turns": info.max_turns,
        "kv_bytes": info.kv_bytes,
        "kv_warmth": info.kv_warmth,
        "model_ref": info.model_ref,
        "replica_id": info.replica_id or None,
        "created_ms": info.created_ms,
    }
    for name in ("tokens_budget_remaining", "time_budget_remaining_ms", "cost_budget_remaining"):
        if info.HasField(name):
            body[name] = getattr(info, name)
    return body


def _opt(message: Message, name: str) -> object:
    return getattr(message, name) if message.HasField(name) else None


def replica_set(view: scheduler_pb2.ReplicaSetView) -> dict[str, object]:
    slo = view.slo
    return {
        "id": view.id,
        "engine": view.engine,
        "engine_version": view.engine_version,
        "model_id": view.model_id,
        "model_digest": view.model_digest,
        "ctx": view.ctx,
        "sampler_profile_version": view.sampler_profile_version,
        "pools": list(view.pools),
        "ready": view.ready,
        "devices": list(view.devices),
        "determinism": view.determinism,
        "load": view.load,
        "slots_total": view.slots_total,
        "slots_free": view.slots_free,
        "queue_depth": {"interactive": view.queue_interactive, "batch": view.queue_batch},
        "queue_capacity": view.queue_capacity,
        "full_policy": view.full_policy,
        "slo": {
            name: _opt(slo, name)
            for name in ("first_token_ms_p50", "first_token_ms_p95", "decode_ms_p50", "on_time_ratio")
        },
    }


def capabilities(caps: scheduler_pb2.CapabilitiesResponse, rate_limits: object) -> dict[str, object]:
    """Capabilities (SPEC §2.3, D16): each engine with its features, the caller's ``rate_limits`` and
    its own concurrency."""
    return {
        "api_version": caps.api_version,
        "engines": [_engine(engine, rate_limits) for engine in caps.engines],
    }


def _engine(engine: scheduler_pb2.EngineCapability, rate_limits: object) -> dict[str, object]:
    f, c = engine.features, engine.concurrency
    return {
        "engine": engine.engine,
        "engine_versions": list(engine.engine_versions),
        "ctx_max": engine.ctx_max,
        "supported_workloads": list(engine.supported_workloads),
        "models": list(engine.models),
        "rate_limits": rate_limits,
        "features": {
            "determinism": list(f.determinism),
            "queue_policies": list(f.queue_policies),
            "sessions": f.sessions,
            "budgets": f.budgets,
            "openai_compat": f.openai_compat,
            "tensor_split": f.tensor_split,
            "kv_hint": f.kv_hint,
        },
        "concurrency": {
            "slots_total": c.slots_total,
            "slots_free": c.slots_free,
            "per_device": [
                {
                    "device": d.device,
                    "name": _opt(d, "name"),
                    "vram_total_bytes": _opt(d, "vram_total_bytes"),
                    "vram_free_bytes": _opt(d, "vram_free_bytes"),
                    "slots_total": d.slots_total,
                    "slots_free": d.slots_free,
                }
                for d in c.per_device
            ],
        },
    }
