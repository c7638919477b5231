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

Priority = Literal["interactive", "batch"]
PRIORITIES: Final[tuple[Priority, Priority]] = ("interactive", "batch")
TERMINAL_EVENTS: Final = frozenset({"end", "error"})
READ_PAGE: Final = 512
"""Most events one log read returns."""

US: Final = "\x1f"

# ARGV: retention_s, n_fields, field pairs..., then (name, data, terminal_state) triples, then
# channel and task_id. Returns the new last seq, -1 if already terminal, -2 if unknown.
_APPEND: Final = """
local t = redis.call('HMGET', KEYS[1], 'terminal', 'seq')
if not t[1] then return -2 end
if t[1] == '1' then return -1 end
local seq = tonumber(t[2])
local first = seq + 1
local nf = tonumber(ARGV[2])
if nf > 0 then redis.call('HSET', KEYS[1], unpack(ARGV, 3, 2 + 2 * nf)) end
local last = #ARGV - 2
local msg = {ARGV[#ARGV], first}
local i = 3 + 2 * nf
local ended = false
while i <= last and not ended do
  seq = seq + 1
  redis.call('XADD', KEYS[2], '0-' .. (seq + 1), 'e', ARGV[i], 'd', ARGV[i + 1])
  msg[#msg + 1] = ARGV[i]
  msg[#msg + 1] = ARGV[i + 1]
  ended = ARGV[i + 2] ~= ''
  if ended then
    redis.call('HSET', KEYS[1], 'terminal', '1', 'state', ARGV[i + 2])
    redis.call('EXPIRE', KEYS[1], ARGV[1])
    redis.call('EXPIRE', KEYS[2], ARGV[1])
  end
  i = i + 3
end
redis.call('HSET', KEYS[1], 'seq', seq)
if seq >= first then redis.call('PUBLISH', ARGV[#ARGV - 1], table.concat(msg, '\\31')) end
return seq
"""

# Claim the queued task for dispatch unless it ended meanwhile ({}) or its `started` event has not
# landed yet (-1); returns the record (KEYS: task).
_MARK_RUNNING: Final = """
local t = redis.call('HMGET', KEYS[1], 'terminal', 'seq')
if t[1] ~= '0' then return {} end
if t[2] == '-1' then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV))
return redis.call('HGETALL', KEYS[1])
"""

# Terminal error written by a non-engine writer (cancel, sweeper): the payload's tokens_out comes from
# the record inside the script, so it can never disagree with the tokens already in the log.
# Returns {previous_state, pool_manager} or {'', ''} when unknown; previous_state is the terminal state
# when the task had already ended (nothing written then).
_TERMINATE: Final = """
local t = redis.call('HMGET', KEYS[1], 'terminal', 'seq', 'state', 'tokens_out', 'manager')
if not t[1] then return {'', ''} end
if t[1] == '1' then return {t[3], t[5] or ''} end
local payload = cjson.decode(ARGV[3])
payload['tokens_out'] = tonumber(t[4] or '0')
local data = cjson.encode(payload)
local seq = tonumber(t[2]) + 1
redis.call('XADD', KEYS[2], '0-' .. (seq + 1), 'e', 'error', 'd', data)
redis.call('HSET', KEYS[1], 'terminal', '1', 'state', ARGV[2], 'seq', seq, 'error', data)
redis.call('EXPIRE', KEYS[1], ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[4], table.concat({ARGV[5], seq, 'error', data}, '\\31'))
return {t[3], t[5] or ''}
"""

