"""Chaos fixtures: a Redis with AOF and a stack of separately restartable processes, per test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.chaos.harness import ChaosStack
from tests.support.restartable_redis import RestartableRedis


@pytest.fixture
async def chaos_stack(tmp_path: Path) -> AsyncIterator[ChaosStack]:
    redis = RestartableRedis(tmp_path / "redis")
    await redis.start()
    stack = ChaosStack(tmp_path / "stack", redis)
    try:
        await stack.start_all()
        yield stack
    finally:
        stack.stop()
        redis.stop()
