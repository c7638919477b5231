"""Redis: the only module that builds key strings or talks to Redis.

Keys (prefix ``llorch:``; the part in braces is the Redis Cluster hash tag, so every multi-key step
touches one slot):

- ``task:{id}``   hash — the task record (state, request, placement, ``seq`` of the last event, ``terminal``)
- ``ev:{id}``     stream — the task's event log; entry id ``0-(seq+1)`` so SSE ``id:`` = seq
- ``q:{rs}:interactive`` / ``q:{rs}:batch`` — sorted sets scored by the set's admission sequence
- ``qseq:{rs}``   the set's admission sequence counter
- ``lease:{rs}``  sorted set of dispatched task ids scored by lease expiry (epoch ms)

Every multi-step change is one Lua script (registered once), so cancel is race-free by construction:
once a terminal event is in the log, ``append`` refuses every later event.

Live delivery: every script that appends also PUBLISHes the appended events, one message per call, on
the ``events`` channel: ``task_id US first_seq (US name US data)*`` with US = \x1f (JSON never carries
a raw control character). The stream stays the source of truth; a reader that sees a gap in the seqs
fills it from the stream, so a lost message costs a read, never an event.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Final, Literal, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline, PubSub

from llorch import lua

Priority = Literal["interactive", "batch"]
PRIORITIES: Final[tuple[Priority, Priority]] = ("interactive", "batch")
TERMINAL_EVENTS: Final = frozenset({"end", "error"})
READ_PAGE: Final = 512
"""Most events one log read returns."""

US: Final = "\x1f"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Event:
    seq: int
    name: str
    data: str


@dataclass(frozen=True, slots=True)
class Claim:
    task_id: str
    score: float
    priority: Priority
    admitted_ms: float
    deadline_at_ms: float


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """A replica set's queue: total capacity, per-class caps, and the full-queue policy."""

    capacity: int
    interactive_capacity: int
    batch_capacity: int
    policy: str  # reject | drop-lru


@dataclass(frozen=True, slots=True)
class Enqueued:
    position: int  # -1: refused
    depth_interactive: int
    depth_batch: int
    evicted: str  # the batch task displaced under drop-lru, or ''

    @property
    def depth(self) -> int:
        return self.depth_interactive + self.depth_batch