_CREATE: Final = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'terminal', '0', 'seq', '-1', 'tokens_out', '0', unpack(ARGV, 2))
redis.call('EXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: q interactive, q batch, qseq. ARGV: task_id, priority, capacity, class capacity.
# Returns {position, depth_interactive, depth_batch}; position -1 when full.
_ENQUEUE: Final = """
local ni = redis.call('ZCARD', KEYS[1])
local nb = redis.call('ZCARD', KEYS[2])
local cap = tonumber(ARGV[3])
local mine = ni
if ARGV[2] == 'batch' then mine = nb end
if ni + nb >= cap or mine >= tonumber(ARGV[4]) then return {-1, ni, nb} end
local seq = redis.call('INCR', KEYS[3])
if ARGV[2] == 'batch' then
  redis.call('ZADD', KEYS[2], seq, ARGV[1])
  return {ni + nb, ni, nb + 1}
end
redis.call('ZADD', KEYS[1], seq, ARGV[1])
return {ni, ni + 1, nb}
"""

# KEYS: q interactive, q batch, lease. ARGV: lease expiry (epoch ms), at most n. Strict priority, FIFO
# per class. Returns flat {task_id, score, priority, ...}.
_CLAIM: Final = """
local out = {}
for _ = 1, tonumber(ARGV[2]) do
  local r = redis.call('ZPOPMIN', KEYS[1])
  local prio = 'interactive'
  if #r == 0 then
    r = redis.call('ZPOPMIN', KEYS[2])
    prio = 'batch'
  end
  if #r == 0 then break end
  redis.call('ZADD', KEYS[3], ARGV[1], r[1])
  out[#out + 1] = r[1]
  out[#out + 1] = r[2]
  out[#out + 1] = prio
end
return out
"""


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

    def replica_sets(self) -> str:
        return f"{self.prefix}replicasets"

    def channel(self) -> str:
        return f"{self.prefix}events"


class Store:
    """Task records, event logs, queues and leases. Construct with :meth:`connect`."""

    def __init__(self, client: aioredis.Redis, prefix: str = "llorch:") -> None:
        self.client = client
        self.keys = Keys(prefix)
        self._append = client.register_script(_APPEND)
        self._terminate = client.register_script(_TERMINATE)
        self._create = client.register_script(_CREATE)
        self._enqueue = client.register_script(_ENQUEUE)
        self._claim = client.register_script(_CLAIM)
        self._mark_running = client.register_script(_MARK_RUNNING)
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

    async def create_task(self, task_id: str, fields: Mapping[str, str], ttl_s: int) -> bool:
        """Create the record unless the id is still known; False means TASK_EXISTS."""
        flat = [v for kv in fields.items() for v in kv]
        return bool(await self._create(keys=[self.keys.task(task_id)], args=[ttl_s, *flat]))

    async def delete_task(self, task_id: str) -> None:
        await self.client.delete(self.keys.task(task_id), self.keys.events(task_id))

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
        self, task_id: str, state: str, payload: Mapping[str, object], retention_s: int
    ) -> tuple[str, str]:
        """Write a terminal ``error`` event unless the task already ended.

        Returns ``(previous_state, manager)``; ``('', '')`` for an unknown task.
        """
        prev, manager = await self._terminate(
            keys=[self.keys.task(task_id), self.keys.events(task_id)],
            args=[
                retention_s,
                state,
                json.dumps(payload, separators=(",", ":")),
                self.keys.channel(),
                task_id,
            ],
        )
        return str(prev), str(manager)

    async def task(self, task_id: str) -> dict[str, str]:
        return cast(dict[str, str], await self.client.hgetall(self.keys.task(task_id)))

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

    async def enqueue(
        self, rs: str, task_id: str, priority: Priority, capacity: int, class_capacity: int
    ) -> tuple[int, int, int]:
        """Atomic capacity check + enqueue. Returns (position or -1 when full, depth_i, depth_b)."""
        if rs not in self._known_sets:
            await self.client.sadd(self.keys.replica_sets(), rs)
            self._known_sets.add(rs)
        pos, ni, nb = await self._enqueue(
            keys=[self.keys.queue(rs, "interactive"), self.keys.queue(rs, "batch"), self.keys.queue_seq(rs)],
            args=[task_id, priority, capacity, class_capacity],
        )
        return int(pos), int(ni), int(nb)

    async def claim(self, rs: str, lease_ms: int, limit: int = 1) -> list[Claim]:
        """Pop up to ``limit`` tasks (strict priority, FIFO per class) and lease them, in one step."""
        reply = cast(
            list[str],
            await self._claim(
                keys=[self.keys.queue(rs, "interactive"), self.keys.queue(rs, "batch"), self.keys.lease(rs)],
                args=[now_ms() + lease_ms, limit],
            ),
        )
        return [
            Claim(str(reply[i]), float(reply[i + 1]), "batch" if reply[i + 2] == "batch" else "interactive")
            for i in range(0, len(reply), 3)
        ]

    async def requeue_head(self, rs: str, claim: Claim) -> None:
        """Put a claimed task back where it was (its original admission sequence) and drop its lease."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.zadd(self.keys.queue(rs, claim.priority), {claim.task_id: claim.score})
            pipe.zrem(self.keys.lease(rs), claim.task_id)
            await pipe.execute()

    async def dequeue(self, rs: str, task_id: str) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            for priority in PRIORITIES:
                pipe.zrem(self.keys.queue(rs, priority), task_id)
            await pipe.execute()

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


def _event(entry_id: str, body: Mapping[str, str]) -> Event:
    return Event(int(entry_id.split("-", 1)[1]) - 1, body["e"], body["d"])
