"""The benchmarks' CPU accounting (bench/cpu.py), its P9 summary and the py-spy folding: arithmetic and
process-tree sums, on fake /proc trees and on this process's real children. No timing."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import cpu
from bench.cpu import Role, Stat
from bench.p9 import p9_cost, p9_details, p9_rows
from bench.profile import Folded, frame_name

TCK = cpu.CLK_TCK


def _stat_line(pid: int, comm: str, ppid: int, utime: int, stime: int) -> str:
    # Fields 3.. after "(comm)": state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime cutime cstime ...; cutime/cstime (children) must not be counted.
    return f"{pid} ({comm}) S {ppid} 1 1 0 -1 4194560 10 0 0 0 {utime} {stime} 999 999 20 0 1 0 5\n"


def _fake_proc(root: Path, procs: dict[int, tuple[int, int, int]]) -> Path:
    """A /proc with one ``stat`` per pid: pid → (ppid, utime, stime)."""
    for pid, (ppid, utime, stime) in procs.items():
        (root / str(pid)).mkdir(parents=True, exist_ok=True)
        (root / str(pid) / "stat").write_text(_stat_line(pid, f"p {pid}", ppid, utime, stime))
    (root / "self").mkdir(exist_ok=True)  # non-numeric entries are skipped
    return root


def test_parse_stat_counts_from_the_last_parenthesis_and_sums_user_and_system() -> None:
    stat = cpu.parse_stat(_stat_line(42, "python3 (gateway) x", 7, 150, 25))
    assert stat == Stat(ppid=7, ticks=175)


def test_descendants_follow_the_whole_tree_and_nothing_else() -> None:
    table = {1: Stat(0, 0), 10: Stat(1, 0), 11: Stat(10, 0), 12: Stat(10, 0), 13: Stat(12, 0), 20: Stat(1, 0)}
    assert cpu.descendants(10, table) == [11, 12, 13]
    assert cpu.descendants(13, table) == []
    assert cpu.descendants(99, table) == []


def test_role_scopes_pick_the_root_its_tree_or_only_its_children() -> None:
    table = {10: Stat(1, 0), 11: Stat(10, 0), 12: Stat(11, 0), 20: Stat(1, 0)}
    assert Role("a", (10,)).pids(table) == [10]
    assert Role("a", (10,), "tree").pids(table) == [10, 11, 12]
    assert Role("a", (10,), "children").pids(table) == [11, 12]
    assert Role("a", (10, 20)).pids(table) == [10, 20]
    assert Role("a", (99,), "tree").pids(table) == []  # gone: nothing, no error


def test_a_gateway_with_workers_is_summed_over_the_parent_and_its_children(tmp_path: Path) -> None:
    # gateway 100 with workers 101 and 102 (one with a helper child 103); pool manager 200 with its
    # engine 201; an unrelated process 300.
    before = {
        100: (1, 10, 5),
        101: (100, 100, 0),
        102: (100, 40, 10),
        103: (102, 1, 1),
        200: (1, 50, 0),
        201: (200, 500, 0),
        300: (1, 7, 7),
    }
    roles = (
        Role("gateway", (100,), "tree"),
        Role("pool manager", (200,)),
        Role("engines", (200,), "children"),
    )
    first = cpu.snapshot(roles, _fake_proc(tmp_path / "a", before))
    after = {**before, 100: (1, 12, 5), 101: (100, 130, 10), 102: (100, 40, 10), 103: (102, 3, 1)}
    after |= {200: (1, 80, 5), 201: (200, 900, 100)}
    del after[300]
    second = cpu.snapshot(roles, _fake_proc(tmp_path / "b", after))
    used = cpu.used_s(first, second)
    assert used["gateway"] == pytest.approx((2 + 40 + 0 + 2) / TCK)
    assert used["pool manager"] == pytest.approx(35 / TCK)
    assert used["engines"] == pytest.approx(500 / TCK)


def test_processes_that_start_inside_the_window_count_from_zero_and_gone_ones_count_nothing() -> None:
    before = {"gateway": {100: 10, 101: 50}, "redis": {300: 5}}
    after = {"gateway": {100: 20, 102: 30}, "redis": {300: 5}}
    used = cpu.used_s(before, after)
    assert used == {"gateway": pytest.approx(40 / TCK), "redis": 0.0}
    assert cpu.used_s({"old": {1: 5}}, {}) == {"old": 0.0}


def test_cost_gives_us_per_unit_by_role_and_the_stack_sum() -> None:
    seconds = {"gateway": 0.010, "pool manager": 0.020, "redis": 0.005, "engines": 0.100}
    block = cpu.cost(seconds, 1000, cpu.TOKEN_STACK)
    assert block["units"] == 1000
    assert block["us_per_unit"] == {"engines": 100.0, "gateway": 10.0, "pool manager": 20.0, "redis": 5.0}
    assert block["stack_cpu_s"] == pytest.approx(0.035)
    assert block["stack_us_per_unit"] == pytest.approx(35.0)  # engines are not part of the stack sum
    assert math.isnan(cpu.cost(seconds, 0, cpu.TOKEN_STACK)["stack_us_per_unit"])
    assert cpu.per_unit_us(0.3, 2000) == pytest.approx(150.0)


def test_the_meter_adds_its_windows_up() -> None:
    assert cpu.add({"x": 1.0}, {"x": 0.5, "y": 2.0}) == {"x": 1.5, "y": 2.0}
    meter = cpu.Meter((Role("me", (os.getpid(),)),))
    first = meter.stop(meter.start())
    second = meter.stop(meter.start())
    assert meter.windows == 2
    assert meter.seconds == {"me": pytest.approx(first["me"] + second["me"])}


def test_real_children_are_found_and_their_cpu_is_readable() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        table = cpu.process_table()
        me = Role("me", (os.getpid(),), "tree")
        assert child.pid in me.pids(table)
        assert child.pid in Role("kids", (os.getpid(),), "children").pids(table)
        assert os.getpid() not in Role("kids", (os.getpid(),), "children").pids(table)
        assert cpu.cpu_s(os.getpid()) > 0
        assert cpu.cpu_s(child.pid) >= 0
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    assert cpu.cpu_s(2**31 - 1) == 0.0  # no such process


def _token(stack_us: float) -> dict[str, object]:
    block = {"units": 100, "us_per_unit": {"gateway": stack_us}, "stack": ["gateway"], "cpu_s": {}}
    return {"stack": {**block, "stack_us_per_unit": stack_us, "stack_cpu_s": 0.0}, "direct": block}


def test_p9_gates_p1_at_its_gated_streams_p3_and_every_p4_case() -> None:
    p1 = {
        "id": "P1",
        "target": {"streams": 256},
        "cases": [{"streams": 1, "cpu": _token(5000.0)}, {"streams": 256, "cpu": _token(20.0)}],
    }
    p3 = {
        "id": "P3",
        "cases": [{"streams": 500, "cpu": _token(24.0)}],
        "saturation": {"streams": 64, "cpu": _token(10.0)},
    }
    p4 = {"id": "P4", "cases": [{"clients": 16, "cpu": {"units": 10, "stack_us_per_unit": 149.0}}]}
    result = p9_cost([p1, p3, p4])
    assert result is not None
    assert [c["pass"] for c in result["tokens"]] == [None, True, True, True]  # 1 stream: info only
    assert result["pass"] is True
    p4["cases"].append({"clients": 64, "cpu": {"units": 10, "stack_us_per_unit": 151.0}})
    result = p9_cost([p1, p3, p4])
    assert result is not None and result["pass"] is False
    p3["saturation"]["cpu"] = _token(float("nan"))  # no token delivered: cannot pass
    p4["cases"].pop()
    result = p9_cost([p1, p3, p4])
    assert result is not None and result["pass"] is False
    assert p9_cost([{"id": "P6"}]) is None


def test_p9_reports_p2s_cost_per_task_as_information_beside_the_gates() -> None:
    p2 = {
        "id": "P2",
        "params": {"tokens_per_stream": 2},
        "cases": [{"concurrency": 32, "cpu": _token(4000.0)}],
    }
    result = p9_cost([p2])
    assert result is not None
    [task] = result["tasks"]
    assert (task["case"], task["stack_us_per_unit"], task["pass"]) == (
        "P2, 32 concurrent, 2 tokens",
        4000.0,
        None,
    )
    assert result["pass"] is False  # information alone gates nothing, so nothing passed
    rows = p9_rows(result)
    assert rows[-1][1:3] == ["CPU per task", "(info)"] and rows[-1][4] == "info"
    assert "P2, 32 concurrent, 2 tokens" in p9_details(result)


def test_folded_stacks_count_own_and_inclusive_samples_once_per_stack() -> None:
    lines = [
        "<module> (/x/services/llorch_gateway/app.py:3);run (/x/site-packages/aiohttp/web.py:10);"
        "relay (/x/services/llorch_gateway/sse.py:40) 7",
        "<module> (/x/services/llorch_gateway/app.py:3);relay (/x/services/llorch_gateway/sse.py:41);"
        "relay (/x/services/llorch_gateway/sse.py:40) 3",
        "garbage",
    ]
    folded = Folded.parse(lines)
    assert folded.samples == 10
    assert folded.own == {"relay (services/llorch_gateway/sse.py)": 10}
    assert folded.inclusive["relay (services/llorch_gateway/sse.py)"] == 10  # recursion: once per sample
    assert folded.inclusive["run (aiohttp/web.py)"] == 7
    assert frame_name("f (<string>:1)") == "f (<string>)"
    assert "| 1 | 100.0 |" in folded.table()
