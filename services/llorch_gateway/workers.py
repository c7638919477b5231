"""``api.workers: N``: N gateway processes listening on one ``api.bind`` with SO_REUSEPORT.

Why this shape:

- **SO_REUSEPORT**, each worker with its own listening socket on the same address: the kernel hashes
  each new connection to one of them, so accepts are spread without a thundering herd and without a
  process in the path. A master that accepts and hands sockets over (SCM_RIGHTS) would be one more
  single-core ceiling and one more hop per connection; one listening socket inherited by all wakes every
  worker per connection and lets the least busy one win only by chance.
- **Processes, not threads**: the gateway's work is Python on an event loop, and the GIL runs one
  thread's Python at a time.
- **`llorch gateway` starts them itself**: the process is worker 0 and the parent of workers 1..N-1, so
  every way of running the gateway (`llorch up`, a systemd unit, a test) gets the same N. The parent
  re-runs its own command line (same config, environment and working directory) with
  ``LLORCH_GATEWAY_WORKER=<n>``; a worker that exits is restarted with backoff, and the parent gives up
  (exits 1, for its own supervisor to see) when one keeps dying. On SIGTERM/SIGINT the parent stops its
  children and waits for them (SIGKILL after :data:`STOP_GRACE_S`), so none outlives it; a child also
  stops by itself when its parent dies, however it died: its stdin is a pipe from the parent, whose end
  the kernel closes.

Every worker can serve any stream: tasks, sessions, cancels and the event feed are in Redis and the
scheduler, and each worker follows the live-event channel itself. What stays per process: the
``rps`` token buckets of :mod:`.auth` (each worker enforces the limit on the connections it accepted),
the status snapshot cache (0.5 s, per worker) and the metrics (summed at scrape time, see
:mod:`.worker_metrics`). A worker restarted alone closes its listening socket when it dies: the
connections the kernel had queued on it and not yet accepted are reset.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from llorch.resilience import RestartPolicy

log = logging.getLogger(__name__)

WORKER_ENV: Final = "LLORCH_GATEWAY_WORKER"
METRICS_FD_ENV: Final = "LLORCH_GATEWAY_METRICS_FD"
PEERS_ENV: Final = "LLORCH_GATEWAY_PEERS"
STOP_GRACE_S: Final = 10.0
RESTART: Final = RestartPolicy()  # the same policy as `llorch up` gives its services


@dataclass(frozen=True)
class WorkerRole:
    """Which of the ``count`` workers this process is, and where each serves its own metrics."""

    index: int
    count: int
    peers: tuple[str, ...]  # every worker's loopback metrics address, by index
    metrics_socket: socket.socket  # this worker's, listening
    child_sockets: tuple[socket.socket, ...] = ()  # the parent's copies of workers 1..N-1's, for restarts

    @property
    def siblings(self) -> dict[int, str]:
        return {k: a for k, a in enumerate(self.peers) if k != self.index}


def worker_role(count: int, environ: Mapping[str, str] = os.environ) -> WorkerRole | None:
    """None with one worker; else this process's role: a child started by :class:`WorkerGroup`, or
    the parent, which binds every worker's metrics listener now (so a restarted child gets its own back)."""
    if count == 1:
        return None
    if (index := environ.get(WORKER_ENV)) is not None:
        sock = socket.socket(fileno=int(environ[METRICS_FD_ENV]))
        return WorkerRole(int(index), count, tuple(environ[PEERS_ENV].split(",")), sock)
    sockets = [_listener() for _ in range(count)]
    peers = tuple(f"127.0.0.1:{s.getsockname()[1]}" for s in sockets)
    return WorkerRole(0, count, peers, sockets[0], tuple(sockets[1:]))


def _listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    sock.setblocking(False)
    return sock


def worker_name(index: int) -> str:
    """How logs and ``component_up`` name worker ``index``."""
    return f"gateway-worker-{index}"


def check_address_free(host: str, port: int) -> None:
    """Raise OSError when something already listens on ``host:port``. SO_REUSEPORT would let this
    group join another gateway's (same user) and split its connections silently; a plain bind (with
    SO_REUSEADDR, so connections left in TIME_WAIT do not count) is refused while anything listens."""
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise OSError(exc.errno, f"api.bind {host}:{port} is in use (another gateway?)") from None


