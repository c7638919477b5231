"""``<state_dir>/llorch-up.pid``: how `llorch down` finds the `llorch up` of a state dir.

`llorch up` writes it at start and removes it at exit. It holds the pid and the process's start time
(clock ticks since boot, from /proc), so a file left by a SIGKILLed `llorch up` whose pid has since
been reused is recognised as stale rather than naming a stranger.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from .embedded_redis import process_alive

PID_FILE: Final = "llorch-up.pid"
_STARTTIME_FIELD: Final = 19  # /proc/<pid>/stat field 22, counted from the field after "(comm)"


def start_ticks(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rpartition(")")[2].split()[_STARTTIME_FIELD])


@dataclass(frozen=True)
class Owner:
    pid: int
    started: int

    def running(self) -> bool:
        """The process that wrote the file still runs: same pid, same start time, a `llorch` process."""
        if not process_alive(self.pid) or start_ticks(self.pid) != self.started:
            return False
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes()
        except OSError:
            return False
        return b"llorch" in cmdline


class AlreadyRunning(Exception):
    def __init__(self, path: Path, owner: Owner) -> None:
        super().__init__(f"llorch up is already running on this state dir (pid {owner.pid}, see {path})")
        self.owner = owner


def path_in(state_dir: Path) -> Path:
    return state_dir / PID_FILE


def read(path: Path) -> Owner | None:
    """The owner the file names, None when there is no readable file."""
    try:
        data = json.loads(path.read_text())
        return Owner(int(data["pid"]), int(data["started"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claim(state_dir: Path) -> Path:
    """Write this process into the file; AlreadyRunning when a live `llorch up` holds it."""
    path = path_in(state_dir)
    owner = read(path)
    if owner is not None and owner.pid != os.getpid() and owner.running():
        raise AlreadyRunning(path, owner)
    pid = os.getpid()
    started = start_ticks(pid)
    tmp = path.with_name(f"{PID_FILE}.{pid}.tmp")
    tmp.write_text(json.dumps({"pid": pid, "started": started}) + "\n")
    os.replace(tmp, path)
    return path


def release(path: Path) -> None:
    """Remove the file if it still names this process."""
    owner = read(path)
    if owner is not None and owner.pid == os.getpid():
        with contextlib.suppress(OSError):
            path.unlink()
