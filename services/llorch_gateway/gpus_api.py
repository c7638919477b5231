"""``GET /v1/gpus`` (issue 13): the scheduler's VRAM ledger, per device, with its residents.

Each device lists its total, the bytes its loaded residents use, the bytes the loads under way have
reserved and what is free; each resident (a pool on that device, loaded or not) its state (unloaded,
loading, ready, busy, idle, unloading), since when it is idle, whether it is pinned, its residency, what
it uses and what it would need, its running tasks and when it was loaded. The route takes no query
parameters: any is 400 INVALID_PARAMS naming it, so a typo is not mistaken for a filter.
"""

from __future__ import annotations

import json

from aiohttp import web

from llorch.errors import invalid

from . import render
from .scheduler_client import SchedulerClient


class GpusApi:
    def __init__(self, scheduler: SchedulerClient) -> None:
        self.scheduler = scheduler

    async def gpus(self, request: web.Request) -> web.Response:
        for name in request.query:
            raise invalid(name, f"unknown query parameter {name!r}: /v1/gpus takes none")
        reply = await self.scheduler.gpus()
        body = json.dumps(render.gpu_ledger(reply), separators=(",", ":"))
        return web.Response(text=body, content_type="application/json")


def add_routes(app: web.Application, scheduler: SchedulerClient) -> None:
    """``GET /v1/gpus``, under the API token like every /v1 route."""
    api = GpusApi(scheduler)
    app.router.add_get("/v1/gpus", api.gpus)
