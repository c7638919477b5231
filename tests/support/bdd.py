"""Helpers shared by the behave step modules (step modules cannot import each other)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from .stack import Client, Stack

T = TypeVar("T")
STEP_TIMEOUT_S = 120.0


def run(context: Any, awaitable: Awaitable[T]) -> T:
    """Run one step's async work on the scenario's loop, bounded by a deadline."""
    return context.loop.run_until_complete(asyncio.wait_for(awaitable, STEP_TIMEOUT_S))


def client(context: Any) -> Client:
    return Client(context.stack, context.http)


async def get_json(context: Any, path: str) -> Any:
    """GET a JSON answer of the stack's API: 200 with a correlation id."""
    stack: Stack = context.stack
    async with context.http.get(f"{stack.url}{path}", headers=stack.headers) as r:
        assert r.status == 200, (path, r.status, await r.text())
        assert r.headers.get("X-Correlation-Id"), dict(r.headers)
        return await r.json()
