"""A SIGKILLed service takes its GGUF reader's worker process with it (``llorch.orphans``): before,
every killed pool manager or scheduler that had read a model's facts left a worker and its
multiprocessing resource tracker running forever."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from llorch_cli.embedded_redis import process_alive
from tests.support.procs import wait_until

GONE_S = 30.0
SERVICE = """
import os, sys
from llorch import gguf_meta
worker = gguf_meta._worker().submit(os.getpid).result()
print(worker, flush=True)
sys.stdin.read()
"""


async def test_the_gguf_worker_dies_with_its_killed_parent() -> None:
    argv = [sys.executable, "-c", SERVICE]
    # Not asyncio's subprocess: the worker inherits the parent's stdout, and asyncio waits for that pipe
    # to close before it reports the parent's exit.
    parent = await asyncio.to_thread(
        subprocess.Popen, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        worker = int(await asyncio.to_thread(parent.stdout.readline))
        assert worker != parent.pid and process_alive(worker)
        parent.kill()
        await asyncio.to_thread(parent.wait)

        async def gone() -> bool:
            return not process_alive(worker)

        await wait_until(gone, GONE_S, f"the worker {worker} of a killed parent to exit")
    finally:
        parent.kill()
        await asyncio.to_thread(parent.wait)
