"""Shared fixtures: one real Redis server per test session, flushed per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from tests.support.log_scan import assert_logs_clean
from tests.support.mockengine import StartMock, mock_engines
from tests.support.redis_server import RedisServer
from tests.support.stack import Stack


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(Path(tmp_path_factory.mktemp("redis")))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    return redis_server.url


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        yield session


@pytest.fixture
def stack_factory(tmp_path: Path, redis_url: str) -> Iterator[Any]:
    """Build stacks on the test's Redis; every stack started is stopped at teardown."""
    stacks: list[Stack] = []

    def build(**kwargs: Any) -> Stack:
        stack = Stack(tmp_path / f"stack{len(stacks)}", redis_url, **kwargs)
        stacks.append(stack)
        return stack

    yield build
    for stack in stacks:
        stack.stop()
    for stack in stacks:  # a whole run's logs are scanned: no token in any service's or engine's log
        assert_logs_clean(stack)


@pytest.fixture
async def start_mock(tmp_path: Path) -> AsyncIterator[StartMock]:
    """Start mock engines as real processes; all are stopped at teardown."""
    async with mock_engines(tmp_path) as start:
        yield start
