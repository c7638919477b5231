"""The scheduler's three readings of a pool state agree on which states are on their way to Ready:
the replica set's status, the residency planner's phase and admission's POOL_UNREADY all take them
from ``llorch.lifecycle.COMING_STATES``."""

from __future__ import annotations

import pytest

from llorch.lifecycle import COMING_STATES
from llorch.v1 import types_pb2
from llorch_poolmgr.supervisor import ReplicaState
from llorch_scheduler.inventory import _status
from llorch_scheduler.loader import _PHASES


@pytest.mark.parametrize("state", sorted(COMING_STATES))
def test_a_coming_state_reads_as_loading_everywhere(state: str) -> None:
    assert _status([types_pb2.PoolState(state=state)]) == "loading"
    assert _PHASES[state] == "loading"


def test_ready_wins_over_a_member_on_its_way_and_stopped_is_unloaded() -> None:
    members = [types_pb2.PoolState(state="Backoff"), types_pb2.PoolState(state="Ready")]
    assert _status(members) == "loaded"
    assert _status([types_pb2.PoolState(state="Stopped")]) == "unloaded"
    assert _PHASES["Ready"] == "ready"
    assert _PHASES["Stopped"] == "unloaded"


def test_the_pool_managers_loading_states_are_the_coming_ones() -> None:
    loading = {ReplicaState.PRELOADING, ReplicaState.SELFTEST, ReplicaState.BACKOFF}
    assert {s.value for s in loading} <= COMING_STATES
    waiting = {ReplicaState.STOPPED, ReplicaState.UNAVAILABLE, ReplicaState.FAILED}
    assert not {s.value for s in waiting} & COMING_STATES
