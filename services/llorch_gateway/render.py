"""The scheduler's typed replies as the HTTP API's JSON (SPEC §2.2, §2.3): the one place they are
rendered. Absent values are null, integers are JSON numbers (never protobuf's int64-as-string)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

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
    """ReplicaSetView; ``residency`` is ``always`` unless a member is on-demand, ``status`` is
    ``loaded``, ``loading`` or ``unloaded`` (null from a scheduler that does not say)."""
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
        "residency": view.residency or "always",
        "status": view.status or None,
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
        "model_status": dict(sorted(engine.model_status.items())),
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


def pool_health(view: scheduler_pb2.PoolView) -> dict[str, object]:
    """PoolHealth (SPEC §2.3): a pool as its manager reports it plus the scheduler's view of its load."""
    pool = view.state
    slots_total = sum(r.slots_total for r in pool.replicas if r.state == "Ready")
    gpus = [t for t in pool.telemetry if t.vram_total_bytes]
    last_error = (
        {"code": pool.last_error.code, "message": pool.last_error.message, "at_ms": pool.last_error.at_ms}
        if pool.has_error
        else None
    )
    return {
        "pool_id": pool.pool_id,
        "live": pool.live,
        "ready": pool.state == "Ready",
        "draining": view.draining,
        "state": pool.state,
        "engine": pool.engine,
        "engine_version": pool.engine_version or None,
        "model_ref": pool.model_ref,
        "model_digest": pool.model_digest,
        "devices": list(pool.devices),
        "ctx": pool.ctx,
        "replicas": [
            {
                "replica_id": r.replica_id,
                "state": r.state,
                "pid": r.pid or None,
                "port": r.port or None,
                "slots_total": r.slots_total,
                "slots_busy": r.slots_busy,
                "circuit": r.circuit or "closed",
                "kv_cache_usage_ratio": _opt(r, "kv_cache_usage_ratio"),
            }
            for r in pool.replicas
        ],
        "last_error": last_error,
        "restarts": pool.restarts,
        "circuit": pool.circuit or "closed",
        "metrics": {
            "slots_total": slots_total,
            "slots_free": view.slots_free,
            "tasks_running": view.tasks_running,
            "vram_used_bytes": sum(t.vram_used_bytes for t in gpus) if gpus else None,
            "vram_total_bytes": sum(t.vram_total_bytes for t in gpus) if gpus else None,
            "gpu_utilization": (
                max(utils)
                if (utils := [t.gpu_utilization for t in gpus if t.HasField("gpu_utilization")])
                else None
            ),
            "kv_cache_usage_ratio": _opt(pool, "kv_cache_usage_ratio"),
        },
    }


@dataclass
class _Gpu:
    name: str = ""
    total: int = 0
    free: int | None = None  # None: no probe saw the device
    used_by_pools: int = 0
    utilization: list[float] = field(default_factory=list)
    pools: set[str] = field(default_factory=set)

    @property
    def used(self) -> int:
        by_probe = self.total - self.free if self.free is not None else 0
        return max(self.used_by_pools, by_probe)


def gpus(views: Iterable[scheduler_pb2.PoolView]) -> list[dict[str, object]]:
    """The GPUs the pools report, one entry per device label (labels name a machine's GPUs, as in
    Capabilities' per-device concurrency), in label order; devices without VRAM (``cpu``) are left out.

    ``vram_used_bytes`` is the device's use as its probe sees it (total less free, other processes
    included), and never less than what the pools report their replicas use on it: a simulated GPU's
    engines report their own use beside the probe's reservations.
    """
    seen: dict[str, _Gpu] = {}
    for view in views:
        for t in view.state.telemetry:
            if not t.vram_total_bytes:
                continue
            gpu = seen.setdefault(t.device, _Gpu())
            gpu.name = gpu.name or t.name
            gpu.total = max(gpu.total, t.vram_total_bytes)
            if t.name:  # the probe's view (see DeviceTelemetry): its free figure is the device's
                gpu.free = t.vram_free_bytes
            gpu.used_by_pools += t.vram_used_bytes
            if t.HasField("gpu_utilization"):
                gpu.utilization.append(t.gpu_utilization)
            gpu.pools.add(view.state.pool_id)
    return [
        {
            "device": device,
            "name": gpu.name or device,
            "vram_total_bytes": gpu.total,
            "vram_used_bytes": gpu.used,
            "utilization": max(gpu.utilization) if gpu.utilization else None,
            "pools": sorted(gpu.pools),
        }
        for device, gpu in sorted(seen.items())
    ]


def _ms_or_null(ms: int) -> int | None:
    return ms or None  # 0 is the ledger's "never": no such moment


def resident(entry: scheduler_pb2.Resident) -> dict[str, object]:
    """One pool on a device as the VRAM ledger counts it; its moments are null when 0 (not idle, not
    loaded)."""
    return {
        "pool_id": entry.pool_id,
        "model": entry.model_ref,
        "state": entry.state,
        "idle_since_ms": _ms_or_null(entry.idle_since_ms),
        "pinned": entry.pinned,
        "residency": entry.residency or "always",
        "used_bytes": entry.used_bytes,
        "need_bytes": entry.need_bytes,
        "running": entry.running,
        "loaded_at_ms": _ms_or_null(entry.loaded_at_ms),
    }


def gpu_ledger(reply: scheduler_pb2.GpusReply) -> dict[str, object]:
    """``GET /v1/gpus`` (issue 13): the scheduler's VRAM ledger per device with its residents, and the
    swap policy's two bounds."""
    return {
        "devices": [
            {
                "device": ledger.device,
                "name": ledger.name or ledger.device,
                "total_bytes": ledger.total_bytes,
                "used_bytes": ledger.used_bytes,
                "reserved_bytes": ledger.reserved_bytes,
                "free_bytes": ledger.free_bytes,
                "residents": [resident(entry) for entry in ledger.residents],
            }
            for ledger in reply.devices
        ],
        "max_swap_wait_ms": reply.max_swap_wait_ms,
        "min_residency_ms": reply.min_residency_ms,
    }