def worker_command() -> list[str]:
    """This process's own command line, run as a module of this interpreter (``llorch gateway ...``)."""
    return [sys.executable, "-m", "llorch_cli.main", *sys.argv[1:]]


class WorkersGaveUp(Exception):
    """A worker kept dying; the message says which."""


class WorkerGroup:
    """The parent's children, workers 1..N-1: :meth:`run_until` starts them, restarts one that exits,
    and stops them all when told to or when one keeps dying."""

    def __init__(self, role: WorkerRole, command: Sequence[str]) -> None:
        self.role = role
        self.command = list(command)
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False

    async def run_until(self, stop: asyncio.Event) -> None:
        """Keep the workers running until ``stop`` is set, then stop them and wait for them (also when
        cancelled). Raises :class:`WorkersGaveUp` (after stopping the others) when one keeps dying."""
        keepers = [asyncio.create_task(self._keep(k)) for k in range(1, self.role.count)]
        stopped = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait({*keepers, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._stopping = True
            for task in (*keepers, stopped):
                task.cancel()
            await asyncio.gather(*keepers, stopped, return_exceptions=True)
            await self._terminate()
        for task in done:
            if task is not stopped and (exc := task.exception()) is not None:
                raise exc

    async def _terminate(self) -> None:
        """SIGTERM every live worker, then wait for each; SIGKILL one still there after STOP_GRACE_S."""
        procs = [p for p in self._procs.values() if p.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
            except TimeoutError:
                log.warning(
                    "gateway worker did not stop in time; killing it",
                    extra={"event": "worker_kill", "pid": proc.pid},
                )
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        for sock in self.role.child_sockets:
            sock.close()

    async def _keep(self, index: int) -> None:
        loop = asyncio.get_running_loop()
        exits: collections.deque[float] = collections.deque()
        attempt = 0
        while not self._stopping:
            started = loop.time()
            code = await self._run_once(index)
            if self._stopping:
                return
            now = loop.time()
            attempt = 1 if now - started >= RESTART.stable_s else attempt + 1
            exits.append(now)
            while now - exits[0] > RESTART.window_s:
                exits.popleft()
            if len(exits) >= RESTART.give_up_exits:
                raise WorkersGaveUp(
                    f"gateway worker {index} exited {len(exits)} times within {RESTART.window_s:g} s "
                    f"(last exit code {code})"
                )
            delay = RESTART.delay_s(attempt)
            log.warning(
                "gateway worker exited; restarting",
                extra={
                    "event": "worker_restart",
                    "child": worker_name(index),
                    "exit_code": code,
                    "delay_ms": int(delay * 1000),
                },
            )
            await asyncio.sleep(delay)  # the restart backoff, not synchronisation

    async def _run_once(self, index: int) -> int | None:
        """Run worker ``index`` until it exits; its exit code (None: it could not be started)."""
        sock = self.role.child_sockets[index - 1]
        env = {
            **os.environ,
            WORKER_ENV: str(index),
            METRICS_FD_ENV: str(sock.fileno()),
            PEERS_ENV: ",".join(self.role.peers),
        }
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command, stdin=asyncio.subprocess.PIPE, env=env, pass_fds=(sock.fileno(),)
            )
        except OSError as exc:
            log.error(
                "gateway worker failed to start",
                extra={"event": "worker_start_failed", "child": worker_name(index), "error": str(exc)},
            )
            return None
        self._procs[index] = proc
        log.info(
            "gateway worker started",
            extra={"event": "worker_started", "child": worker_name(index), "pid": proc.pid},
        )
        return await proc.wait()


async def watch_parent(stop: asyncio.Event) -> None:
    """In a child: set ``stop`` when the parent is gone (its end of our stdin pipe closed)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    # fd 0 is a pipe: opening it does not block; the transport owns the file object.
    pipe = open(0, "rb", buffering=0, closefd=False)  # noqa: SIM115, ASYNC230
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        while await reader.read(4096):
            pass  # the parent writes nothing; only the end matters
        log.warning("gateway parent is gone; stopping", extra={"event": "worker_orphaned"})
        stop.set()
    finally:
        transport.close()
