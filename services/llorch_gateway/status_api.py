"""The status routes and the status page (issue 14).

- ``GET /``: the status page, one self-contained HTML file (``static/status.html``). It needs no token
  (it holds no data); it asks for the API token, keeps it in sessionStorage and sends it on every call.
- ``GET /v1/status``: one snapshot of the whole orchestrator: pools with their replicas, GPUs, replica
  sets with their queues, running tasks with their tokens so far, the newest failures.
- ``GET /v1/status/stream``: SSE, an ``event: status`` frame with the same JSON at once and then every
  :data:`STREAM_INTERVAL_S`, until the client goes away or the gateway shuts down; while a snapshot
  cannot be had (scheduler or Redis away) a comment ``: unavailable <CODE>`` keeps the stream alive.
- ``GET /v1/tasks?limit=N``: the newest tasks (1..200, default 20), newest first, never their prompts.

Snapshots are shared: concurrent callers wait on one build, and a build younger than
:data:`SNAPSHOT_FRESH_S` is served again, so any number of open pages costs one round of reads a second.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import re
from dataclasses import dataclass
from importlib import metadata, resources
from typing import Final, cast

from aiohttp import web
from multidict import MultiMapping
from redis.exceptions import RedisError

from llorch.errors import OrchestratorError, invalid, store_unavailable
from llorch.store import Store, TaskState, TaskSummary, now_ms
from llorch.v1 import scheduler_pb2

from . import render
from .scheduler_client import SchedulerClient
from .sse import open_event_stream

STREAM_INTERVAL_S: Final = 1.0
SNAPSHOT_FRESH_S: Final = 0.5
RECENT_ERRORS: Final = 20
TASKS_LIMIT_DEFAULT: Final = 20
TASKS_LIMIT_MAX: Final = 200
_LIMIT: Final = re.compile(r"[0-9]{1,4}")
_INLINE: Final = re.compile(r"<(script|style)>(.*?)</\1>", re.DOTALL)


class StatusSource:
    """Builds the status snapshot (as its JSON text) from the scheduler and the store."""

    def __init__(self, scheduler: SchedulerClient, store: Store, version: str) -> None:
        self.scheduler = scheduler
        self.store = store
        self.version = version
        self._last: tuple[float, str] | None = None
        self._building: asyncio.Task[str] | None = None

    async def snapshot(self) -> str:
        """The current snapshot; raises the scheduler's or the store's error when it cannot be built."""
        loop = asyncio.get_running_loop()
        if self._last is not None and loop.time() - self._last[0] < SNAPSHOT_FRESH_S:
            return self._last[1]
        if self._building is None:
            self._building = asyncio.create_task(self._build(), name="status-snapshot")
            self._building.add_done_callback(self._built)
        # Shielded: a client that goes away must not cancel the build the others are waiting on.
        return await asyncio.shield(self._building)

    def _built(self, task: asyncio.Task[str]) -> None:
        self._building = None
        if not task.cancelled() and task.exception() is None:  # also marks a failure as seen
            self._last = (asyncio.get_running_loop().time(), task.result())

    async def _build(self) -> str:
        pools, sets, running, failures = await asyncio.gather(
            self.scheduler.list_pools(),
            self.scheduler.replica_sets(),
            self.store.running_tasks(),
            self.store.recent_failures(RECENT_ERRORS),
        )
        snapshot = {
            "version": self.version,
            "generated_at_ms": now_ms(),
            "pools": [_pool(view) for view in pools.pools],
            "gpus": render.gpus(pools.pools),
            "replica_sets": [render.replica_set(view) for view in sets.sets],
            "running": [_running(task) for task in running],
            "recent_errors": [
                {"task_id": f.task_id, "code": f.code, "message": f.message, "at_ms": f.at_ms}
                for f in failures
            ],
        }
        return json.dumps(snapshot, separators=(",", ":"))


def _pool(view: scheduler_pb2.PoolView) -> dict[str, object]:
    """PoolHealth plus each replica's free slots (a replica that is not Ready takes no work)."""
    body = render.pool_health(view)
    rendered = cast(list[dict[str, object]], body["replicas"])
    body["replicas"] = [
        {**entry, "slots_free": max(0, r.slots_total - r.slots_busy) if r.state == "Ready" else 0}
        for entry, r in zip(rendered, view.state.replicas, strict=True)
    ]
    return body


def _running(task: TaskSummary) -> dict[str, object]:
    return {
        "task_id": task.task_id,
        "model": task.model_ref,
        "pool_id": task.pool_id,
        "replica_id": task.replica_id,
        "priority": task.priority,
        "tokens_out": task.tokens_out,
        "started_ms": task.dispatched_ms,
    }


