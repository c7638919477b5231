"""The GGUF reader's worker process does not outlive its service: a service SIGKILLed while the worker
idles takes the worker with it (before, the worker waited forever on a pipe it held both ends of)."""

from __future__ import annotations

import asyncio
import signal
import sys
from pathlib import Path

from tests.support.procs import wait_until

# The worker is made exactly as facts_of makes it; its pid comes back from a call run in it.
_SERVICE = """
import os, sys, threading
from pathlib import Path
from llorch import gguf_meta
Path(sys.argv[1]).write_text(str(gguf_meta._worker().submit(os.getpid).result()))
threading.Event().wait()
"""


def _gone(pid: int) -> bool:
    """No such process, or only its zombie (its new parent may not reap it)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return any(line.split()[1] == "Z" for line in status.splitlines() if line.startswith("State:"))


async def test_the_worker_dies_with_a_killed_service(tmp_path: Path) -> None:
    # No pipes: the worker inherits the service's stdio, which would keep a pipe open after the kill.
    told = tmp_path / "worker.pid"
    service = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SERVICE, str(told), stdin=asyncio.subprocess.DEVNULL
    )

    async def worker_started() -> bool:
        return told.exists() and told.read_text() != ""

    await wait_until(worker_started, 60, "the GGUF worker to start")
    worker = int(told.read_text())
    assert worker != service.pid and not _gone(worker)
    service.send_signal(signal.SIGKILL)
    await service.wait()

    async def worker_gone() -> bool:
        return _gone(worker)

    await wait_until(worker_gone, 30, "the GGUF worker to exit with its service")
