"""The mock engine as a real process on a free port, for adapter and engine tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from .procs import Proc, free_port, python_module, wait_until

FIXTURE_MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "mock-model.bin"


@dataclass
class Mock:
    proc: Proc
    url: str

    def alive(self) -> bool:
        return self.proc.alive()


StartMock = Callable[..., Awaitable[Mock]]


@asynccontextmanager
async def mock_engines(workdir: Path) -> AsyncIterator[StartMock]:
    """Yield ``start(*args, ready=True)``; every mock started is stopped on exit.

    ``start`` waits until the mock answers: with ``ready`` until /health is 200, else until /mock/stats
    answers (it does while the model is still "loading").
    """
    procs: list[Proc] = []

    async def start(*args: str, ready: bool = True) -> Mock:
        port = free_port()
        proc = Proc(
            python_module("llorch_mockengine", "--port", str(port), *args), workdir / f"mock-{port}.log"
        )
        procs.append(proc)
        mock = Mock(proc, f"http://127.0.0.1:{port}")
        probe = f"{mock.url}/health" if ready else f"{mock.url}/mock/stats"

        async def up() -> bool:
            if not proc.alive():
                raise AssertionError(f"mock exited early ({proc.popen.returncode}):\n{proc.log_text()}")
            try:
                async with aiohttp.ClientSession() as session, session.get(probe) as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(up, timeout_s=60, what=f"mock engine on {port}")
        return mock

    try:
        yield start
    finally:
        for proc in procs:
            proc.stop()
