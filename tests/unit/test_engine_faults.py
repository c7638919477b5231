"""Exit classification, the OOM-kill counter and the circuit breaker of the pool manager."""

from __future__ import annotations

import signal
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from llorch_poolmgr.breaker import Breaker
from llorch_poolmgr.faults import PoolError, classify_exit, match_log, oom_kill_count


def test_vram_oom_is_named_from_the_engine_log() -> None:
    tail = ["loading model", "ggml_cuda_host_malloc: CUDA out of memory: tried to allocate 2.00 GiB"]
    failure = classify_exit(1, tail, oom_kills_rose=False)
    assert failure.code == PoolError.VRAM_OOM and "CUDA out of memory" in failure.message
    assert failure.kind == "vram_oom"


def test_cuda_error_is_a_driver_fault() -> None:
    failure = classify_exit(
        -int(signal.SIGABRT), ["CUDA error: an illegal memory access was encountered"], False
    )
    assert failure.code == PoolError.DRIVER_FAULT and failure.kind == "driver"


def test_sigkill_with_a_rising_oom_counter_is_a_host_oom() -> None:
    assert classify_exit(-int(signal.SIGKILL), ["ok"], oom_kills_rose=True).code == PoolError.HOST_OOM
    plain = classify_exit(-int(signal.SIGKILL), ["ok"], oom_kills_rose=False)
    assert plain.code == PoolError.ENGINE_CRASHED and "SIGKILL" in plain.message


def test_plain_exit_names_code_and_last_line() -> None:
    failure = classify_exit(134, ["starting", "abort: bad things", ""], oom_kills_rose=False)
    assert failure.code == PoolError.ENGINE_CRASHED
    assert failure.message == "engine exited with code 134: abort: bad things"


def test_quiet_log_matches_nothing() -> None:
    assert match_log(["server is listening on http://127.0.0.1:8080", "slot 0: done"]) is None


def test_oom_kill_counter_from_cgroup_v2_and_v1(tmp_path: Path) -> None:
    proc = tmp_path / "cgroup"
    root = tmp_path / "fs"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 2\noom_kill 2\n")
    proc.write_text("0::/a/b\n")
    assert oom_kill_count(proc, root) == 2
    (root / "memory" / "x").mkdir(parents=True)
    (root / "memory" / "x" / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 7\n")
    proc.write_text("4:memory:/x\n1:cpu:/\n")
    assert oom_kill_count(proc, root) == 7
    proc.write_text("4:memory:/missing\n")
    assert oom_kill_count(proc, root) == 0


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_at_the_limit_within_the_window_and_forgets_old_failures() -> None:
    clock = _Clock()
    breaker = Breaker(3, 300, clock)
    for _ in range(2):
        breaker.record()
    assert not breaker.open
    clock.now = 301  # the first two aged out
    breaker.record()
    assert breaker.recent() == 1 and not breaker.open
    breaker.record()
    breaker.record()
    assert breaker.open
    breaker.reset()
    assert breaker.recent() == 0 and not breaker.open


@given(st.lists(st.floats(min_value=0, max_value=1000), max_size=30), st.integers(1, 10))
def test_breaker_counts_exactly_the_failures_inside_the_window(times: list[float], limit: int) -> None:
    clock = _Clock()
    breaker = Breaker(limit, 100, clock)
    for t in sorted(times):
        clock.now = t
        breaker.record()
    inside = sum(1 for t in times if t >= clock.now - 100)
    assert breaker.recent() == inside
    assert breaker.open == (inside >= limit)