def _task(task: TaskSummary) -> dict[str, object]:
    return {
        "task_id": task.task_id,
        "model": task.model_ref,
        "state": task.state.value,
        "priority": task.priority,
        "created_ms": task.created_ms,
        "tokens_out": task.tokens_out,
        "code": task.error_code if task.state == TaskState.FAILED else None,
    }


def tasks_limit(query: MultiMapping[str]) -> int:
    """``?limit=``: an integer from 1 to :data:`TASKS_LIMIT_MAX`, :data:`TASKS_LIMIT_DEFAULT` when
    absent; anything else (a second ``limit`` too) is 400 INVALID_PARAMS naming ``limit``."""
    values = query.getall("limit", [])
    if not values:
        return TASKS_LIMIT_DEFAULT
    message = f"limit must be one integer from 1 to {TASKS_LIMIT_MAX}"
    if len(values) > 1 or not _LIMIT.fullmatch(values[0]):
        raise invalid("limit", message)
    limit = int(values[0])
    if not 1 <= limit <= TASKS_LIMIT_MAX:
        raise invalid("limit", message)
    return limit


@dataclass(frozen=True, slots=True)
class Page:
    """The status page and its Content-Security-Policy: only its own inline script and style (by
    hash) run, and it may talk only to this origin."""

    body: bytes
    csp: str

    @classmethod
    def load(cls) -> Page:
        text = (resources.files(__package__) / "static" / "status.html").read_text(encoding="utf-8")
        hashes: dict[str, list[str]] = {"script": [], "style": []}
        for kind, content in _INLINE.findall(text):
            digest = base64.b64encode(hashlib.sha256(content.encode()).digest()).decode()
            hashes[kind].append(f"'sha256-{digest}'")
        sources = {kind: " ".join(found) or "'none'" for kind, found in hashes.items()}
        csp = "; ".join(
            [
                "default-src 'none'",
                f"script-src {sources['script']}",
                f"style-src {sources['style']}",
                "connect-src 'self'",
                "img-src data:",
                "base-uri 'none'",
                "form-action 'none'",
                "frame-ancestors 'none'",
            ]
        )
        return cls(text.encode(), csp)


def _frame(snapshot: str) -> bytes:
    return f"event: status\ndata: {snapshot}\n\n".encode()


class StatusApi:
    def __init__(self, source: StatusSource, store: Store, page: Page) -> None:
        self.source = source
        self.store = store
        self.html = page
        self._closing = asyncio.Event()

    async def close_streams(self, app: web.Application) -> None:
        """End every status stream (an ``on_shutdown`` hook): an open page must not hold up the
        gateway's shutdown until aiohttp cancels its handler."""
        self._closing.set()

    async def _closing_within(self, seconds: float) -> bool:
        try:
            async with asyncio.timeout(seconds):
                await self._closing.wait()
        except TimeoutError:
            return False
        return True

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self.html.body,
            content_type="text/html",
            charset="utf-8",
            headers={
                "Content-Security-Policy": self.html.csp,
                "Cache-Control": "no-cache",
                "X-Content-Type-Options": "nosniff",
                "Referrer-Policy": "no-referrer",
            },
        )

    async def status(self, request: web.Request) -> web.Response:
        return web.Response(text=await self.source.snapshot(), content_type="application/json")

    async def stream(self, request: web.Request) -> web.StreamResponse:
        first = await self.source.snapshot()  # before the 200: a failure is an ordinary error response
        response = await open_event_stream(request)
        try:
            await response.write(_frame(first))
            while not await self._closing_within(STREAM_INTERVAL_S):  # the stream's pace
                try:
                    snapshot = await self.source.snapshot()
                except (OrchestratorError, RedisError) as exc:
                    error = exc if isinstance(exc, OrchestratorError) else store_unavailable()
                    await response.write(f": unavailable {error.code.value}\n\n".encode())
                    continue
                await response.write(_frame(snapshot))
            await response.write_eof()
        except ConnectionResetError:
            pass  # the client went away (a write to a closed connection raises this)
        return response

    async def tasks(self, request: web.Request) -> web.Response:
        limit = tasks_limit(request.query)
        summaries = await self.store.recent_tasks(limit)
        body = {"tasks": [_task(task) for task in summaries]}
        return web.Response(text=json.dumps(body, separators=(",", ":")), content_type="application/json")


def _version() -> str:
    try:
        return metadata.version("llama-orch")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def add_routes(app: web.Application, scheduler: SchedulerClient, store: Store) -> None:
    """``GET /`` (the page, no token), ``GET /v1/status``, ``GET /v1/status/stream`` and ``GET /v1/tasks``
    (under the API token like every /v1 route)."""
    api = StatusApi(StatusSource(scheduler, store, _version()), store, Page.load())
    app.router.add_get("/", api.page)
    app.router.add_get("/v1/status", api.status)
    app.router.add_get("/v1/status/stream", api.stream)
    app.router.add_get("/v1/tasks", api.tasks)
    app.on_shutdown.append(api.close_streams)
