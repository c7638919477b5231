"""Process CPU accounting for the benchmarks (P9): CPU seconds of each process of the system under test
over a measured window, and the µs of CPU per unit of work (a relayed token, an answered admission).

CPU time, not wall time: on a shared 2-core box wall-clock figures are noise, while a process's user +
system seconds divided by the work it did are not. Figures come from ``/proc/<pid>/stat`` (Linux).

A *role* names one part of the stack (``gateway``, ``pool manager``, ...) and the processes that make it
up: its root process, optionally with all its descendants (``api.workers`` > 1 makes the gateway a
parent with worker children) or only its descendants (the engines a pool manager spawns). The process
tree is read again at every snapshot, so a worker or an engine started inside the window is counted from
zero. A process that exits inside the window loses what it used in the window (it cannot be read any
more); the roles here live for the whole benchmark.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

PROC = Path("/proc")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# The stack sums of BENCH.md's P9 (the engines and the load generator are reported apart).
TOKEN_STACK: tuple[str, ...] = ("gateway", "pool manager", "redis")
ADMISSION_STACK: tuple[str, ...] = ("gateway", "scheduler", "redis")
# A short task touches every service: its cost per task (P2) sums them all (information, no target).
TASK_STACK: tuple[str, ...] = ("gateway", "scheduler", "pool manager", "redis")
TARGET_US_PER_TOKEN = 25.0
TARGET_US_PER_ADMISSION = 150.0

Scope = Literal["self", "tree", "children"]


@dataclass(frozen=True, slots=True)
class Stat:
    """The two fields of ``/proc/<pid>/stat`` the accounting needs."""

    ppid: int
    ticks: int  # utime + stime, in clock ticks


def parse_stat(text: str) -> Stat:
    """Parse one ``/proc/<pid>/stat`` line; the command name (field 2) may hold spaces and parentheses,
    so the fields are counted from its last ``)``."""
    rest = text.rpartition(")")[2].split()
    # rest[0] is field 3 (state): ppid is field 4, utime 14 and stime 15.
    return Stat(ppid=int(rest[1]), ticks=int(rest[11]) + int(rest[12]))


def read_stat(pid: int, proc: Path = PROC) -> Stat | None:
    """The process's stat, or None when it is gone (or cannot be read)."""
    try:
        return parse_stat((proc / str(pid) / "stat").read_text())
    except (OSError, ValueError, IndexError):
        return None


def cpu_s(pid: int, proc: Path = PROC) -> float:
    """User + system CPU seconds of ``pid`` so far (its threads included, its children not); 0 when it
    cannot be read."""
    stat = read_stat(pid, proc)
    return 0.0 if stat is None else stat.ticks / CLK_TCK


def process_table(proc: Path = PROC) -> dict[int, Stat]:
    """Every readable process: pid → stat."""
    table: dict[int, Stat] = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            stat = read_stat(int(entry.name), proc)
            if stat is not None:
                table[int(entry.name)] = stat
    return table


def descendants(root: int, table: Mapping[int, Stat]) -> list[int]:
    """Every process below ``root`` in ``table`` (children, their children, ...), sorted."""
    children: dict[int, list[int]] = {}
    for pid, stat in table.items():
        children.setdefault(stat.ppid, []).append(pid)
    found: list[int] = []
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:  # a pid cannot be its own ancestor, but be safe against reuse
                found.append(child)
                todo.append(child)
    return sorted(found)


@dataclass(frozen=True, slots=True)
class Role:
    """One part of the system under test: its root processes and which of their processes count.

    ``scope``: ``self`` the roots only, ``tree`` the roots and all their descendants, ``children`` only
    the descendants (a pool manager's engines, without the manager itself).
    """

    name: str
    roots: tuple[int, ...]
    scope: Scope = "self"

    def pids(self, table: Mapping[int, Stat]) -> list[int]:
        pids: list[int] = []
        for root in self.roots:
            if self.scope != "children" and root in table:
                pids.append(root)
            if self.scope != "self":
                pids += descendants(root, table)
        return sorted(set(pids))


Snapshot = dict[str, dict[int, int]]  # role → pid → ticks


def snapshot(roles: Iterable[Role], proc: Path = PROC) -> Snapshot:
    """CPU ticks of every process of every role, now."""
    table = process_table(proc)
    return {role.name: {pid: table[pid].ticks for pid in role.pids(table)} for role in roles}


def used_s(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds each role used between two snapshots. A process that appears only in ``after``
    started inside the window and counts from zero; one that appears only in ``before`` is gone and
    counts nothing (what it used after ``before`` is lost)."""
    out: dict[str, float] = {}
    for name, now in after.items():
        then = before.get(name, {})
        ticks = sum(t - then.get(pid, 0) for pid, t in now.items())
        out[name] = max(ticks, 0) / CLK_TCK
    for name in before.keys() - after.keys():
        out[name] = 0.0
    return out


def add(total: Mapping[str, float], more: Mapping[str, float]) -> dict[str, float]:
    """Per-role sum of two CPU-seconds maps."""
    return {name: total.get(name, 0.0) + more.get(name, 0.0) for name in {*total, *more}}


def per_unit_us(seconds: float, units: int) -> float:
    """µs of CPU per unit of work; NaN when no work was done."""
    return seconds * 1e6 / units if units > 0 else float("nan")


def cost(seconds: Mapping[str, float], units: int, stack: Sequence[str]) -> dict[str, Any]:
    """The JSON block of one measured window: CPU seconds by role, µs per unit by role, and the stack
    sum (the roles in ``stack``) per unit."""
    stack_s = sum(seconds.get(name, 0.0) for name in stack)
    return {
        "units": units,
        "cpu_s": {name: round(s, 3) for name, s in sorted(seconds.items())},
        "us_per_unit": {name: round(per_unit_us(s, units), 2) for name, s in sorted(seconds.items())},
        "stack": list(stack),
        "stack_cpu_s": round(stack_s, 3),
        "stack_us_per_unit": round(per_unit_us(stack_s, units), 2),
    }


@dataclass(slots=True)
class Meter:
    """Accumulates the CPU seconds of ``roles`` over any number of measured windows::

    meter = Meter(roles)
    with meter.window():
        ...  # the measured work
    meter.seconds  # role → CPU seconds over all windows so far
    """

    roles: tuple[Role, ...]
    seconds: dict[str, float] = field(default_factory=dict)
    windows: int = 0

    def start(self) -> Snapshot:
        return snapshot(self.roles)

    def stop(self, started: Snapshot) -> dict[str, float]:
        """Close the window opened by ``start``; returns its CPU seconds by role and adds them up."""
        used = used_s(started, snapshot(self.roles))
        self.seconds = add(self.seconds, used)
        self.windows += 1
        return used

    def window(self) -> _Window:
        return _Window(self)


class _Window:
    def __init__(self, meter: Meter) -> None:
        self.meter = meter
        self.used: dict[str, float] = {}
        self._started: Snapshot = {}

    def __enter__(self) -> _Window:
        self._started = self.meter.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.used = self.meter.stop(self._started)
