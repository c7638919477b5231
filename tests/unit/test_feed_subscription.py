"""A feed subscription hands its consumer what was delivered, and None once an interval passed with
nothing delivered (the SSE relay's heartbeat and its look at the log): never None while events flow,
never a wait past silence."""

from __future__ import annotations

import asyncio

from llorch.store import Event
from llorch_gateway.feed import Subscription

HANG_GUARD_S = 30.0
TICK_S = 0.05


def _events(first: int, n: int) -> list[Event]:
    return [Event(seq, "token", f'{{"t":"x","i":{seq}}}') for seq in range(first, first + n)]


async def test_delivered_events_come_out_in_order_and_silence_gives_none() -> None:
    sub = Subscription()
    sub.push(_events(0, 2))
    sub.push(_events(2, 1))
    assert [e.seq for e in await sub.next(TICK_S) or []] == [0, 1, 2]
    async with asyncio.timeout(HANG_GUARD_S):
        assert await sub.next(TICK_S) is None  # nothing delivered: the silence ends the wait
        assert await sub.next(TICK_S) is None  # and again, a fresh interval each time
    sub.close()


async def test_events_that_keep_coming_are_never_mistaken_for_silence() -> None:
    """A producer delivers one event per wait, as fast as the consumer takes them, across many silence
    intervals' worth of waits: every wait returns events (the timer set at the start re-arms itself
    rather than firing through a flow)."""
    sub = Subscription()
    got: list[int] = []
    waits = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 4 * TICK_S
    async with asyncio.timeout(HANG_GUARD_S):
        seq = 0
        while loop.time() < deadline:
            loop.call_soon(sub.push, _events(seq, 1))
            delivered = await sub.next(TICK_S)
            waits += 1
            assert delivered is not None, f"silence reported after {waits} waits while events flowed"
            got += [e.seq for e in delivered]
            seq += 1
    assert got == list(range(seq))
    sub.close()


async def test_a_sink_takes_deliveries_only_while_the_consumer_waits_with_nothing_pending() -> None:
    """What the sink takes is not handed out again; what it declines is, in order; and while anything
    is pending, later deliveries queue behind it without being offered, so the order holds."""
    sub = Subscription()
    offered: list[list[int]] = []
    take = True

    def sink(events: list[Event], arrived: float) -> bool:
        offered.append([e.seq for e in events])
        return take

    sub.sink = sink

    def deliver() -> None:  # runs once the consumer below waits in next()
        nonlocal take
        sub.push(_events(1, 2))  # taken by the sink
        take = False
        sub.push(_events(3, 1))  # declined: kept, and wakes the consumer
        sub.push(_events(4, 1))  # something is pending: queued behind it, not offered

    sub.push(_events(0, 1))  # no consumer waits yet: kept, not offered
    assert offered == []
    assert [e.seq for e in await sub.next(TICK_S) or []] == [0]
    asyncio.get_running_loop().call_soon(deliver)
    async with asyncio.timeout(HANG_GUARD_S):
        assert [e.seq for e in await sub.next(TICK_S) or []] == [3, 4]
    assert offered == [[1, 2], [3]]
    sub.close()
