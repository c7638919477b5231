"""Redis: the only module that builds key strings or talks to Redis.

Keys (prefix ``llorch:``; the part in braces is the Redis Cluster hash tag, so every multi-key step
touches one slot):

- ``task:{rs}:id`` hash — the task record (state, request, placement, ``seq`` of the last event,
  ``terminal``), in its replica set's slot
- ``ev:{rs}:id``  stream — the task's event log (SSE ``id:`` = seq). An entry's id is ``0-(first+1)``,
  ``first`` the seq of its first event; it holds one event ``{e: name, d: data}`` (admission's
  `started`, a terminate's `error`, a queued frame) or, as APPEND writes them, ``{n, b}``: n ≥ 1
  consecutive events of one flush, at most :data:`ENTRY_MAX`, ``b`` = ``name US data US name US
  data ...`` (the bytes the live message carries for them). Readers expand entries into events.
- ``tid:{id}``    string — the replica set a task id lives in (its locator)
- ``q:{rs}:interactive`` / ``q:{rs}:batch`` — sorted sets scored by the set's admission sequence
- ``qseq:{rs}``   the set's admission sequence counter
- ``lease:{rs}``  sorted set of dispatched task ids scored by lease expiry (epoch ms)
- ``recent``      sorted set ``rs US task_id`` scored by admission (epoch µs), the newest
  :data:`RECENT_TASKS_MAX`: the status views' list of tasks (a member whose record expired is dropped
  when a read meets it)
- ``failures``    sorted set of failed tasks (compact JSON: task_id, code, message) scored by when they
  failed, the newest :data:`RECENT_FAILURES_MAX`

Every multi-step change is one Lua script (registered once), so cancel is race-free by construction:
once a terminal event is in the log, ``append`` refuses every later event.

Task records live in their replica set's slot, so admission (record, `started`, queue entry) is one
script even on a Redis Cluster; the locator ``tid:{id}`` names that set for lookups by id. It is written
before the admission step (a crash in between leaves a locator to nothing, which the next admission of
that id takes over) and lives as long as the task can (its deadline plus the retention). Lookups are
cached for :data:`LOCATE_CACHE_S` (an id is reused only after its record expired).

Live delivery: every script that appends also PUBLISHes the appended events, one message per call, on
the ``events`` channel: ``task_id US first_seq (US name US data)*`` with US = \x1f (JSON never carries
a raw control character); an APPEND for several tasks joins their parts with RS = \x1e.
The stream stays the source of truth; a reader that sees a gap in the seqs
fills it from the stream, so a lost message costs a read, never an event.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Final, Literal, NamedTuple, cast

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, ResponseError

from llorch import lua
from llorch.respwire import Wire, pack_in_c

Priority = Literal["interactive", "batch"]
PRIORITIES: Final[tuple[Priority, Priority]] = ("interactive", "batch")
READ_PAGE: Final = 512
"""Most events one log read returns."""
ENTRY_MAX: Final = 64
"""Most events one log entry holds: one argument and one XADD per up to this many events keep an
append's cost per token low, and the bound keeps each entry (and a read of it) small."""

US: Final = "\x1f"
RS: Final = "\x1e"
"""Separates the tasks' parts of one live-events message (see the module docstring)."""
APPEND_CALL_MAX: Final = 256
"""Tasks per APPEND call: bounds one script's run (and its message) after an outage let events pile up."""
SOCKET_TIMEOUT_S: Final = 10.0
"""The longest one Redis call may take before it fails (and is retried) rather than hang."""
HEALTH_CHECK_S: Final = 15
"""An idle pooled connection is checked (PING) before reuse after this long: a Redis restart costs no
failed call on a stale connection."""
LOCATE_CACHE_S: Final = 10.0
"""How long a task id's replica set is remembered in-process."""
LOCATE_CACHE_MAX: Final = 65_536
LOCATOR_MARGIN_S: Final = 300
"""A locator outlives its task's deadline plus the retention by this much."""
LEASE_MS: Final = 15_000
"""How long a dispatched task's lease lasts; its pool manager renews it well before that."""
RECENT_TASKS_MAX: Final = 1000
"""How many of the newest admissions the recent-tasks index keeps."""
RECENT_FAILURES_MAX: Final = 100
"""How many of the newest failures the recent-failures index keeps."""
FAILURE_MESSAGE_MAX: Final = 500
"""A failure's message is cut to this many characters in the index (the record keeps it whole)."""
_SUMMARY_FIELDS: Final = (
    "state",
    "priority",
    "model_ref",
    "created_ms",
    "tokens_out",
    "pool_id",
    "replica_id",
    "dispatched_ms",
    "error",
)
"""The record fields a :class:`TaskSummary` reads: never ``request`` (it holds the prompt)."""


def now_ms() -> int:
    return int(time.time() * 1000)


class TaskState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


LIVE_STATES: Final = frozenset({TaskState.QUEUED, TaskState.RUNNING})


@dataclass(frozen=True, slots=True)
class TaskRequest:
    """What the engine is asked to do, fixed at admission."""

    prompt: str
    max_tokens: int
    seed: int
    determinism: str
    kv_cold: bool = False
    prompt_est: int = 0  # SPEC §2.2's estimate of the prompt's tokens, for settling a session
    workload: str = "completion"
    body: str = ""  # the client's OpenAI fields for the engine, as JSON (AdmitRequest.body_json)
    inputs: tuple[str, ...] = ()  # workload "embedding": the texts


@dataclass(frozen=True, slots=True)
class NewTask:
    """A task as admission writes it."""

    task_id: str
    rs: str
    priority: Priority
    model_ref: str
    session_id: str
    engine: str
    deadline_ms: int
    request: TaskRequest
    traceparent: str = ""  # the admitting span's W3C trace context: the dispatch joins its trace


@dataclass(frozen=True, slots=True)
class Placement:
    manager: str
    pool_id: str
    replica_id: str


