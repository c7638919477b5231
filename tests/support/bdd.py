"""Helpers shared by the behave step modules (step modules cannot import each other)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from .stack import Client

T = TypeVar("T")
STEP_TIMEOUT_S = 120.0


def run(context: Any, awaitable: Awaitable[T]) -> T:
    """Run one step's async work on the scenario's loop, bounded by a deadline."""
    return context.loop.run_until_complete(asyncio.wait_for(awaitable, STEP_TIMEOUT_S))


def client(context: Any) -> Client:
    return Client(context.stack, context.http)