class Keys:
    """The one key builder."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def task(self, task_id: str) -> str:
        return f"{self.prefix}task:{{{task_id}}}"

    def events(self, task_id: str) -> str:
        return f"{self.prefix}ev:{{{task_id}}}"

    def queue(self, rs: str, priority: Priority) -> str:
        return f"{self.prefix}q:{{{rs}}}:{priority}"

    def queue_seq(self, rs: str) -> str:
        return f"{self.prefix}qseq:{{{rs}}}"

    def lease(self, rs: str) -> str:
        return f"{self.prefix}lease:{{{rs}}}"

    def queue_admitted(self, rs: str) -> str:
        return f"{self.prefix}qage:{{{rs}}}"

    def queue_deadlines(self, rs: str) -> str:
        return f"{self.prefix}qdl:{{{rs}}}"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}sess:{{{session_id}}}"

    def replica_sets(self) -> str:
        return f"{self.prefix}replicasets"

    def channel(self) -> str:
        return f"{self.prefix}events"


class Store:
    """Task records, event logs, queues and leases. Construct with :meth:`connect`."""

    def __init__(self, client: aioredis.Redis, prefix: str = "llorch:") -> None:
        self.client = client
        self.keys = Keys(prefix)
        self._append = client.register_script(lua.APPEND)
        self._terminate = client.register_script(lua.TERMINATE)
        self._create = client.register_script(lua.CREATE)
        self._enqueue = client.register_script(lua.ENQUEUE)
        self._claim = client.register_script(lua.CLAIM)
        self._requeue = client.register_script(lua.REQUEUE)
        self._queued_frame = client.register_script(lua.QUEUED_FRAME)
        self._dequeue = client.register_script(lua.DEQUEUE)
        self._mark_running = client.register_script(lua.MARK_RUNNING)
        self._session_admit = client.register_script(lua.SESSION_ADMIT)
        self._session_settle = client.register_script(lua.SESSION_SETTLE)
        self._session_set = client.register_script(lua.SESSION_SET)
        self._known_sets: set[str] = set()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls, url: str, prefix: str = "llorch:", password: str | None = None, max_connections: int = 1024
    ) -> AsyncIterator[Store]:
        client = aioredis.Redis.from_url(
            url, password=password, decode_responses=True, max_connections=max_connections
        )
        try:
            yield cls(client, prefix)
        finally:
            await client.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except aioredis.RedisError:
            return False

    # -- task records and events -------------------------------------------------------------------

    async def create_task(
        self, task_id: str, fields: Mapping[str, str], ttl_s: int, started: str = ""
    ) -> int:
        """Create the record, with its `started` event when given: 1; the id is still known: 0;
        the task was evicted before its record existed (see lua.CREATE): 2, and it has ended."""
        flat = [v for kv in fields.items() for v in kv]
        return int(
            await self._create(
                keys=[self.keys.task(task_id), self.keys.events(task_id)],
                args=[ttl_s, started, self.keys.channel(), task_id, *flat],
            )
        )

    async def append(
        self,
        task_id: str,
        events: Sequence[tuple[str, str, str]],
        fields: Mapping[str, str] | None = None,
        retention_s: int = 900,
    ) -> int:
        """Append ``(name, data_json, terminal_state)`` events unless the log already ended.

        ``terminal_state`` is '' for non-terminal events, else the task's final state. Returns the
        seq of the last event written, -1 when a terminal event stood first, -2 for an unknown task.
        """
        result = await self._append(
            keys=[self.keys.task(task_id), self.keys.events(task_id)],
            args=self._append_args(task_id, events, fields, retention_s),
        )
        return int(result)

    async def append_many(
        self,
        batches: Sequence[tuple[str, Sequence[tuple[str, str, str]], Mapping[str, str]]],
        retention_s: int,
    ) -> list[int]:
        """:meth:`append` for many tasks in one round trip; results in the order of ``batches``."""
        async with self.client.pipeline(transaction=False) as pipe:
            for task_id, events, fields in batches:
                await self._append(
                    keys=[self.keys.task(task_id), self.keys.events(task_id)],
                    args=self._append_args(task_id, events, fields, retention_s),
                    client=pipe,
                )
            return [int(r) for r in await pipe.execute()]

    async def append_queued_frames(self, frames: Sequence[tuple[str, str]]) -> None:
        """Queued `metrics` frames ``(task_id, data)``, each only if its task is still queued."""
        async with self.client.pipeline(transaction=False) as pipe:
            for task_id, data in frames:
                await self._queued_frame(
                    keys=[self.keys.task(task_id), self.keys.events(task_id)],
                    args=[data, self.keys.channel(), task_id],
                    client=pipe,
                )
            await pipe.execute()

    def _append_args(
        self,
        task_id: str,
        events: Sequence[tuple[str, str, str]],
        fields: Mapping[str, str] | None,
        retention_s: int,
    ) -> list[str | int]:
        flat_fields = [v for kv in (fields or {}).items() for v in kv]
        flat_events = [v for ev in events for v in ev]
        return [retention_s, len(flat_fields) // 2, *flat_fields, *flat_events, self.keys.channel(), task_id]

    async def mark_running(
        self, task_id: str, fields: Mapping[str, str]
    ) -> dict[str, str] | Literal[False] | None:
        """Set the placement fields and return the record; None if the task ended, False if its
        `started` event has not been written yet (admission is mid-way: put it back)."""
        flat = [v for kv in fields.items() for v in kv]
        reply = await self._mark_running(keys=[self.keys.task(task_id)], args=flat)
        if reply == -1:
            return False
        if not reply:
            return None
        values = cast(list[str], reply)
        return dict(zip(values[::2], values[1::2], strict=True))

    async def terminate(
        self,
        task_id: str,
        state: str,
        payload: Mapping[str, object],
        retention_s: int,
        tombstone: bool = False,
    ) -> tuple[str, str]:
        """Write a terminal ``error`` event unless the task already ended.

        Returns ``(previous_state, manager)``; ``('', '')`` for an unknown task (which, with
        ``tombstone``, is remembered as ended for its pending creation).
        """
        prev, manager = await self._terminate(
            keys=[self.keys.task(task_id), self.keys.events(task_id)],
            args=[
                retention_s,
                state,
                json.dumps(payload, separators=(",", ":")),
                self.keys.channel(),
                task_id,
                "1" if tombstone else "0",
            ],
        )
        return str(prev), str(manager)

    async def task(self, task_id: str) -> dict[str, str]:
        return cast(dict[str, str], await self.client.hgetall(self.keys.task(task_id)))

    async def task_field(self, task_id: str, name: str) -> str | None:
        value = await self.client.hget(self.keys.task(task_id), name)
        return None if value is None else str(value)

    async def set_fields(self, task_id: str, fields: Mapping[str, str]) -> None:
        await self.client.hset(self.keys.task(task_id), mapping=cast(Any, dict(fields)))

    async def task_exists(self, task_id: str) -> bool:
        return bool(await self.client.exists(self.keys.task(task_id)))

    async def read_events(self, task_id: str, after_seq: int, count: int = READ_PAGE) -> list[Event]:
        """Events with seq > ``after_seq`` that are in the log now (no waiting)."""
        entries = cast(
            list[tuple[str, dict[str, str]]],
            await self.client.xrange(self.keys.events(task_id), min=f"(0-{after_seq + 1}", count=count),
        )
        return [_event(entry_id, body) for entry_id, body in entries]

    @asynccontextmanager
    async def subscribe_events(self) -> AsyncIterator[PubSub]:
        """A pub/sub connection on the live-events channel (see the module docstring)."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(self.keys.channel())
        try:
            yield pubsub
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    # -- queues and leases ---------------------------------------------------------------------------

    def _queue_keys(self, rs: str) -> list[str]:
        k = self.keys
        return [
            k.queue(rs, "interactive"),
            k.queue(rs, "batch"),
            k.queue_seq(rs),
            k.queue_admitted(rs),
            k.queue_deadlines(rs),
            k.lease(rs),
        ]

    async def enqueue(
        self, rs: str, task_id: str, priority: Priority, limits: QueueLimits, deadline_at_ms: int
    ) -> Enqueued:
        """Capacity check, drop-lru eviction and enqueue in one step (see lua.ENQUEUE)."""
        if rs not in self._known_sets:
            await self.client.sadd(self.keys.replica_sets(), rs)
            self._known_sets.add(rs)
        class_cap = limits.batch_capacity if priority == "batch" else limits.interactive_capacity
        pos, ni, nb, evicted = await self._enqueue(
            keys=self._queue_keys(rs),
            args=[task_id, priority, limits.capacity, class_cap, limits.policy, now_ms(), deadline_at_ms],
        )
        return Enqueued(int(pos), int(ni), int(nb), str(evicted))

    async def claim(self, rs: str, lease_ms: int, limit: int = 1, max_batch_wait_ms: int = 0) -> list[Claim]:
        """Pop up to ``limit`` tasks in dispatch order and lease them, in one step."""
        now = now_ms()
        reply = cast(
            list[str],
            await self._claim(
                keys=self._queue_keys(rs), args=[now + lease_ms, limit, max_batch_wait_ms, now]
            ),
        )
        return [
            Claim(
                reply[i],
                float(reply[i + 1]),
                "batch" if reply[i + 2] == "batch" else "interactive",
                float(reply[i + 3]),
                float(reply[i + 4]),
            )
            for i in range(0, len(reply), 5)
        ]

    async def requeue_head(self, rs: str, claim: Claim) -> None:
        """Put a claimed task back where it was (its admission sequence) and drop its lease."""
        await self._requeue(
            keys=self._queue_keys(rs),
            args=[claim.task_id, claim.priority, claim.score, claim.admitted_ms, claim.deadline_at_ms],
        )

    async def dequeue(self, rs: str, task_id: str) -> bool:
        """Remove a queued task; True if it was still queued."""
        return bool(await self._dequeue(keys=self._queue_keys(rs), args=[task_id]))

    async def queue_position(self, rs: str, task_id: str, priority: Priority) -> int | None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrank(self.keys.queue(rs, priority), task_id)
            pipe.zcard(self.keys.queue(rs, "interactive"))
            rank, n_interactive = await pipe.execute()
        if rank is None:
            return None
        return int(rank) + (int(n_interactive) if priority == "batch" else 0)

    async def queue_depths(self, rs: str) -> tuple[int, int]:
        async with self.client.pipeline(transaction=False) as pipe:
            for priority in PRIORITIES:
                pipe.zcard(self.keys.queue(rs, priority))
            ni, nb = await pipe.execute()
        return int(ni), int(nb)

    async def queued(self, rs: str) -> tuple[list[str], list[str], list[tuple[str, float]]]:
        """(interactive ids, batch ids, (id, admitted_ms) of batch) in queue order, for estimates."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zrange(self.keys.queue(rs, "interactive"), 0, -1)
            pipe.zrange(self.keys.queue(rs, "batch"), 0, -1)
            pipe.zrange(self.keys.queue_admitted(rs), 0, -1, withscores=True)
            interactive, batch, admitted = await pipe.execute()
        return list(interactive), list(batch), [(str(t), float(s)) for t, s in admitted]

    async def overdue_queued(self, rs: str) -> list[str]:
        """Queued tasks whose deadline has passed."""
        return cast(
            list[str], await self.client.zrangebyscore(self.keys.queue_deadlines(rs), "-inf", now_ms())
        )

    async def renew_leases(self, leases: Mapping[str, Sequence[str]], lease_ms: int) -> None:
        """Extend the leases of running tasks, ``{rs: [task_id, ...]}`` (only existing leases)."""
        expiry = now_ms() + lease_ms
        pipe: Pipeline
        async with self.client.pipeline(transaction=False) as pipe:
            for rs, task_ids in leases.items():
                if task_ids:
                    pipe.zadd(self.keys.lease(rs), dict.fromkeys(task_ids, expiry), xx=True)
            await pipe.execute()

    async def release_lease(self, rs: str, task_id: str) -> None:
        await self.client.zrem(self.keys.lease(rs), task_id)

    # -- sessions ----------------------------------------------------------------------------------

    async def session_admit(
        self,
        session_id: str,
        model_ref: str,
        task_id: str,
        reserve: tuple[int, int],
        initial: tuple[int | None, int | None, int | None],
        ttl_ms: int,
        max_turns: int,
    ) -> SessionBudgets | tuple[str, str]:
        """Count the turn and reserve (tokens, cost) atomically, creating the session on first use.
        Returns the budgets after the reservation, or (refusal, detail) with refusal one of
        model | turns | tokens | cost | time_ms."""
        initial_args = ["" if value is None else str(value) for value in initial]
        reply = await self._session_admit(
            keys=[self.keys.session(session_id)],
            args=[model_ref, ttl_ms, max_turns, now_ms(), task_id, reserve[0], reserve[1], *initial_args],
        )
        if reply[0] != "ok":
            return str(reply[0]), str(reply[1])
        return SessionBudgets(int(reply[1]), _opt_int(reply[2]), _opt_int(reply[3]), _opt_int(reply[4]))

    async def session_settle(
        self,
        session_id: str,
        task_id: str,
        used: tuple[int, int],
        time_ms: int,
        ttl_ms: int,
        undo: bool = False,
    ) -> bool:
        return bool(
            await self._session_settle(
                keys=[self.keys.session(session_id)],
                args=[task_id, used[0], used[1], time_ms, ttl_ms, "1" if undo else "0"],
            )
        )

    async def session(self, session_id: str) -> tuple[dict[str, str], int]:
        """(fields, ms to live); ({}, -2) when unknown or expired."""
        key = self.keys.session(session_id)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(key)
            pipe.pttl(key)
            fields, ttl = await pipe.execute()
        return dict(fields), int(ttl)

    async def session_set(self, session_id: str, fields: Mapping[str, str]) -> dict[str, str]:
        """Set fields of a live session; returns all its fields after ({} when it is gone)."""
        flat = [v for kv in fields.items() for v in kv]
        pairs = await self._session_set(keys=[self.keys.session(session_id)], args=flat)
        return dict(zip(pairs[::2], pairs[1::2], strict=True))

    async def session_delete(self, session_id: str) -> dict[str, str]:
        """Delete the session; returns what it held ({} when unknown)."""
        key = self.keys.session(session_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(key)
            pipe.delete(key)
            fields, _ = await pipe.execute()
        return dict(fields)

    async def expired_leases(self) -> list[tuple[str, str]]:
        """``(rs, task_id)`` of every lease past its expiry."""
        sets = cast(set[str], await self.client.smembers(self.keys.replica_sets()))
        now = now_ms()
        expired: list[tuple[str, str]] = []
        for rs in sorted(sets):
            ids = cast(list[str], await self.client.zrangebyscore(self.keys.lease(rs), "-inf", now))
            expired.extend((rs, task_id) for task_id in ids)
        return expired

    async def leased(self, rs: str) -> list[str]:
        return cast(list[str], await self.client.zrange(self.keys.lease(rs), 0, -1))


@dataclass(frozen=True, slots=True)
class SessionBudgets:
    """A session's turn count and remaining budgets after an admission (None: unlimited)."""

    turns: int
    tokens: int | None
    time_ms: int | None
    cost_micro: int | None


def _opt_int(value: object) -> int | None:
    return None if value is None or value is False else int(str(value))


def _event(entry_id: str, body: Mapping[str, str]) -> Event:
    return Event(int(entry_id.split("-", 1)[1]) - 1, body["e"], body["d"])
