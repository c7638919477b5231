"""Protocol stubs of vLLM, TGI and Triton, and the harness that runs them as real processes for tests.

Each stub (``vllm_stub.py``, ``tgi_stub.py``, ``triton_stub.py``) is a script that takes its engine's own
launch flags. :func:`stub_engines` launches one exactly as the pool manager would: a wrapper named like
the engine's binary runs the stub, :func:`llorch.adapters.launch.engine_command` builds the command
line and :func:`llorch.adapters.launch.make_adapter` the adapter. So every adapter test also runs the
launch plan against a process that parses it.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from llorch.adapters.base import EngineAdapter, Finished, GenerateRequest, Token
from llorch.adapters.launch import Launch, engine_command, make_adapter
from llorch.config import PoolConfig
from llorch.errors import OrchestratorError
from tests.support.procs import Proc, free_port, wait_until

STUBS_DIR = Path(__file__).resolve().parent
SCRIPTS = {"vllm": "vllm_stub.py", "tgi": "tgi_stub.py", "triton": "triton_stub.py"}


@dataclass
class StubEngine:
    """One running stub: its process, the launch plan it was started from, and its adapter."""

    proc: Proc
    launch: Launch
    adapter: EngineAdapter

    @property
    def url(self) -> str:
        return self.launch.base_url

    async def control(self, **knobs: object) -> dict[str, Any]:
        return await _call("POST", f"{self.url}/stub/control", knobs)

    async def stats(self) -> dict[str, Any]:
        return await _call("GET", f"{self.url}/stub/stats")

    async def last_request(self) -> dict[str, Any]:
        return await _call("GET", f"{self.url}/stub/last-request")


StartStub = Callable[..., Awaitable[StubEngine]]


async def _call(method: str, url: str, payload: object = None) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url, json=payload) as resp:
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body


def _wrapper(workdir: Path, engine: str) -> Path:
    """An executable called like the engine's binary that runs its stub with this interpreter."""
    path = workdir / "bin" / engine
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STUBS_DIR / SCRIPTS[engine]}" "$@"\n')
    path.chmod(0o755)
    return path


@asynccontextmanager
async def stub_engines(workdir: Path) -> AsyncIterator[StartStub]:
    """Yield ``start(pool, model_path, ready=True)``; every stub and adapter is stopped on exit.

    ``start`` waits until the adapter reports ready, or with ``ready=False`` until ``/stub/stats``
    answers (it does while the stub is still "loading").
    """
    started: list[StubEngine] = []

    async def start(pool: PoolConfig, model_path: Path, ready: bool = True) -> StubEngine:
        binary = _wrapper(workdir, pool.engine)
        launch = engine_command(pool, str(binary), model_path, free_port(), free_port)
        proc = Proc(launch.argv, workdir / f"{pool.engine}-{launch.port}.log")
        stub = StubEngine(proc, launch, make_adapter(pool, launch, request_timeout_s=30))
        started.append(stub)

        async def up() -> bool:
            if not proc.alive():
                raise AssertionError(f"stub exited early ({proc.popen.returncode}):\n{proc.log_text()}")
            if ready:
                return (await stub.adapter.health()).ready
            try:
                await stub.stats()
            except aiohttp.ClientError:
                return False
            return True

        await wait_until(up, timeout_s=60, what=f"{pool.engine} stub on {launch.port}")
        return stub

    try:
        yield start
    finally:
        for stub in started:
            await stub.adapter.aclose()
            stub.proc.stop()


def request(prompt: str = "Say something about GPUs.", max_tokens: int = 8, **kw: Any) -> GenerateRequest:
    return GenerateRequest(task_id="t-1", prompt=prompt, max_tokens=max_tokens, seed=kw.pop("seed", 42), **kw)


async def collect(adapter: EngineAdapter, req: GenerateRequest) -> list[Token | Finished]:
    return [event async for event in adapter.stream(req)]


async def failure(
    adapter: EngineAdapter, req: GenerateRequest
) -> tuple[OrchestratorError, list[Token | Finished]]:
    seen: list[Token | Finished] = []
    with pytest.raises(OrchestratorError) as err:
        async for event in adapter.stream(req):
            seen.append(event)
    return err.value, seen
