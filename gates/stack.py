"""Run the stack for a gate: ``llorch up --config FILE`` as a child process, ready or failed in bounded time.

This is the only place in :mod:`gates` that starts or stops the stack. The child gets its own state dir
(``LLORCH_STATE_DIR``) and bind (``LLORCH_API_BIND``), so the gate knows the URL and the token file
without parsing the config; its output goes to a log file, never to the terminal (it holds no secrets,
but it is long). Stop = SIGINT (``llorch up`` then stops its services in order), then SIGKILL to the
child's process group after a grace period.

The gRPC and metrics ports still come from the config file: two stacks from configs with the same ports
cannot run side by side, and a port that another process holds makes a service exit, which
:meth:`Stack.wait_ready` reports with the tail of the log.

As a command, it wraps another command::

    python -m gates.stack --config FILE [--state-dir DIR] [--bind HOST:PORT] -- CMD [ARG...]

starts the stack, waits for ``GET /readyz`` 200, runs CMD with ``LLORCH_BASE_URL`` and
``LLORCH_GATE_STATE_DIR`` set (the API token is in ``$LLORCH_GATE_STATE_DIR/api.token`` unless
``LLORCH_API_TOKEN`` was already set), stops the stack and exits with CMD's exit code (2 when the stack
did not come up).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

DEFAULT_BIND = "127.0.0.1:8080"
READY_TIMEOUT_S = 300.0
STOP_GRACE_S = 45.0  # llorch up gives each service 15 s after SIGTERM (pool managers 25 s)


class StackError(Exception):
    """The stack could not be started, or did not become ready in time."""


def llorch_executable() -> str:
    """``llorch`` next to this Python (the project's venv), else the one on PATH."""
    beside = Path(sys.executable).with_name("llorch")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("llorch")
    if found is None:
        raise StackError("no `llorch` executable next to this Python or on PATH (run `make setup`)")
    return found


def _port_free(bind: str) -> bool:
    host, _, port = bind.rpartition(":")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        # Like the gateway's own socket: a port held only by TIME_WAIT connections counts as free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host or "127.0.0.1", int(port)))
        except OSError:
            return False
    return True


class Stack:
    """One ``llorch up`` child. A context manager: started and ready on entry, stopped on exit.

    ``state_dir=None`` uses a fresh temporary directory, removed again by :meth:`stop` unless
    ``keep_state``. ``env`` is added to this process's environment for the child.
    """

    def __init__(
        self,
        config: Path,
        state_dir: Path | None = None,
        bind: str = DEFAULT_BIND,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        keep_state: bool = False,
    ) -> None:
        self.config = config.resolve()
        self.bind = bind
        self._own_state = state_dir is None
        self.state_dir = (
            Path(tempfile.mkdtemp(prefix="llorch-gate-")) if state_dir is None else state_dir.resolve()
        )
        self.keep_state = keep_state
        self.env = {**os.environ, **(env or {})}
        self.env["LLORCH_STATE_DIR"] = str(self.state_dir)
        self.env["LLORCH_API_BIND"] = bind
        self.log_path = (log_path or self.state_dir / "llorch-up.log").resolve()
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.bind}"

    def __enter__(self) -> Stack:
        try:
            self.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        if not self.config.is_file():
            raise StackError(f"config {self.config} is not a file")
        if not _port_free(self.bind):
            raise StackError(
                f"{self.bind} is already in use: another stack (make run?) would answer this gate; "
                "stop it or pick another bind"
            )
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [llorch_executable(), "up", "--config", str(self.config)]
        with open(self.log_path, "wb") as log:
            # A new session: the terminal's Ctrl-C reaches the gate, which stops the stack in order.
            self._proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Poll ``GET /readyz`` until it answers 200; fail early when ``llorch up`` exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not self.alive():
                code = None if self._proc is None else self._proc.returncode
                raise StackError(f"llorch up exited ({code}) before it was ready:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass  # 503 while pools load (HTTPError is a URLError), or the port is not open yet
            if time.monotonic() >= deadline:
                raise StackError(f"{self.base_url}/readyz not 200 within {timeout_s:g} s:\n{self.log_tail()}")
            time.sleep(0.25)

    def token(self) -> str:
        """The API token: ``LLORCH_API_TOKEN`` when the stack was given one, else the file
        ``llorch up`` wrote under the state dir (SPEC §2.5). Never printed."""
        given = self.env.get("LLORCH_API_TOKEN")
        if given:
            return given
        path = self.state_dir / "api.token"
        try:
            return path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise StackError(f"no API token: LLORCH_API_TOKEN is unset and {path} is unreadable") from exc

    def stop(self, grace_s: float = STOP_GRACE_S) -> int | None:
        """SIGINT, then SIGKILL to the process group after ``grace_s``. Idempotent; returns the exit code."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._own_state and not self.keep_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return None if proc is None else proc.returncode


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gates.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="llorch config (YAML)")
    parser.add_argument("--state-dir", type=Path, default=None, help="default: a fresh temporary directory")
    parser.add_argument("--bind", default=DEFAULT_BIND, help=f"gateway host:port (default {DEFAULT_BIND})")
    parser.add_argument("--ready-timeout", type=float, default=READY_TIMEOUT_S, help="seconds")
    parser.add_argument("--log", type=Path, default=None, help="default: <state dir>/llorch-up.log")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD [ARG...] to run while it is up")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("give the command to run after `--`", file=sys.stderr)
        return 2
    keep = args.state_dir is not None or args.log is None  # keep the log readable when it is in there
    stack = Stack(args.config, args.state_dir, args.bind, log_path=args.log, keep_state=keep)
    try:
        stack.start()
        print(f"stack: starting {stack.config.name} on {stack.base_url} (log: {stack.log_path})", flush=True)
        stack.wait_ready(args.ready_timeout)
        print("stack: ready", flush=True)
        env = {**os.environ, "LLORCH_BASE_URL": stack.base_url, "LLORCH_GATE_STATE_DIR": str(stack.state_dir)}
        return subprocess.call(command, env=env)
    except StackError as exc:
        print(f"stack: {exc}", file=sys.stderr)
        return 2
    finally:
        code = stack.stop()
        print(f"stack: stopped (llorch up exit {code})", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