@dataclass(frozen=True, slots=True)
class TaskRecord:
    """The task record (``task:{id}``); placement fields are empty until dispatch."""

    task_id: str
    state: TaskState
    rs: str
    priority: Priority
    model_ref: str
    session_id: str
    engine: str
    created_ms: int
    deadline_ms: int
    request: TaskRequest
    tokens_out: int
    manager: str
    pool_id: str
    replica_id: str
    dispatched_ms: int  # 0 until dispatched
    error_json: str
    traceparent: str = ""  # '' when tracing was off at admission

    @property
    def live(self) -> bool:
        return self.state in LIVE_STATES


@dataclass(frozen=True, slots=True)
class TaskSummary:
    """A task as the status views show it: its record without the request (so never its prompt).
    ``error_code`` is the terminal error's code, None unless the task ended with one."""

    task_id: str
    state: TaskState
    priority: Priority
    model_ref: str
    created_ms: int
    tokens_out: int
    pool_id: str
    replica_id: str
    dispatched_ms: int
    error_code: str | None


@dataclass(frozen=True, slots=True)
class TaskFailure:
    """One entry of the recent-failures index: a task that ended ``failed``, and when."""

    task_id: str
    code: str
    message: str
    at_ms: int


@dataclass(frozen=True, slots=True)
class Terminated:
    """What :meth:`Store.terminate` found: the state before (None: unknown task) and its manager."""

    previous: TaskState | None
    manager: str

    @property
    def was_live(self) -> bool:
        return self.previous in LIVE_STATES


@dataclass(frozen=True, slots=True)
class SessionRecord:
    """A session (``sess:{id}``): its model, turns, remaining budgets (None: unlimited), the replica it
    last ran on with that engine's pid (its KV affinity), and the tokens its cache holds."""

    session_id: str
    model_ref: str
    created_ms: int
    turns: int
    max_turns: int
    budgets: SessionBudgets
    replica_id: str
    replica_pid: int
    tokens_held: int
    ttl_ms: int


class Event(NamedTuple):
    """One event of a task's log: SSE ``id:`` = ``seq``. A named tuple: the gateway builds one per
    relayed event, at a fraction of a frozen dataclass's cost."""

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


class AdmitStatus(StrEnum):
    OK = "ok"
    EXISTS = "exists"  # the task id is still known
    FULL = "full"  # the queue (or the class cap) refused it


@dataclass(frozen=True, slots=True)
class Admitted:
    status: AdmitStatus
    position: int  # -1 unless ok
    depth_interactive: int
    depth_batch: int
    evicted: str  # the batch task displaced under drop-lru, or ''

    @property
    def depth(self) -> int:
        return self.depth_interactive + self.depth_batch


@dataclass(frozen=True, slots=True)
class Append:
    """Events for one task's log: ``(name, data_json, terminal_state)`` with terminal_state '' for a
    non-terminal event, else the task's final state (an `error` event's payload is kept as the
    record's error). ``tokens_out`` updates the record's count; ``batch_id``, when set, makes a retry of
    the same batch after a lost reply a no-op."""

    task_id: str
    events: Sequence[tuple[str, str, str]]
    tokens_out: int | None = None
    batch_id: str = ""


class Refused(StrEnum):
    """Why :meth:`Store.append` wrote nothing."""

    ENDED = "ended"  # a terminal event stood first
    UNKNOWN = "unknown"  # no such task (expired or never admitted)


