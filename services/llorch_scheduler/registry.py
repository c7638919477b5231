"""The pool registry: what pool managers report, plus the scheduler's own slot accounting.

Rebuilt from reports after a restart (pool managers re-announce). A replica's busy count is the
larger of what the scheduler dispatched and what its pool manager reports running, so a restarted
scheduler never over-fills a slot that is still decoding a task it no longer remembers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import lru_cache

import grpc.aio

from llorch.callstream import CallChannel
from llorch.config import GrpcTlsConfig
from llorch.grpc_tls import open_channel
from llorch.ids import replica_set_id
from llorch.lifecycle import LOADABLE_STATES
from llorch.v1 import poolmgr_pb2, poolmgr_pb2_grpc, types_pb2

from .placement import Option, rank

log = logging.getLogger(__name__)


@dataclass
class ReplicaSlots:
    pool_id: str
    replica_id: str
    running: set[str] = field(default_factory=set)


@dataclass
class Manager:
    manager_id: str
    address: str
    metrics_address: str
    channel: grpc.aio.Channel
    stub: poolmgr_pb2_grpc.PoolManagerAsyncStub
    pools: dict[str, types_pb2.PoolState] = field(default_factory=dict)
    running: frozenset[str] = frozenset()
    connected: bool = True
    # The dispatcher's start stream on this connection, opened on first use.
    starts: CallChannel[poolmgr_pb2.StartCall, poolmgr_pb2.StartResult] | None = None


@dataclass(frozen=True, slots=True)
class Candidate:
    manager: Manager
    pool: types_pb2.PoolState
    replica: types_pb2.ReplicaState
    slots_free: int


@dataclass(frozen=True, slots=True)
class SetInfo:
    rs: str
    engine: str
    engine_version: str
    ctx: int
    max_tokens_limit: int
    queue_capacity: int
    full_policy: str
    pool_ids: tuple[str, ...]
    single_slot: bool
    workloads: frozenset[str]


def on_demand(pool: types_pb2.PoolState) -> bool:
    return pool.residency == "on-demand"


def set_of(pool: types_pb2.PoolState) -> str:
    """The pool's replica set. An on-demand pool's leaves out the engine build, which is unknown until
    its first load and may change between loads: its queue must outlive its loads and unloads.

    Asked for every pool on every admission and dispatch, so the id (a hash of canonical JSON) is
    remembered per identity."""
    return _set_id(
        pool.engine,
        pool.model_digest,
        pool.ctx,
        "" if pool.residency == "on-demand" else pool.engine_version,
        pool.sampler_profile_version,
        () if "completion" in pool.workloads else tuple(pool.workloads),
    )


_set_id = lru_cache(maxsize=1024)(replica_set_id)


class PoolRegistry:
    def __init__(self, tls: GrpcTlsConfig | None = None) -> None:
        self.tls = tls  # how the scheduler dials the pool managers back
        self.managers: dict[str, Manager] = {}
        self._slots: dict[str, ReplicaSlots] = {}

    async def aclose(self) -> None:
        for manager in self.managers.values():
            await manager.channel.close(None)
        self.managers.clear()

    def update(
        self,
        manager_id: str,
        address: str,
        metrics_address: str,
        pools: list[types_pb2.PoolState],
        running: frozenset[str] = frozenset(),
    ) -> None:
        manager = self.managers.get(manager_id)
        if manager is None or manager.address != address:
            channel = open_channel(address, self.tls)
            manager = Manager(
                manager_id, address, metrics_address, channel, poolmgr_pb2_grpc.PoolManagerStub(channel)
            )
            self.managers[manager_id] = manager
            log.info(
                "pool manager registered", extra={"event": "pool_manager_registered", "address": address}
            )
        manager.connected = True
        manager.running = running
        manager.metrics_address = metrics_address
        manager.pools = {pool.pool_id: pool for pool in pools}
        for pool in pools:
            for replica in pool.replicas:
                self._slots.setdefault(replica.replica_id, ReplicaSlots(pool.pool_id, replica.replica_id))

    def disconnect(self, manager_id: str) -> None:
        manager = self.managers.get(manager_id)
        if manager is not None:
            manager.connected = False
            log.warning(
                "pool manager disconnected", extra={"event": "pool_manager_lost", "manager_id": manager_id}
            )

    def pools(self) -> list[tuple[Manager, types_pb2.PoolState]]:
        return [(m, p) for m in self.managers.values() for p in m.pools.values()]

    def pools_for_model(self, model_ref: str) -> list[tuple[Manager, types_pb2.PoolState]]:
        return [(m, p) for m, p in self.pools() if model_ref in (p.model_ref, p.model_digest)]

    def is_ready(self, manager: Manager, pool: types_pb2.PoolState) -> bool:
        return manager.connected and pool.state == "Ready"

    def is_loadable(self, manager: Manager, pool: types_pb2.PoolState) -> bool:
        """An on-demand pool that is unloaded or on its way to Ready: its set admits and queues."""
        return manager.connected and on_demand(pool) and pool.state in LOADABLE_STATES | {"Ready"}

    def configured_slots(self, rs: str) -> int:
        """The set's slots once every member is loaded (for the estimates of a set still loading)."""
        return sum(p.slots * len(p.replicas) for _, p in self.pools() if set_of(p) == rs)

    def busy(self, replica: types_pb2.ReplicaState) -> int:
        slots = self._slots.get(replica.replica_id)
        own = len(slots.running) if slots else 0
        return max(own, replica.slots_busy)

    def set_info(self, rs: str) -> SetInfo | None:
        members = [p for _, p in self.pools() if set_of(p) == rs]
        if not members:
            return None
        first = min(members, key=lambda p: p.pool_id)
        return SetInfo(
            rs=rs,
            engine=first.engine,
            engine_version=first.engine_version,
            ctx=first.ctx,
            max_tokens_limit=min(p.max_tokens_limit for p in members),
            queue_capacity=sum(p.queue_capacity for p in members),
            full_policy=first.full_policy,
            pool_ids=tuple(sorted(p.pool_id for p in members)),
            single_slot=all(r.slots_total == 1 for p in members for r in p.replicas),
            workloads=frozenset.intersection(*(frozenset(p.workloads) for p in members)),
        )

    def replica_sets(self) -> list[str]:
        return sorted({set_of(p) for _, p in self.pools() if p.engine_version or on_demand(p)})

    def candidates(self, rs: str, warm_replica: str | None = None) -> list[Candidate]:
        """Ready replicas of the set with a free slot, best first (see placement.rank)."""
        found: dict[str, Candidate] = {}
        options: list[Option] = []
        for manager, pool in self.pools():
            if not self.is_ready(manager, pool) or set_of(pool) != rs:
                continue
            vram_free = min((t.vram_free_bytes for t in pool.telemetry), default=0)
            for replica in pool.replicas:
                free = replica.slots_total - self.busy(replica)
                if replica.state == "Ready" and free > 0:
                    found[replica.replica_id] = Candidate(manager, pool, replica, free)
                    options.append(Option(pool.pool_id, replica.replica_id, free, vram_free))
        return [found[o.replica_id] for o in rank(options, warm_replica)]

    def slots(self, rs: str) -> tuple[int, int]:
        """(total, free) slots over the set's Ready replicas."""
        total = free = 0
        for manager, pool in self.pools():
            if self.is_ready(manager, pool) and set_of(pool) == rs:
                for replica in pool.replicas:
                    if replica.state == "Ready":
                        total += replica.slots_total
                        free += max(0, replica.slots_total - self.busy(replica))
        return total, free

    def occupy(self, replica_id: str, pool_id: str, task_id: str) -> None:
        self._slots.setdefault(replica_id, ReplicaSlots(pool_id, replica_id)).running.add(task_id)

    def release(self, replica_id: str, task_id: str) -> None:
        slots = self._slots.get(replica_id)
        if slots is not None:
            slots.running.discard(task_id)

    def running_tasks(self) -> set[str]:
        """Tasks the connected pool managers said they are running in their latest reports."""
        return {t for m in self.managers.values() if m.connected for t in m.running}

    def find_replica(
        self, replica_id: str | None
    ) -> tuple[Manager, types_pb2.PoolState, types_pb2.ReplicaState] | None:
        for manager, pool in self.pools():
            for replica in pool.replicas:
                if replica.replica_id == replica_id:
                    return manager, pool, replica
        return None

    def replica_pid(self, replica_id: str) -> int | None:
        """The engine pid of a Ready replica of a connected manager; None otherwise."""
        found = self.find_replica(replica_id)
        if found is None:
            return None
        manager, pool, replica = found
        return int(replica.pid) if self.is_ready(manager, pool) and replica.state == "Ready" else None

    def manager_by_address(self, address: str) -> Manager | None:
        for manager in self.managers.values():
            if manager.address == address:
                return manager
        return None
