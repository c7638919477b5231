"""``llorch down``: stop the `llorch up` of a state dir from another shell (SPEC §5.6).

1. Find it through ``<state_dir>/llorch-up.pid`` (a stale file is removed and said so).
2. Drain every pool through the API with the deadline, showing each pool and its running tasks until
   all have settled or the deadline (plus the cut tasks' margin) has passed. An unreachable gateway
   skips this step: the stack is stopped anyway.
3. SIGTERM `llorch up`. It stops its services in reverse order; each pool manager SIGTERMs its engines
   and SIGKILLs them after 10 s.
4. Wait for `llorch up` and every process below it to exit, naming each as it goes. A process left
   after `llorch up` exited (none should be: each has a parent-death signal) is SIGKILLed and named.

Exit 0 once it stopped; 1 when nothing runs or it did not stop in time.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Final

from llorch.config import LlorchConfig, load_config

from . import ops, pidfile
from .api import Api, ApiError, CliError, target_from_config
from .display import LiveBlock
from .drain import PoolRow, drain_all, rows_text
from .embedded_redis import process_alive

DEFAULT_DEADLINE_S: Final = 30.0
STOP_WAIT_S: Final = 90.0
"""How long `llorch up` gets to exit after SIGTERM: its own drain finds nothing left, then its
supervisor gives pool managers 25 s and Redis 15 s."""
LEFTOVER_WAIT_S: Final = 15.0
POLL_S: Final = 0.2
DRAIN_REQUEST_TIMEOUT_S: Final = 5.0


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    down = sub.add_parser("down", help="drain every pool, then stop a running `llorch up`")
    down.add_argument(
        "--deadline-s",
        type=ops.seconds,
        default=DEFAULT_DEADLINE_S,
        help="how long running tasks may go on before they are cut (default 30)",
    )
    ops.add_target_options(down)
    down.set_defaults(run=down_cmd, prog="llorch down")


def down_cmd(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    owner = _find(cfg.state_dir)
    print(f"llorch up is running (pid {owner.pid}, state dir {cfg.state_dir})", flush=True)
    tracked = _Tracked(owner.pid)
    _drain(cfg, args, args.deadline_s)
    print(f"stopping llorch up (SIGTERM to pid {owner.pid})", flush=True)
    try:
        os.kill(owner.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass  # it exited meanwhile
    except PermissionError:
        raise CliError("NOT_STOPPED", f"not allowed to signal llorch up (pid {owner.pid})") from None
    started = time.monotonic()
    if not tracked.wait_root(owner, STOP_WAIT_S):
        left = ", ".join(tracked.names(tracked.alive())) or "none"
        raise CliError(
            "NOT_STOPPED",
            f"llorch up (pid {owner.pid}) did not exit within {STOP_WAIT_S:g} s; its processes still "
            f"running: {left}",
        )
    tracked.wait_rest(LEFTOVER_WAIT_S)
    for pid, name in tracked.kill_leftovers():
        print(f"  killed a leftover process: {name} (pid {pid})", flush=True)
    print(f"llorch up stopped ({time.monotonic() - started:.0f} s)", flush=True)
    return 0


def _find(state_dir: Path) -> pidfile.Owner:
    path = pidfile.path_in(state_dir)
    owner = pidfile.read(path)
    if owner is None:
        raise CliError("NOT_RUNNING", f"no llorch up is running on state dir {state_dir} (no {path})")
    if not owner.running():
        with contextlib.suppress(OSError):
            path.unlink()
        raise CliError(
            "NOT_RUNNING",
            f"no llorch up is running on state dir {state_dir}: pid {owner.pid} is gone "
            f"(removed the stale {path})",
        )
    return owner


def _drain(cfg: LlorchConfig, args: argparse.Namespace, deadline_s: float) -> None:
    try:
        api = Api(target_from_config(cfg, args.url, args.token_file), DRAIN_REQUEST_TIMEOUT_S)
        print(f"draining every pool (deadline {deadline_s:g} s)", flush=True)
        block = LiveBlock()

        def show(rows: list[PoolRow]) -> None:
            block.show(rows_text(rows))

        outcome = drain_all(api, deadline_s, show)
    except (ApiError, CliError) as exc:
        print(f"could not drain the pools ({exc}); stopping the stack anyway", flush=True)
        return
    for pool_id, why in outcome.refused.items():
        print(f"  {pool_id}: drain refused: {why}", flush=True)
    busy = outcome.unsettled
    if busy:
        names = ", ".join(f"{p.pool_id} ({p.state}, {p.running} running)" for p in busy)
        print(f"the deadline passed with {names}; stopping anyway", flush=True)
    else:
        print("every pool drained", flush=True)


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError, ValueError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def _name(pid: int) -> str:
    """The service a process is: `llorch up`'s children run `python -m llorch_cli.main <service>`."""
    try:
        argv = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    except OSError:
        return "?"
    argv = [a for a in argv if a]
    if not argv:
        return "?"
    if Path(argv[0]).name.startswith("python") and len(argv) > 1:
        if argv[1] == "-m" and len(argv) > 2:
            return argv[3] if argv[2] == "llorch_cli.main" and len(argv) > 3 else argv[2]
        return Path(argv[1]).name
    return Path(argv[0].split()[0]).name


class _Tracked:
    """Every process below `llorch up` seen so far (pid → start time, so a reused pid is not it)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.known: dict[int, tuple[int, str]] = {}
        self.gone: set[int] = set()
        self.scan()

    def scan(self) -> None:
        todo = [self.root]
        while todo:
            for child in _children(todo.pop()):
                ticks = pidfile.start_ticks(child)
                if child not in self.known and ticks is not None:
                    self.known[child] = (ticks, _name(child))
                    todo.append(child)

    def alive(self) -> list[int]:
        return [
            pid
            for pid, (ticks, _) in self.known.items()
            if process_alive(pid) and pidfile.start_ticks(pid) == ticks
        ]

    def names(self, pids: list[int]) -> list[str]:
        return [f"{self.known[pid][1]} (pid {pid})" for pid in pids]

    def report_exits(self) -> None:
        alive = set(self.alive())
        for pid in sorted(set(self.known) - alive - self.gone):
            self.gone.add(pid)
            print(f"  stopped: {self.known[pid][1]} (pid {pid})", flush=True)

    def wait_root(self, owner: pidfile.Owner, within_s: float) -> bool:
        end = time.monotonic() + within_s
        while owner.running():
            self.scan()  # a service restarted meanwhile
            self.report_exits()
            if time.monotonic() >= end:
                return False
            time.sleep(POLL_S)
        self.report_exits()
        return True

    def wait_rest(self, within_s: float) -> None:
        end = time.monotonic() + within_s
        while self.alive() and time.monotonic() < end:
            time.sleep(POLL_S)
        self.report_exits()

    def kill_leftovers(self) -> list[tuple[int, str]]:
        killed = []
        for pid in self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, self.known[pid][1]))
        return killed