class Keys:
    """The one key builder."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def task(self, rs: str, task_id: str) -> str:
        return f"{self.prefix}task:{{{rs}}}:{task_id}"

    def events(self, rs: str, task_id: str) -> str:
        return f"{self.prefix}ev:{{{rs}}}:{task_id}"

    def locator(self, task_id: str) -> str:
        return f"{self.prefix}tid:{{{task_id}}}"

    def queue(self, rs: str, priority: Priority) -> str:
        return f"{self.prefix}q:{{{rs}}}:{priority}"

    def queue_seq(self, rs: str) -> str:
        return f"{self.prefix}qseq:{{{rs}}}"

    def lease(self, rs: str) -> str:
        return f"{self.prefix}lease:{{{rs}}}"

    def evicted(self, rs: str) -> str:
        return f"{self.prefix}evicted:{{{rs}}}"

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

    def recent_tasks(self) -> str:
        return f"{self.prefix}recent"

    def recent_failures(self) -> str:
        return f"{self.prefix}failures"


class _Pipelined:
    """One Lua script's calls, sharing round trips: a call made while another is in flight waits, and
    every call that waited goes out as one pipeline when that round trip ends (one write and one read
    for them all). Each call stays one atomic script, and they run in the order they were made.
    Single Redis only: a cluster's pipelines refuse scripts."""

    def __init__(self, script: _Script) -> None:
        self.script = script
        self._busy = False
        self._waiting: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def __call__(self, keys: Sequence[str], args: Sequence[Any]) -> Any:
        call = (len(keys), *keys, *args)
        if self._busy:
            future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
            self._waiting.append((call, future))
            return await future
        self._busy = True
        try:
            return await self._send(call)
        finally:
            self._next()

    def _next(self) -> None:
        if not self._waiting:
            self._busy = False
            return
        batch, self._waiting = self._waiting, []
        self._sender = asyncio.create_task(self._send_batch(batch))

    async def _send_batch(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            results = await self._pipeline([call for call, _ in batch])
        except Exception as exc:  # the connection failed: every call of the batch fails, as alone
            results = [exc] * len(batch)
        except BaseException:  # cancelled (shutdown): its callers must not wait forever
            for _, future in batch:
                future.cancel()
            raise
        finally:
            self._next()
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # its caller gave up (cancelled); the script ran or runs regardless
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _send(self, call: tuple[Any, ...]) -> Any:
        return await self.script.call(call)

    async def _pipeline(self, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        return await self.script.calls(calls)


class _Script:
    """One Lua script, run by its SHA1 (EVALSHA): over the store's own :class:`Wire` where it has one
    (a single Redis over TCP or a Unix socket), else through redis-py. Calls that Redis answers
    NOSCRIPT (it restarted and forgot the script) did not run: the script is loaded and they alone
    are sent again, in their order. Not redis-py's Script, which sends a SCRIPT EXISTS round trip
    before every pipeline."""

    def __init__(self, client: Any, wire: Wire | None, source: str) -> None:
        self.client = client
        self.wire = wire
        self.cluster = isinstance(client, RedisCluster)
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, keys: Sequence[str] = (), args: Sequence[Any] = ()) -> Any:
        return await self.call((len(keys), *keys, *args))

    async def call(self, call: tuple[Any, ...]) -> Any:
        """One call (``numkeys, *keys, *args``): its reply, or its error raised."""
        [reply] = await self.calls([call])
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def calls(self, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Many calls in one round trip: their replies in order, a call's own error (not a lost
        connection, which raises) as its reply. On a cluster, whose pipelines refuse scripts, the
        calls go concurrently."""
        results = await self._send(calls)
        missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
        if missing:
            try:
                self.sha = await self.client.script_load(self.source)
                again = await self._send([calls[i] for i in missing])
            except Exception as exc:  # the others ran: only the missing ones fail
                again = [exc] * len(missing)
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _send(self, calls: Sequence[tuple[Any, ...]]) -> list[Any]:
        if self.wire is not None:
            return await self.wire.execute([("EVALSHA", self.sha, *call) for call in calls])
        if self.cluster or len(calls) == 1:  # one command costs less than redis-py's pipeline
            return list(await asyncio.gather(*(self._one(call) for call in calls)))
        async with self.client.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(self.sha, *call)
            results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    async def _one(self, call: tuple[Any, ...]) -> Any:
        try:
            return await self.client.evalsha(self.sha, *call)
        except ResponseError as exc:  # the call's own error, as a pipeline answers it
            return exc


class Store:
    """Task records, event logs, queues and leases. Construct with :meth:`connect`."""

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        prefix: str = "llorch:",
        subscriber: aioredis.Redis | None = None,
    ) -> None:
        """``subscriber``: the client for the live-events subscription (no read timeout: it waits for
        messages; on a cluster, any one node: PUBLISH reaches every node); ``client`` by default."""
        self.client: Any = client
        self.cluster = isinstance(client, RedisCluster)
        self._subscriber: Any = subscriber or client
        self.keys = Keys(prefix)
        self.wire = Wire.of(client, SOCKET_TIMEOUT_S)
        self._located: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._append = _Script(client, self.wire, lua.APPEND)
        self._terminate = _Script(client, self.wire, lua.TERMINATE)
        self._admit = _Script(client, self.wire, lua.ADMIT)
        self._admit_calls = _Pipelined(self._admit)
        self._claim = _Script(client, self.wire, lua.CLAIM)
        self._requeue = _Script(client, self.wire, lua.REQUEUE)
        self._queued_frame = _Script(client, self.wire, lua.QUEUED_FRAME)
        self._dequeue = _Script(client, self.wire, lua.DEQUEUE)
        self._mark_running = _Script(client, self.wire, lua.MARK_RUNNING)
        self._mark_running_calls = _Pipelined(self._mark_running)
        self._session_admit = _Script(client, self.wire, lua.SESSION_ADMIT)
        self._session_settle = _Script(client, self.wire, lua.SESSION_SETTLE)
        self._session_set = _Script(client, self.wire, lua.SESSION_SET)
        self._session_delete = _Script(client, self.wire, lua.SESSION_DELETE)
        self._known_sets: set[str] = set()

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        url: str,
        prefix: str = "llorch:",
        password: str | None = None,
        max_connections: int = 1024,
        cluster: bool = False,
        username: str | None = None,
        ssl_ca_certs: str | None = None,
    ) -> AsyncIterator[Store]:
        """``cluster``: ``url`` names one node of a Redis Cluster (the client discovers the others).
        ``username``/``password``: AUTH (an ACL user, or the default user); ``ssl_ca_certs``: the roots
        that signed a ``rediss://`` server's certificate (null: the system's)."""
        common: dict[str, Any] = {
            "username": username,
            "password": password,
            "decode_responses": True,
            "socket_connect_timeout": SOCKET_TIMEOUT_S,
            "health_check_interval": HEALTH_CHECK_S,
        }
        if not url.startswith("unix:"):  # TCP keepalive: a Unix socket's connection class refuses it
            common["socket_keepalive"] = True
        if ssl_ca_certs is not None:  # a plain connection class refuses ssl_* keywords
            common["ssl_ca_certs"] = ssl_ca_certs
        # A frozen Redis fails a call after SOCKET_TIMEOUT_S (a retriable error) instead of hanging it.
        client: aioredis.Redis | RedisCluster
        if cluster:
            client = RedisCluster.from_url(
                url, max_connections=max_connections, socket_timeout=SOCKET_TIMEOUT_S, **common
            )
        else:
            client = aioredis.Redis.from_url(
                url, max_connections=max_connections, socket_timeout=SOCKET_TIMEOUT_S, **common
            )
        subscriber = aioredis.Redis.from_url(url, max_connections=8, **common)
        pack_in_c(client)
        pack_in_c(subscriber)
        store = cls(client, prefix, subscriber)
        try:
            yield store
        finally:
            if store.wire is not None:
                await store.wire.aclose()
            await client.aclose()
            await subscriber.aclose()

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except aioredis.RedisError:
            return False

    # -- where a task lives ----------------------------------------------------------------------------

    def locate(self, task_id: str, rs: str) -> None:
        """Remember (in-process) that ``task_id`` lives in set ``rs``: a caller that knows it (the pool
        manager, from its dispatch) saves the lookup."""
        self._located[task_id] = (rs, time.monotonic() + LOCATE_CACHE_S)
        self._located.move_to_end(task_id)
        while len(self._located) > LOCATE_CACHE_MAX:
            self._located.popitem(last=False)

    async def _where(self, task_id: str) -> str | None:
        """The replica set of ``task_id``; None when the id is unknown."""
        cached = self._located.get(task_id)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        rs = cast(str | None, await self._one("GET", self.keys.locator(task_id)))
        if rs is not None:
            self.locate(task_id, rs)
        return rs

    async def _task_keys(self, task_id: str) -> list[str] | None:
        rs = await self._where(task_id)
        return None if rs is None else [self.keys.task(rs, task_id), self.keys.events(rs, task_id)]

    async def _claim_id(self, task_id: str, rs: str, ttl_s: int) -> bool:
        """Point the id's locator at ``rs``; False while the id belongs to a live record elsewhere.
        (A locator to a record that expired, or was never written, is taken over.)"""
        key = self.keys.locator(task_id)
        if await self.client.set(key, rs, nx=True, ex=ttl_s):
            return True
        held = cast(str | None, await self.client.get(key))
        if held is not None and held != rs and await self.client.exists(self.keys.task(held, task_id)):
            return False
        await self.client.set(key, rs, ex=ttl_s)
        return True

    async def _round_trip(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Plain commands (not scripts) in one round trip: their replies in order, each as redis-py's
        client parses it (a stream read as ``[(id, {field: value}), ...]``, a ``WITHSCORES`` range as
        ``[(member, score), ...]``, a hash as a dict); the first error reply is raised.

        Over the store's :class:`Wire` where it has one. These are the commands on every stream's path
        (its first read), every task's end (its lease), a session's reads (its admissions, dispatches
        and streams), status reads and the scheduler's periodic scans, and redis-py's pipeline costs
        about three times the CPU per round trip (see :mod:`llorch.respwire`). A cluster or TLS goes
        through redis-py's pipeline."""
        if self.wire is None:
            pipe: Pipeline
            async with self.client.pipeline(transaction=False) as pipe:
                for command in commands:
                    # the option redis-py's own zrange passes: it parses the scores into pairs
                    pipe.execute_command(
                        *command, **({"withscores": True} if command[-1] == "WITHSCORES" else {})
                    )
                results: list[Any] = await pipe.execute()
                return results
        replies = await self.wire.execute(commands)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return [_as_parsed(command, reply) for command, reply in zip(commands, replies, strict=True)]

    async def _one(self, *command: Any) -> Any:
        """One plain command's reply (see :meth:`_round_trip`)."""
        [reply] = await self._round_trip([command])
        return reply

    async def _many(self, script: _Script, calls: Sequence[tuple[list[str], list[Any]]]) -> list[Any]:
        """One script over many keys in one round trip (see :meth:`_Script.calls`); the first
        call's error is raised."""
        results = await script.calls([(len(k), *k, *a) for k, a in calls])
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results

    # -- task records and events -------------------------------------------------------------------

    async def admit(
        self,
        task: NewTask,
        limits: QueueLimits,
        deadline_at_ms: int,
        started: tuple[int, Sequence[str]],
        ttl_s: int,
        retention_s: int,
        minted_id: bool = False,
    ) -> Admitted:
        """Create the record with its `started` event and enqueue it, in one step (see lua.ADMIT).

        ``started`` is (first position, encoded `started` payloads for that position and the next
        ones): the queue position is known only inside the step, so admission offers a window.
        ``ttl_s`` bounds a record that never ends; ``retention_s`` is how long an ended one stays.
        ``minted_id``: the id is a fresh UUID4 that cannot be known yet, so its locator is written in
        the same round trip as the admission instead of being checked first.
        """
        if task.rs not in self._known_sets:
            await self.client.sadd(self.keys.replica_sets(), task.rs)
            self._known_sets.add(task.rs)
        locator_ttl_s = task.deadline_ms // 1000 + retention_s + LOCATOR_MARGIN_S
        if not minted_id and not await self._claim_id(task.task_id, task.rs, locator_ttl_s):
            return Admitted(AdmitStatus.EXISTS, -1, 0, 0, "")
        req = task.request
        fields = {
            "state": TaskState.QUEUED.value,
            "rs": task.rs,
            "priority": task.priority,
            "model_ref": task.model_ref,
            "session_id": task.session_id,
            "engine": task.engine,
            "created_ms": str(now_ms()),
            "deadline_ms": str(task.deadline_ms),
            "request": json.dumps(
                {
                    "prompt": req.prompt,
                    "max_tokens": req.max_tokens,
                    "seed": req.seed,
                    "determinism": req.determinism,
                    "kv_cold": req.kv_cold,
                    "prompt_est": req.prompt_est,
                    **({"workload": req.workload} if req.workload != "completion" else {}),
                    **({"body": req.body} if req.body else {}),
                    **({"inputs": list(req.inputs)} if req.inputs else {}),
                }
            ),
            **({"traceparent": task.traceparent} if task.traceparent else {}),
        }
        class_cap = limits.batch_capacity if task.priority == "batch" else limits.interactive_capacity
        first, payloads = started
        rs, task_id = task.rs, task.task_id
        keys = [self.keys.task(rs, task_id), self.keys.events(rs, task_id), *self._queue_keys(rs)]
        # On a single Redis the locator (of a minted id) and the recent-tasks index are written by the
        # script itself: one round trip per admission. A cluster keeps them apart (other slots).
        inline = not self.cluster
        if inline:
            keys += [self.keys.locator(task_id), self.keys.recent_tasks()]
        # Microseconds: admissions in one millisecond keep their order (2**53 µs is year 2255).
        index = (f"{rs}{US}{task_id}", time.time_ns() // 1000, RECENT_TASKS_MAX) if inline else ("", 0, 0)
        args = [
            ttl_s,
            task_id,
            task.priority,
            limits.capacity,
            class_cap,
            limits.policy,
            now_ms(),
            deadline_at_ms,
            first,
            len(payloads),
            locator_ttl_s if inline and minted_id else "",
            rs,
            *index,
            *payloads,
            *(v for kv in fields.items() for v in kv),
        ]
        if inline:
            status, pos, ni, nb, evicted = await self._admit_calls(keys, args)
        elif minted_id:  # both writes at once: concurrent calls on a cluster
            locator = self.client.set(self.keys.locator(task_id), rs, ex=locator_ttl_s)
            _, (status, pos, ni, nb, evicted) = await asyncio.gather(
                locator, self._admit(keys=keys, args=args)
            )
        else:
            status, pos, ni, nb, evicted = await self._admit(keys=keys, args=args)
        result = Admitted(AdmitStatus(status), int(pos), int(ni), int(nb), str(evicted))
        if result.status == AdmitStatus.OK:
            self.locate(task_id, rs)
            if not inline:
                await self._index_admitted(rs, task_id)
        elif result.status == AdmitStatus.FULL and not (inline and minted_id):
            await self.client.delete(self.keys.locator(task_id))  # nothing was admitted: the id is free
        return result

    async def append(self, batch: Append, retention_s: int = 900) -> int | Refused:
        """Append a task's events unless its log already ended (see :class:`Append`). Returns the seq
        of the last event in the log, or why nothing was written."""
        return (await self.append_many([batch], retention_s))[0]

    async def append_many(self, batches: Sequence[Append], retention_s: int) -> list[int | Refused]:
        """:meth:`append` for many tasks in one round trip; results in the order of ``batches``.

        One APPEND call (and so one PUBLISH) covers up to :data:`APPEND_CALL_MAX` tasks; on a cluster,
        the tasks of one replica set (one hash slot) share a call."""
        where = [await self._where(b.task_id) for b in batches]
        groups: dict[str, list[int]] = {}
        for i, rs in enumerate(where):
            if rs is not None:
                groups.setdefault(rs if self.cluster else "", []).append(i)
        calls: list[tuple[list[str], list[Any]]] = []
        chunks: list[list[int]] = []
        for members in groups.values():
            for start in range(0, len(members), APPEND_CALL_MAX):
                chunk = members[start : start + APPEND_CALL_MAX]
                keys: list[str] = []
                args: list[Any] = [retention_s, self.keys.channel()]
                for i in chunk:
                    task_id, rs = batches[i].task_id, cast(str, where[i])
                    keys += (self.keys.task(rs, task_id), self.keys.events(rs, task_id))
                    args += _append_segment(batches[i])
                calls.append((keys, args))
                chunks.append(chunk)
        results: list[int | Refused] = [Refused.UNKNOWN] * len(batches)
        for chunk, reply in zip(chunks, await self._many(self._append, calls), strict=True):
            for i, seq in zip(chunk, reply, strict=True):
                results[i] = _appended(seq)
        failed = [
            (b.task_id, data)
            for b, result in zip(batches, results, strict=True)
            if isinstance(result, int)
            for name, data, final in b.events
            if final == TaskState.FAILED.value and name == "error"
        ]
        if failed:
            await self._index_failures(failed)
        return results

    async def append_queued_frames(self, frames: Sequence[tuple[str, str]]) -> None:
        """Queued `metrics` frames ``(task_id, data)``, each only if its task is still queued."""
        calls = []
        for task_id, data in frames:
            keys = await self._task_keys(task_id)
            if keys:
                calls.append((keys, [data, self.keys.channel(), task_id]))
        await self._many(self._queued_frame, calls)

    def _append_args(
        self, batch: Append, retention_s: int, fields: Mapping[str, str] | None = None
    ) -> list[str | int]:
        """APPEND's arguments for one task's batch (``fields``: record fields to set with it)."""
        return [retention_s, self.keys.channel(), *_append_segment(batch, fields)]

    async def mark_running(self, task_id: str, placement: Placement) -> TaskRecord | None:
        """Record the placement and return the record; None if the task ended while it was claimed."""
        keys = await self._task_keys(task_id)
        if keys is None:
            return None
        mark = self._mark_running if self.cluster else self._mark_running_calls  # a burst's share one trip
        reply = await mark(
            keys=keys[:1],
            args=[
                "state",
                TaskState.RUNNING.value,
                "manager",
                placement.manager,
                "pool_id",
                placement.pool_id,
                "replica_id",
                placement.replica_id,
                "dispatched_ms",
                str(now_ms()),
            ],
        )
        if not reply:
            return None
        values = cast(list[str], reply)
        return _record(task_id, dict(zip(values[::2], values[1::2], strict=True)))

    async def requeued(self, task_id: str) -> None:
        """The task goes back to its queue (a retry or a refusal): its record says queued again."""
        keys = await self._task_keys(task_id)
        if keys is not None:
            args = self._append_args(Append(task_id, ()), 900, {"state": TaskState.QUEUED.value})
            await self._append(keys=keys, args=args)

    async def terminate(self, task_id: str, state: TaskState, payload: str, retention_s: int) -> Terminated:
        """Write the terminal ``error`` event (``payload``: see :func:`llorch.events.error`) unless the
        task already ended; the record's tokens_out replaces the payload's."""
        keys = await self._task_keys(task_id)
        if keys is None:
            return Terminated(None, "")
        prev, manager = await self._terminate(
            keys=keys, args=[retention_s, state.value, payload, self.keys.channel(), task_id]
        )
        ended = Terminated(TaskState(prev) if prev else None, str(manager))
        if ended.was_live and state == TaskState.FAILED:
            await self._index_failures([(task_id, payload)])
        return ended

    async def task(self, task_id: str) -> TaskRecord | None:
        keys = await self._task_keys(task_id)
        fields = cast(dict[str, str], await self._one("HGETALL", keys[0])) if keys else {}
        return _record(task_id, fields) if fields else None

    async def task_exists(self, task_id: str) -> bool:
        keys = await self._task_keys(task_id)
        return keys is not None and bool(await self._one("EXISTS", keys[0]))

    async def read_events(self, task_id: str, after_seq: int, count: int = READ_PAGE) -> list[Event]:
        """The first ``count`` events with seq > ``after_seq`` that are in the log now (no waiting), in
        order; fewer only when the log has no more."""
        return (await self._read_events(task_id, after_seq, count, session=False))[0]

    async def stream_start(self, task_id: str, after_seq: int) -> tuple[list[Event], str | None]:
        """An SSE stream's first read: :meth:`read_events`' first page and the task's session id (None
        for an unknown task or one without a session), in the same round trip."""
        return await self._read_events(task_id, after_seq, READ_PAGE, session=True)

    async def _read_events(
        self, task_id: str, after_seq: int, count: int, session: bool
    ) -> tuple[list[Event], str | None]:
        keys = await self._task_keys(task_id)
        if keys is None:
            return [], None
        # One round trip: the entry that starts at or before after_seq (it may hold later events too),
        # then up to ``count`` entries that start after it; each holds at least one event.
        after_seq = max(after_seq, -1)
        commands: list[tuple[Any, ...]] = [
            ("XREVRANGE", keys[1], f"0-{after_seq + 1}", "-", "COUNT", 1),
            ("XRANGE", keys[1], f"0-{after_seq + 2}", "+", "COUNT", count),
        ]
        if session:
            commands.append(("HGET", keys[0], "session_id"))
        straddling, following, *rest = await self._round_trip(commands)
        out: list[Event] = []
        for entry_id, body in [*straddling, *following]:
            out += _entry_events(entry_id, body, after_seq)
        return out[:count], (cast(str | None, rest[0]) or None) if rest else None

    async def last_event(self, task_id: str) -> Event | None:
        """The last event in the task's log, if any."""
        keys = await self._task_keys(task_id)
        if keys is None:
            return None
        entries = cast(
            list[tuple[str, dict[str, str]]], await self._one("XREVRANGE", keys[1], "+", "-", "COUNT", 1)
        )
        return _entry_events(*entries[0])[-1] if entries else None

    @asynccontextmanager
    async def follow_events(self, on_message: Callable[[str], None]) -> AsyncIterator[Awaitable[None]]:
        """Subscribed to the live-events channel (see the module docstring): each message's data goes
        to ``on_message``. Yields once subscribed; awaiting what it yields raises when the
        subscription ends (a store error when the connection is lost). A plain single Redis is
        followed over a :class:`Wire` of its own (messages handed over as they are read); a cluster
        or TLS through redis-py's pub/sub and a listener task."""
        channel = self.keys.channel()
        wire = Wire.of(self._subscriber, SOCKET_TIMEOUT_S)
        if wire is not None:
            try:
                yield await wire.subscribe(channel, on_message)
            finally:
                await wire.aclose()
            return
        pubsub = self._subscriber.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(channel)

        async def listen() -> None:
            async for message in pubsub.listen():
                on_message(message["data"])

        listener = asyncio.create_task(listen())
        try:
            yield listener
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
            await pubsub.aclose()

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
            k.evicted(rs),
        ]

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
        rank, n_interactive = await self._round_trip(
            [("ZRANK", self.keys.queue(rs, priority), task_id), ("ZCARD", self.keys.queue(rs, "interactive"))]
        )
        if rank is None:
            return None
        return int(rank) + (int(n_interactive) if priority == "batch" else 0)

    async def queue_depths(self, rs: str) -> tuple[int, int]:
        ni, nb = await self._round_trip([("ZCARD", self.keys.queue(rs, priority)) for priority in PRIORITIES])
        return int(ni), int(nb)

    async def queued(self, rs: str) -> tuple[list[str], list[str], list[tuple[str, float]]]:
        """(interactive ids, batch ids, (id, admitted_ms) of batch) in queue order, for estimates."""
        interactive, batch, admitted = await self._round_trip(
            [
                ("ZRANGE", self.keys.queue(rs, "interactive"), 0, -1),
                ("ZRANGE", self.keys.queue(rs, "batch"), 0, -1),
                ("ZRANGE", self.keys.queue_admitted(rs), 0, -1, "WITHSCORES"),
            ]
        )
        return list(interactive), list(batch), [(str(t), float(s)) for t, s in admitted]

    async def overdue_queued(self, rs: str) -> list[str]:
        """Queued tasks whose deadline has passed."""
        return cast(
            list[str], await self._one("ZRANGEBYSCORE", self.keys.queue_deadlines(rs), "-inf", now_ms())
        )

    async def renew_leases(self, leases: Mapping[str, Sequence[str]], lease_ms: int) -> None:
        """Extend the leases of running tasks, ``{rs: [task_id, ...]}`` (only existing leases)."""
        expiry = now_ms() + lease_ms
        await self._round_trip(
            [
                (
                    "ZADD",
                    self.keys.lease(rs),
                    "XX",
                    *(part for task_id in task_ids for part in (expiry, task_id)),
                )
                for rs, task_ids in leases.items()
                if task_ids
            ]
        )

    async def release_lease(self, rs: str, task_id: str) -> None:
        await self.release_leases([(rs, task_id)])

    async def release_leases(self, leases: Sequence[tuple[str, str]]) -> None:
        """Release many ``(rs, task_id)`` leases in one round trip."""
        await self._round_trip([("ZREM", self.keys.lease(rs), task_id) for rs, task_id in leases])

    async def requeue_claimed(self, record: TaskRecord) -> None:
        """Put back a task that was claimed but never dispatched (its claimer died or lost Redis): at
        the head of its class, its lease dropped."""
        await self._requeue(
            keys=self._queue_keys(record.rs),
            args=[
                record.task_id,
                record.priority,
                0,
                record.created_ms,
                record.created_ms + record.deadline_ms,
            ],
        )

    async def expired_evictions(self) -> list[tuple[str, str]]:
        """``(rs, task_id)`` of drop-lru victims whose terminal event the evicting admission did not
        confirm in time (it died, or lost Redis)."""
        return await self._expired(self.keys.evicted)

    async def release_eviction(self, rs: str, task_id: str) -> None:
        await self.client.zrem(self.keys.evicted(rs), task_id)

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

    async def session(self, session_id: str) -> SessionRecord | None:
        """The session, or None when unknown or expired."""
        key = self.keys.session(session_id)
        fields, ttl = await self._round_trip([("HGETALL", key), ("PTTL", key)])
        return _session(session_id, fields, int(ttl)) if fields else None

    async def session_ran_on(self, session_id: str, replica_id: str, pid: int) -> SessionRecord | None:
        """Remember the replica (and its engine's pid) a session now runs on; None when it is gone."""
        pairs = await self._session_set(
            keys=[self.keys.session(session_id)], args=["replica_id", replica_id, "replica_pid", str(pid)]
        )
        return _session(session_id, dict(zip(pairs[::2], pairs[1::2], strict=True)), -1) if pairs else None

    async def session_delete(self, session_id: str) -> SessionRecord | None:
        """Delete the session; returns what it held (None when unknown)."""
        pairs = await self._session_delete(keys=[self.keys.session(session_id)])
        return _session(session_id, dict(zip(pairs[::2], pairs[1::2], strict=True)), 0) if pairs else None

    async def expired_leases(self) -> list[tuple[str, str]]:
        """``(rs, task_id)`` of every lease past its expiry."""
        return await self._expired(self.keys.lease)

    async def _expired(self, key: Callable[[str], str]) -> list[tuple[str, str]]:
        """Every set's members of ``key(rs)`` scored at or before now: two round trips in all."""
        sets = sorted(await self._one("SMEMBERS", self.keys.replica_sets()))
        now = now_ms()
        found = await self._round_trip([("ZRANGEBYSCORE", key(rs), "-inf", now) for rs in sets])
        return [(rs, task_id) for rs, ids in zip(sets, found, strict=True) for task_id in ids]

    async def leased(self, rs: str) -> list[str]:
        return cast(list[str], await self.client.zrange(self.keys.lease(rs), 0, -1))

    # -- status views: recent tasks, running tasks, recent failures -------------------------------------
    # The two indexes are single keys outside any replica set's slot, so on a cluster they are written
    # just after the step they follow, not inside it: a crash in between costs an index entry, never a
    # task. On a single Redis, ADMIT writes the recent-tasks entry itself (one round trip).

    async def _index_admitted(self, rs: str, task_id: str) -> None:
        key = self.keys.recent_tasks()
        async with self.client.pipeline(transaction=False) as pipe:
            # Microseconds: admissions in one millisecond keep their order (2**53 µs is year 2255).
            pipe.zadd(key, {f"{rs}{US}{task_id}": time.time_ns() // 1000})
            pipe.zremrangebyrank(key, 0, -RECENT_TASKS_MAX - 1)
            await pipe.execute()

    async def _index_failures(self, failed: Sequence[tuple[str, str]]) -> None:
        """Index failed tasks ``(task_id, error payload)``. The member holds no time, so a retried
        append batch (the same payload) finds its member there and ``NX`` keeps the first time."""
        at = now_ms()
        members = {_failure_member(task_id, payload): at for task_id, payload in failed}
        key = self.keys.recent_failures()
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zadd(key, members, nx=True)
            pipe.zremrangebyrank(key, 0, -RECENT_FAILURES_MAX - 1)
            await pipe.execute()

    async def recent_tasks(self, limit: int) -> list[TaskSummary]:
        """The newest admitted tasks whose record still exists, newest first, at most ``limit``; index
        members whose record has expired are removed as they are met."""
        key = self.keys.recent_tasks()
        found: list[TaskSummary] = []
        seen: set[str] = set()
        start = 0
        while len(found) < limit:
            page = cast(list[str], await self.client.zrevrange(key, start, start + limit - 1))
            # Admissions meanwhile shift the ranks up: a member read twice is skipped the second time.
            fresh = [m for m in page if m not in seen]
            seen.update(fresh)
            summaries = await self._summaries([_member_task(m) for m in fresh])
            gone = [m for m, summary in zip(fresh, summaries, strict=True) if summary is None]
            if gone:
                await self.client.zrem(key, *gone)
            taken = {s.task_id for s in found}
            found.extend(s for s in summaries if s is not None and s.task_id not in taken)
            if len(page) < limit:
                break
            start += len(page) - len(gone)
        return found[:limit]

    async def running_tasks(self) -> list[TaskSummary]:
        """Tasks that hold a lease and whose record says running, the longest-running first."""
        sets = sorted(cast(set[str], await self.client.smembers(self.keys.replica_sets())))
        if not sets:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for rs in sets:
                pipe.zrange(self.keys.lease(rs), 0, -1)
            leased = await pipe.execute()
        tasks = [(rs, task_id) for rs, ids in zip(sets, leased, strict=True) for task_id in ids]
        running = [s for s in await self._summaries(tasks) if s is not None and s.state == TaskState.RUNNING]
        return sorted(running, key=lambda s: (s.dispatched_ms, s.task_id))

    async def recent_failures(self, limit: int) -> list[TaskFailure]:
        """The newest failed tasks, newest first, at most ``limit``."""
        entries = cast(
            list[tuple[str, float]],
            await self.client.zrevrange(self.keys.recent_failures(), 0, limit - 1, withscores=True),
        )
        return [_failure(member, score) for member, score in entries]

    async def _summaries(self, tasks: Sequence[tuple[str, str]]) -> list[TaskSummary | None]:
        """``(rs, task_id)`` → the task's summary, None where its record is gone."""
        if not tasks:
            return []
        async with self.client.pipeline(transaction=False) as pipe:
            for rs, task_id in tasks:
                pipe.hmget(self.keys.task(rs, task_id), _SUMMARY_FIELDS)
            rows = await pipe.execute()
        return [_summary(task_id, row) for (_, task_id), row in zip(tasks, rows, strict=True)]


@dataclass(frozen=True, slots=True)
class SessionBudgets:
    """A session's turn count and remaining budgets after an admission (None: unlimited)."""

    turns: int
    tokens: int | None
    time_ms: int | None
    cost_micro: int | None


def _opt_int(value: object) -> int | None:
    return None if value is None or value is False else int(str(value))


def _append_segment(batch: Append, fields: Mapping[str, str] | None = None) -> list[str | int]:
    """One batch's part of APPEND's arguments: task_id, batch id, the fields, the events as (count,
    blob) pairs of at most :data:`ENTRY_MAX` events each (one log entry each), and the terminal state
    of the last event. Only the last event may be terminal; a terminal `error` is also the record's
    ``error`` field. Redis gets one string per entry, not two per event."""
    fields = dict(fields or {})
    if batch.tokens_out is not None:
        fields["tokens_out"] = str(batch.tokens_out)
    entries: list[str | int] = []
    parts: list[str] = []
    final = ""
    for name, data, state in batch.events:
        if final:
            raise ValueError(f"task {batch.task_id}: an event follows the terminal one in one batch")
        parts += (name, data)
        final = state
        if len(parts) == 2 * ENTRY_MAX:
            entries += _entry(batch.task_id, parts)
            parts = []
    if parts:
        entries += _entry(batch.task_id, parts)
    if final and batch.events[-1][0] == "error":
        fields["error"] = batch.events[-1][1]
    out: list[str | int] = [batch.task_id, batch.batch_id, len(fields)]
    for kv in fields.items():
        out += kv
    out.append(len(entries) // 2)
    out += entries
    out.append(final)
    return out


def _entry(task_id: str, parts: list[str]) -> tuple[int, str]:
    """(count, blob) of one log entry from its events' names and data, in turn."""
    blob = US.join(parts)
    # The separator must split the blob back into exactly these events (JSON escapes it).
    if blob.count(US) != len(parts) - 1:
        raise ValueError(f"task {task_id}: an event carries a raw \\x1f")
    return len(parts) // 2, blob


def _appended(result: object) -> int | Refused:
    seq = int(cast(int, result))
    if seq >= 0:
        return seq
    return Refused.ENDED if seq == -1 else Refused.UNKNOWN


def _record(task_id: str, f: Mapping[str, str]) -> TaskRecord:
    body = json.loads(f.get("request") or "{}")
    return TaskRecord(
        task_id=task_id,
        state=TaskState(f.get("state", "queued")),
        rs=f.get("rs", ""),
        priority="batch" if f.get("priority") == "batch" else "interactive",
        model_ref=f.get("model_ref", ""),
        session_id=f.get("session_id", ""),
        engine=f.get("engine", ""),
        created_ms=int(f.get("created_ms", "0")),
        deadline_ms=int(f.get("deadline_ms", "0")),
        request=TaskRequest(
            prompt=body.get("prompt", ""),
            max_tokens=int(body.get("max_tokens", 0)),
            seed=int(body.get("seed", 0)),
            determinism=body.get("determinism") or "best_effort",
            kv_cold=bool(body.get("kv_cold", False)),
            prompt_est=int(body.get("prompt_est", 0)),
            workload=body.get("workload") or "completion",
            body=body.get("body") or "",
            inputs=tuple(body.get("inputs") or ()),
        ),
        tokens_out=int(f.get("tokens_out", "0")),
        manager=f.get("manager", ""),
        pool_id=f.get("pool_id", ""),
        replica_id=f.get("replica_id", ""),
        dispatched_ms=int(f.get("dispatched_ms") or 0),
        error_json=f.get("error", ""),
        traceparent=f.get("traceparent", ""),
    )


def _member_task(member: str) -> tuple[str, str]:
    """A recent-tasks member ``rs US task_id`` as ``(rs, task_id)``."""
    rs, _, task_id = member.partition(US)
    return rs, task_id


def _error_fields(payload: str) -> dict[str, Any]:
    """An error payload's JSON object; {} for anything else (a record's error is ours, but a status
    view must not fail on one)."""
    try:
        body = json.loads(payload) if payload else {}
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _summary(task_id: str, row: Sequence[str | None]) -> TaskSummary | None:
    f = dict(zip(_SUMMARY_FIELDS, row, strict=True))
    if f["state"] is None:
        return None
    code = _error_fields(f["error"] or "").get("code")
    return TaskSummary(
        task_id=task_id,
        state=TaskState(f["state"]),
        priority="batch" if f["priority"] == "batch" else "interactive",
        model_ref=f["model_ref"] or "",
        created_ms=int(f["created_ms"] or 0),
        tokens_out=int(f["tokens_out"] or 0),
        pool_id=f["pool_id"] or "",
        replica_id=f["replica_id"] or "",
        dispatched_ms=int(f["dispatched_ms"] or 0),
        error_code=str(code) if code else None,
    )


def _failure_member(task_id: str, payload: str) -> str:
    body = _error_fields(payload)
    entry = {
        "task_id": task_id,
        "code": str(body.get("code", "")),
        "message": str(body.get("message", ""))[:FAILURE_MESSAGE_MAX],
    }
    return json.dumps(entry, separators=(",", ":"), sort_keys=True)


def _failure(member: str, score: float) -> TaskFailure:
    entry = _error_fields(member)
    return TaskFailure(
        task_id=str(entry.get("task_id", "")),
        code=str(entry.get("code", "")),
        message=str(entry.get("message", "")),
        at_ms=int(score),
    )


def _session(session_id: str, f: Mapping[str, str], ttl_ms: int) -> SessionRecord:
    def opt(name: str) -> int | None:
        return int(f[name]) if name in f else None

    return SessionRecord(
        session_id=session_id,
        model_ref=f.get("model_ref", ""),
        created_ms=int(f.get("created_ms", "0")),
        turns=int(f.get("turns", "0")),
        max_turns=int(f.get("max_turns", "0")),
        budgets=SessionBudgets(int(f.get("turns", "0")), opt("b_tokens"), opt("b_time"), opt("b_cost")),
        replica_id=f.get("replica_id", ""),
        replica_pid=int(f.get("replica_pid") or 0),
        tokens_held=int(f.get("tokens_held", "0")),
        ttl_ms=max(0, ttl_ms),
    )


_STREAM_READS: Final = frozenset({"XRANGE", "XREVRANGE"})


def _as_parsed(command: tuple[Any, ...], reply: Any) -> Any:
    """A raw RESP reply as redis-py's client parses that command's (for the few shapes that differ)."""
    if command[0] in _STREAM_READS:
        return _stream_entries(reply)
    if command[0] == "HGETALL":
        return dict(zip(reply[::2], reply[1::2], strict=True))
    if command[-1] == "WITHSCORES":
        return [(member, float(score)) for member, score in zip(reply[::2], reply[1::2], strict=True)]
    return reply


def _stream_entries(reply: list[list[Any]]) -> list[tuple[str, dict[str, str]]]:
    """A stream read's RESP reply (``[[id, [field, value, ...]], ...]``) as redis-py's client parses it."""
    return [(entry_id, dict(zip(fields[::2], fields[1::2], strict=True))) for entry_id, fields in reply]


def _entry_events(entry_id: str, body: Mapping[str, str], after_seq: int = -1) -> list[Event]:
    """The events of one log entry (see the module docstring) with seq > ``after_seq``."""
    first = int(entry_id.partition("-")[2]) - 1
    blob = body.get("b")
    if blob is None:
        return [Event(first, body["e"], body["d"])] if first > after_seq else []
    n = int(body["n"])
    if first + n - 1 <= after_seq:
        return []
    parts = blob.split(US)
    skip = max(0, after_seq + 1 - first)
    return [Event(first + k, parts[2 * k], parts[2 * k + 1]) for k in range(skip, n)]
