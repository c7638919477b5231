"""Fixtures for the end-to-end tests against the real llama-server.

``make e2e`` / ``make test`` build llama-server and fetch the model, then pass them in
``LLORCH_LLAMA_SERVER`` and ``LLORCH_MODEL_GGUF``. Without them the tests skip, except where E2E is
required (``CI`` set, or ``LLORCH_REQUIRE_E2E=1``): there they fail, so a CI run cannot go green
without the real engine.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from llorch.adapters.llamacpp import LlamaCppAdapter
from tests.support.procs import Proc, free_port, wait_until

_FALSE = ("", "0", "false", "no")


def _e2e_required() -> bool:
    return os.environ.get("CI", "").lower() not in _FALSE or os.environ.get("LLORCH_REQUIRE_E2E") == "1"


def _path_from_env(name: str, what: str) -> Path:
    value = os.environ.get(name, "")
    if not value:
        message = f"{name} is not set (path to {what}); run `make e2e`, which builds and sets it"
        if _e2e_required():
            pytest.fail(f"{message}. E2E is required here (CI or LLORCH_REQUIRE_E2E=1).", pytrace=False)
        pytest.skip(message)
    path = Path(value).resolve()
    if not path.is_file():
        pytest.fail(f"{name}={value} does not name a file ({what})", pytrace=False)
    return path


@pytest.fixture(scope="session")
def llama_server_bin() -> Path:
    return _path_from_env("LLORCH_LLAMA_SERVER", "the llama-server binary")


@pytest.fixture(scope="session")
def model_gguf() -> Path:
    return _path_from_env("LLORCH_MODEL_GGUF", "a GGUF model, e.g. SmolLM2-135M-Instruct")


@dataclass
class LlamaServer:
    proc: Proc
    url: str
    model: Path


@pytest.fixture
async def llama_server(
    llama_server_bin: Path, model_gguf: Path, tmp_path: Path
) -> AsyncIterator[LlamaServer]:
    """A real llama-server on a free port, one slot, deterministic flags; waits until the port answers."""
    port = free_port()
    (tmp_path / "slots").mkdir()
    argv = [str(llama_server_bin), "-m", str(model_gguf), "--host", "127.0.0.1", "--port", str(port)]
    argv += [
        "-c",
        "2048",
        "--threads",
        "2",
        "--parallel",
        "1",
        "--no-cont-batching",
        "--metrics",
        "--no-webui",
        "--slot-save-path",
        str(tmp_path / "slots"),
    ]
    proc = Proc(argv, tmp_path / "llama-server.log")
    server = LlamaServer(proc, f"http://127.0.0.1:{port}", model_gguf)

    async def answers() -> bool:
        if not proc.alive():
            raise AssertionError(f"llama-server exited ({proc.popen.returncode}):\n{proc.log_text()[-4000:]}")
        try:
            async with aiohttp.ClientSession() as session, session.get(f"{server.url}/health") as resp:
                return resp.status in (200, 503)
        except aiohttp.ClientError:
            return False

    try:
        await wait_until(answers, timeout_s=120, what="llama-server to open its port")
        yield server
    finally:
        proc.stop()


@pytest.fixture
async def ready_adapter(llama_server: LlamaServer) -> AsyncIterator[LlamaCppAdapter]:
    """An adapter for ``llama_server`` once its model is loaded."""
    async with LlamaCppAdapter(llama_server.url, request_timeout_s=30) as adapter:

        async def ready() -> bool:
            return (await adapter.health()).ready

        await wait_until(ready, timeout_s=120, what="llama-server to load the model")
        yield adapter
