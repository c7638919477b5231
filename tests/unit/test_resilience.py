"""until_done: retries a store step through an outage, logs the outage once, and awaits what it runs."""

from __future__ import annotations

import logging

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from llorch.resilience import Outage, until_done


async def test_a_failing_step_is_retried_until_it_succeeds_and_the_outage_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[int] = []

    async def step(n: int) -> int:
        calls.append(n)
        if len(calls) < 4:
            raise RedisConnectionError("Connection closed by server")
        return n * 2

    outage = Outage("redis (test)")
    with caplog.at_level(logging.INFO, logger="llorch.resilience"):
        assert await until_done(lambda: step(21), outage) == 42  # a lambda's coroutine is awaited
    assert len(calls) == 4 and not outage.down
    events = [getattr(r, "event", "") for r in caplog.records]
    assert events.count("outage_started") == 1 and events.count("outage_ended") == 1


async def test_bounded_attempts_reraise_the_last_error() -> None:
    async def never() -> None:
        raise RedisConnectionError("down")

    outage = Outage("redis (test)")
    with pytest.raises(RedisConnectionError):
        await until_done(never, outage, attempts=2)
    assert outage.down


async def test_other_errors_are_not_retried() -> None:
    calls: list[int] = []

    async def broken() -> None:
        calls.append(1)
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError):
        await until_done(broken, Outage("x"))
    assert calls == [1]


@pytest.mark.parametrize("attempts", [1, 2, 3])
async def test_bounded_attempts_run_exactly_that_many_times(attempts: int) -> None:
    """The bare first try and tenacity's later ones add up to ``attempts``; one attempt never
    waits, so it does not count as an outage."""
    calls: list[int] = []

    async def never() -> None:
        calls.append(1)
        raise RedisConnectionError("down")

    outage = Outage("redis (test)")
    with pytest.raises(RedisConnectionError):
        await until_done(never, outage, attempts=attempts)
    assert len(calls) == attempts
    assert outage.down is (attempts > 1)


async def test_a_step_that_succeeds_at_once_ends_an_outage_already_under_way() -> None:
    outage = Outage("redis (test)")
    outage.failed(RedisConnectionError("down"))

    async def fine() -> str:
        return "ok"

    assert await until_done(fine, outage) == "ok"
    assert not outage.down
