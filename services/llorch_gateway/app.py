"""The gateway's aiohttp application: routes of the native API, probes and the /metrics union."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from llorch import tracing
from llorch.config import LlorchConfig
from llorch.errors import Code, OrchestratorError, invalid
from llorch.ids import is_valid_id, new_task_id
from llorch.lifecycle import LOADABLE_STATES
from llorch.policy import PolicyEngine, load_plugins
from llorch.store import Store
from llorch.v1 import scheduler_pb2, types_pb2

from . import (
    anthropic_api,
    artifacts_api,
    catalog_api,
    gpus_api,
    openai_api,
    openapi,
    policy_api,
    render,
    responses_api,
    status_api,
)
from .auth import Authenticator
from .chat import ChatRunner
from .edge import BODY_TIMEOUT, LARGE_BODIES, MAX_BODY, METRICS, edge, read_body
from .feed import EventFeed
from .metrics import GatewayMetrics
from .models import DrainRequest, ReloadRequest, TaskRequest, parse_json_object, parse_model
from .scheduler_client import SchedulerClient
from .sse import relay
from .worker_metrics import WorkerMetrics

log = logging.getLogger(__name__)


@dataclass
class Deps:
    cfg: LlorchConfig
    store: Store
    scheduler: SchedulerClient
    auth: Authenticator
    metrics: GatewayMetrics
    http: aiohttp.ClientSession
    feed: EventFeed
    workers: WorkerMetrics | None = None  # api.workers > 1: this worker's side of the /metrics union


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(payload, separators=(",", ":")), content_type="application/json"
    )


def _path_id(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not is_valid_id(value):
        raise invalid(name, f"{name} must match ^[A-Za-z0-9][A-Za-z0-9._:-]{{0,127}}$")
    return value


class Api:
    def __init__(self, deps: Deps) -> None:
        self.d = deps
        self._background: set[asyncio.Task[None]] = set()

    async def submit(self, request: web.Request) -> web.Response:
        body = await request.read()
        req = parse_model(TaskRequest, parse_json_object(body))
        admit = scheduler_pb2.AdmitRequest(
            task_id=req.task_id or "",
            session_id=req.session_id or "",
            workload=req.workload,
            model_ref=req.model_ref,
            engine=req.engine or "",
            ctx=req.ctx,
            priority=req.priority,
            max_tokens=req.max_tokens or 0,
            determinism=req.determinism or "",
            sampler_profile_version=req.sampler_profile_version or "",
            inputs=req.inputs or [],
            expected_tokens=req.expected_tokens or 0,
            kv_hint=req.kv_hint,
            client=request.get("client", ""),
        )
        if req.deadline_ms is not None:
            if req.deadline_ms <= 0:
                raise OrchestratorError(Code.DEADLINE_UNMET, "deadline_ms must be > 0", predicted_start_ms=0)
            admit.deadline_ms = req.deadline_ms
        if req.seed is not None:
            admit.seed = req.seed
        if req.prompt is not None:
            admit.prompt = req.prompt
        if req.budget is not None:
            for name in ("tokens", "time_ms", "cost"):
                if (value := getattr(req.budget, name)) is not None:
                    setattr(admit.budget, name, value)
        result = await self.d.scheduler.admit(admit)
        payload = {
            "task_id": result.task_id,
            "session_id": result.session_id or None,
            "queue_position": result.queue_position,
            "predicted_start_ms": result.predicted_start_ms,
            "backoff_ms": result.backoff_ms,
            "on_time_probability": result.on_time_probability,
            "stream_url": f"/v1/tasks/{result.task_id}/stream",
        }
        response = _json(payload, 202)
        response.headers.update(_budget_headers(result))
        return response

    async def status(self, request: web.Request) -> web.Response:
        status = await self.d.scheduler.get_task(_path_id(request, "task_id"))
        return _json(render.task_status(status))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        task_id = _path_id(request, "task_id")
        return await relay(
            request, self.d.store, self.d.feed, task_id, self.d.cfg.sse.heartbeat_s, self._budget_headers
        )

    async def _budget_headers(self, session_id: str) -> dict[str, str]:
        """X-Budget-* at stream start: the task's session's remaining budgets, where set."""
        session = await self.d.store.session(session_id)
        if session is None:
            return {}
        budgets = session.budgets
        headers = {}
        if budgets.tokens is not None:
            headers["X-Budget-Tokens-Remaining"] = str(budgets.tokens)
        if budgets.time_ms is not None:
            headers["X-Budget-Time-Remaining-Ms"] = str(budgets.time_ms)
        if budgets.cost_micro is not None:
            headers["X-Budget-Cost-Remaining"] = f"{budgets.cost_micro / 1_000_000:.4f}"
        return headers

    async def session(self, request: web.Request) -> web.Response:
        reply = await self.d.scheduler.get_session(_path_id(request, "session_id"))
        return _json(render.session(reply))

    async def delete_session(self, request: web.Request) -> web.Response:
        await self.d.scheduler.delete_session(_path_id(request, "session_id"))
        return web.Response(status=204)

    async def cancel(self, request: web.Request) -> web.Response:
        await self.d.scheduler.cancel(_path_id(request, "task_id"))
        return web.Response(status=204)

    async def pools(self, request: web.Request) -> web.Response:
        reply = await self.d.scheduler.list_pools()
        return _json([render.pool_health(view) for view in reply.pools])

    async def pool_health(self, request: web.Request) -> web.Response:
        pool_id = request.match_info["pool_id"]
        reply = await self.d.scheduler.list_pools()
        for view in reply.pools:
            if view.state.pool_id == pool_id:
                return _json(render.pool_health(view))
        raise OrchestratorError(Code.NOT_FOUND, f"pool {pool_id} is unknown")

    async def drain(self, request: web.Request) -> web.Response:
        pool_id = request.match_info["pool_id"]
        body = parse_model(DrainRequest, parse_json_object(await request.read()))
        await self.d.scheduler.pool_control(pool_id, "drain", body.deadline_ms)
        return _json({"pool_id": pool_id, "state": "draining", "deadline_ms": body.deadline_ms}, 202)

    async def reload(self, request: web.Request) -> web.Response:
        """202 at once (the swap goes on), or with ``?wait=true`` 200 when it is done and 409
        RELOAD_FAILED (rolled back) when it failed."""
        pool_id = request.match_info["pool_id"]
        body = parse_model(ReloadRequest, parse_json_object(await request.read()))
        wait = request.query.get("wait", "false").lower()
        if wait not in ("true", "false", "1", "0"):
            raise invalid("wait", "wait must be true or false")
        call = self.d.scheduler.pool_control(pool_id, "reload", new_model_ref=body.new_model_ref)
        if wait in ("true", "1"):
            done = await call
            return _json(
                {
                    "pool_id": pool_id,
                    "state": done.state,
                    "model_ref": done.model_ref,
                    "model_digest": done.model_digest,
                    "engine_version": done.engine_version,
                }
            )
        await self.d.scheduler.list_pools()  # fail fast on an unreachable scheduler
        reload_id = new_task_id()
        task = asyncio.create_task(_background_reload(call, pool_id, reload_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return _json({"pool_id": pool_id, "state": "reloading", "reload_id": reload_id}, 202)

    async def resume(self, request: web.Request) -> web.Response:
        pool_id = request.match_info["pool_id"]
        reply = await self.d.scheduler.pool_control(pool_id, "resume")
        return _json({"pool_id": pool_id, "state": reply.state}, 202)

    async def replica_sets(self, request: web.Request) -> web.Response:
        reply = await self.d.scheduler.replica_sets()
        return _json([render.replica_set(view) for view in reply.sets])

    async def capabilities(self, request: web.Request) -> web.Response:
        caps = await self.d.scheduler.capabilities()
        return _json(render.capabilities(caps, self.d.auth.limits(request.get("client", ""))))

    async def task_trace(self, request: web.Request) -> str:
        """The requests on one task (its stream, status, cancel) join the task's trace: the
        traceparent its admission stored ('' for others, or when it cannot be read)."""
        task_id = request.match_info.get("task_id", "")
        if not is_valid_id(task_id):
            return ""
        try:
            record = await self.d.store.task(task_id)
        except RedisError:  # the handler meets the outage itself and answers it
            return ""
        return record.traceparent if record is not None else ""

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        # Redis counts as up only while both this gateway's store and its live-event feed reach it.
        redis_ok = self.d.feed.connected.is_set() and await self.d.store.ping()
        try:
            reply = await self.d.scheduler.list_pools(timeout_s=2.0)
            scheduler_ok = True
            # An unloaded on-demand pool serves too: a task for it is admitted and loads it (issue 13).
            ready = sum(1 for view in reply.pools if _serves(view.state))
        except OrchestratorError:
            scheduler_ok, ready = False, 0
        checks = {
            "redis": redis_ok,
            "feed": self.d.feed.connected.is_set(),
            "scheduler": scheduler_ok,
            "pools_ready": ready,
        }
        if redis_ok and scheduler_ok and ready:
            return _json({"status": "ready", "checks": checks})
        return _json({"status": "not_ready", "checks": checks}, 503)

    async def metrics(self, request: web.Request) -> web.Response:
        host = self.d.cfg.grpc.scheduler.rpartition(":")[0]
        components = {"scheduler": f"{host}:{self.d.cfg.grpc.metrics_base_port}"}
        import os  # the supervisor's address: set by `llorch up` on its gateway child only

        if supervisor := os.environ.get("LLORCH_SUPERVISOR_METRICS"):
            components["supervisor"] = supervisor
        try:
            reply = await self.d.scheduler.list_pools(timeout_s=2.0)
            components.update({f"pool-manager@{a}": a for a in reply.metrics_addresses})
        except OrchestratorError:
            pass  # the scheduler's own scrape will report it down
        if self.d.workers is not None:  # the other gateway workers' counters, summed into ours
            await self.d.workers.refresh(self.d.http, self.d.metrics.component_up)
        body = await self.d.metrics.union(self.d.http, components)
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _background_reload(
    call: Coroutine[Any, Any, scheduler_pb2.PoolControlResponse], pool_id: str, reload_id: str
) -> None:
    try:
        await call
    except OrchestratorError as exc:  # the pool's health shows last_error; the log says which reload
        log.warning(
            "reload failed",
            extra={
                "event": "reload_failed",
                "pool_id": pool_id,
                "reload_id": reload_id,
                "code": exc.code.value,
            },
        )


def _budget_headers(result: scheduler_pb2.AdmitResponse) -> dict[str, str]:
    headers = {}
    if result.HasField("budget_tokens"):
        headers["X-Budget-Tokens-Remaining"] = str(result.budget_tokens)
    if result.HasField("budget_time_ms"):
        headers["X-Budget-Time-Remaining-Ms"] = str(result.budget_time_ms)
    if result.HasField("budget_cost"):
        headers["X-Budget-Cost-Remaining"] = result.budget_cost
    return headers


def build_app(deps: Deps) -> web.Application:
    api = Api(deps)
    # After auth: an unauthenticated request starts no span and reads no task record. Absent (zero
    # cost) unless tracing is on.
    traced = [tracing.http_middleware(api.task_trace)] if tracing.enabled() else []
    app = web.Application(
        middlewares=[edge, deps.auth.middleware, *traced, read_body],
        client_max_size=deps.cfg.api.max_body_bytes,
    )
    app[METRICS] = deps.metrics
    app[MAX_BODY] = deps.cfg.api.max_body_bytes
    app[LARGE_BODIES] = {}
    app[BODY_TIMEOUT] = deps.cfg.api.body_timeout_s
    app.router.add_post("/v1/tasks", api.submit)
    app.router.add_get("/v1/tasks/{task_id}", api.status)
    app.router.add_get("/v1/tasks/{task_id}/stream", api.stream)
    app.router.add_post("/v1/tasks/{task_id}/cancel", api.cancel)
    app.router.add_get("/v1/sessions/{session_id}", api.session)
    app.router.add_delete("/v1/sessions/{session_id}", api.delete_session)
    app.router.add_get("/v1/pools", api.pools)
    app.router.add_get("/v1/pools/{pool_id}/health", api.pool_health)
    app.router.add_post("/v1/pools/{pool_id}/drain", api.drain)
    app.router.add_post("/v1/pools/{pool_id}/reload", api.reload)
    app.router.add_post("/v1/pools/{pool_id}/resume", api.resume)
    app.router.add_get("/v1/replicasets", api.replica_sets)
    app.router.add_get("/v1/capabilities", api.capabilities)
    runner = ChatRunner(deps.store, deps.feed, deps.scheduler)
    openai_api.add_routes(app, runner, deps.scheduler)
    anthropic_api.add_routes(app, runner)
    catalog_api.add_routes(app, deps.scheduler)
    artifacts_api.add_routes(app, deps.cfg)
    responses_api.add_routes(app, runner)
    status_api.add_routes(app, deps.scheduler, deps.store)
    gpus_api.add_routes(app, deps.scheduler)
    policy = PolicyEngine(deps.cfg.policy, load_plugins(deps.cfg.policy.plugins))
    policy_api.add_routes(app, policy, deps.metrics)
    openapi.add_routes(app)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    return app


def _serves(pool: types_pb2.PoolState) -> bool:
    """Ready, or on-demand and unloaded or loading."""
    return pool.state == "Ready" or (pool.residency == "on-demand" and pool.state in LOADABLE_STATES)
