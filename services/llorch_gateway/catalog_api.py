"""The catalog routes (SPEC §2.3): the scheduler owns the catalog; these only validate and relay.

``POST /v1/catalog/models`` (201 new, 200 the same entry again), ``GET /v1/catalog/models[?state=&tag=]``,
``GET|DELETE /v1/catalog/models/{id}`` (DELETE: 409 while a pool serves it),
``POST /v1/catalog/models/{id}/verify[?wait=true]`` and ``POST /v1/catalog/models/{id}/state``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Annotated, Any, Final, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from llorch.errors import OrchestratorError, invalid
from llorch.v1 import scheduler_pb2

from .models import parse_json_object, parse_model
from .scheduler_client import SchedulerClient

log = logging.getLogger(__name__)

_MODEL_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}")
_STATES: Final = ("Draft", "Active", "Canary", "Deprecated", "Retired")


class StateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    state: Literal["Draft", "Active", "Canary", "Deprecated", "Retired"]
    deadline_ms: Annotated[int, Field(ge=1, le=3_600_000)] = 60_000


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(payload, separators=(",", ":")), content_type="application/json"
    )


def _model_id(request: web.Request) -> str:
    value = request.match_info["model_id"]
    if not _MODEL_ID.fullmatch(value):
        raise invalid("id", "a model id must match ^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")
    return value


def _wait(request: web.Request) -> bool:
    value = request.query.get("wait", "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise invalid("wait", "wait must be true or false")
    return value in ("true", "1")


class CatalogApi:
    def __init__(self, scheduler: SchedulerClient) -> None:
        self.scheduler = scheduler
        self._background: set[asyncio.Task[Any]] = set()

    async def _call(self, **fields: Any) -> scheduler_pb2.CatalogReply:
        return await self.scheduler.catalog(scheduler_pb2.CatalogRequest(**fields))

    async def create(self, request: web.Request) -> web.Response:
        body = parse_json_object(await request.read())
        reply = await self._call(op="create", body_json=json.dumps(body))
        return _json(json.loads(reply.entries_json[0]), 201 if reply.created else 200)

    async def list(self, request: web.Request) -> web.Response:
        state = request.query.get("state", "")
        if state and state not in _STATES:
            raise invalid("state", f"state must be one of {', '.join(_STATES)}")
        tag = request.query.get("tag", "")
        if len(tag) > 64:
            raise invalid("tag", "tag must be at most 64 characters")
        reply = await self._call(op="list", state=state, tag=tag)
        return _json({"items": [json.loads(e) for e in reply.entries_json]})

    async def get(self, request: web.Request) -> web.Response:
        reply = await self._call(op="get", model_id=_model_id(request))
        return _json(json.loads(reply.entries_json[0]))

    async def delete(self, request: web.Request) -> web.Response:
        await self._call(op="delete", model_id=_model_id(request))
        return web.Response(status=204)

    async def verify(self, request: web.Request) -> web.Response:
        model_id = _model_id(request)
        if _wait(request):
            reply = await self._call(op="verify", model_id=model_id)
            return _json(json.loads(reply.entries_json[0]))
        await self._call(op="get", model_id=model_id)  # 404 now, not later
        task = asyncio.create_task(self._verify_later(model_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return _json({"id": model_id, "verification": {"status": "pending"}}, 202)

    async def _verify_later(self, model_id: str) -> None:
        try:
            await self._call(op="verify", model_id=model_id)
        except OrchestratorError as exc:
            log.warning(
                "background verification failed",
                extra={"event": "catalog_verify_failed", "model_id": model_id, "error": exc.code.value},
            )

    async def state(self, request: web.Request) -> web.Response:
        model_id = _model_id(request)
        body = parse_model(StateRequest, parse_json_object(await request.read()))
        reply = await self._call(
            op="state", model_id=model_id, state=body.state, deadline_ms=body.deadline_ms
        )
        return _json({"id": model_id, "state": body.state, "previous_state": reply.previous_state}, 202)


def add_routes(app: web.Application, scheduler: SchedulerClient) -> None:
    api = CatalogApi(scheduler)
    app.router.add_post("/v1/catalog/models", api.create)
    app.router.add_get("/v1/catalog/models", api.list)
    app.router.add_get("/v1/catalog/models/{model_id}", api.get)
    app.router.add_delete("/v1/catalog/models/{model_id}", api.delete)
    app.router.add_post("/v1/catalog/models/{model_id}/verify", api.verify)
    app.router.add_post("/v1/catalog/models/{model_id}/state", api.state)
