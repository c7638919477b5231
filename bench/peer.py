"""The peer proxy of P5: LiteLLM from PyPI, installed into a virtual environment of its own (never the
project's) and run as ``litellm --config <yaml>`` in front of one mock engine.

The environment is ``~/.cache/llorch/bench-litellm-venv`` (``LLORCH_BENCH_LITELLM_VENV`` moves it),
made with ``python -m venv`` and filled with ``pip install <spec>``; a marker file holding the spec
lets later runs reuse it. ``LLORCH_BENCH_LITELLM_SPEC`` replaces the pinned spec, for when the pinned
release cannot be installed from the index at hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import yaml

from tests.support.procs import Proc, free_port, wait_until

# The newest release whose [proxy] extra installs from this index: 1.110.2's pins litellm-proxy==1.110.2
# and two .post releases the index lacks (2026-12-04). LLORCH_BENCH_LITELLM_SPEC overrides it.
LITELLM_SPEC = "litellm[proxy]==1.108.7"
SPEC_ENV = "LLORCH_BENCH_LITELLM_SPEC"
VENV_ENV = "LLORCH_BENCH_LITELLM_VENV"
DEFAULT_VENV = Path.home() / ".cache" / "llorch" / "bench-litellm-venv"
MARKER = "llorch-installed-spec.txt"
INSTALL_TIMEOUT_S = 900.0
START_TIMEOUT_S = 150.0

# What the proxy runs with. LiteLLM refuses to start without a master key, so it gets one and the
# client sends it, as the stack's token; checked in memory, there is no database. The rest is off by
# default in a plain install already (no DATABASE_URL, no callbacks, no cache, one worker); LITELLM_LOG
# keeps the per-request log quiet and the local cost map spares a start-up fetch that cannot succeed here.
PROXY_ENV = {"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}


@dataclass(frozen=True, slots=True)
class Install:
    """The outcome of making sure LiteLLM is installed: where, which version, or why not."""

    spec: str
    venv: Path
    version: str | None
    seconds: float
    reused: bool
    error: str | None = None

    @property
    def executable(self) -> Path:
        return self.venv / "bin" / "litellm"

    def as_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "venv": str(self.venv),
            "version": self.version,
            "install_s": round(self.seconds, 1),
            "reused": self.reused,
            "error": self.error,
        }


async def _run(argv: list[str], timeout_s: float) -> tuple[int, str]:
    """Run ``argv``; its exit status and output (-1 and a note when it ran past ``timeout_s``)."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return -1, f"{argv[0]} ran past {timeout_s:g} s"
    return proc.returncode or 0, out.decode(errors="replace")


def _why(output: str) -> str:
    """pip's own reason for a failure: its ERROR lines (its many index warnings say nothing)."""
    errors = [line.strip() for line in output.splitlines() if line.startswith("ERROR")]
    return " ".join(errors[-3:]) or output.strip()[-400:]


def _plan(venv: Path, spec: str) -> tuple[bool, list[list[str]]]:
    """Whether the environment already holds ``spec``; else the commands that install it."""
    marker = venv / MARKER
    if marker.exists() and marker.read_text().strip() == spec and (venv / "bin" / "litellm").exists():
        return True, []
    marker.unlink(missing_ok=True)
    python = venv / "bin" / "python"
    steps = [] if python.exists() else [[sys.executable, "-m", "venv", str(venv)]]
    steps.append([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", spec])
    return False, steps


async def install_litellm(spec: str | None = None, venv: Path | None = None) -> Install:
    """Reuse the environment when it holds ``spec``, else (re)install; never raises for a failed
    install, it comes back as ``Install.error``."""
    spec = spec or os.environ.get(SPEC_ENV) or LITELLM_SPEC
    venv = venv or Path(os.environ.get(VENV_ENV) or DEFAULT_VENV)
    python = str(venv / "bin" / "python")
    started = time.monotonic()
    reused, steps = _plan(venv, spec)
    for argv in steps:
        code, output = await _run(argv, INSTALL_TIMEOUT_S)
        if code != 0:
            seconds = time.monotonic() - started
            return Install(spec, venv, None, seconds, False, f"`{' '.join(argv[2:])}`: {_why(output)}")
    code, output = await _run(
        [python, "-c", "import importlib.metadata as m; print(m.version('litellm'))"], 60
    )
    seconds = time.monotonic() - started
    if code != 0:
        return Install(spec, venv, None, seconds, reused, f"litellm does not import: {_why(output)}")
    (venv / MARKER).write_text(spec + "\n")
    return Install(spec, venv, output.strip().splitlines()[-1], seconds, reused)


class LiteLLMProxy:
    """``litellm --config`` on a free port with one model, ``openai/<model>`` at ``upstream/v1``.

    Start with ``async with``; the process is stopped on exit, also after a failure to start.
    """

    def __init__(self, install: Install, workdir: Path, upstream: str, model: str) -> None:
        self.install = install
        self.workdir = workdir
        self.upstream = upstream
        self.model = model
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = "sk-" + secrets.token_hex(24)
        self.proc: Proc | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def config(self) -> dict[str, Any]:
        params = {"model": f"openai/{self.model}", "api_base": f"{self.upstream}/v1", "api_key": "dummy"}
        return {"model_list": [{"model_name": self.model, "litellm_params": params}]}

    async def __aenter__(self) -> LiteLLMProxy:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "litellm.yaml"
        config.write_text(yaml.safe_dump(self.config()))
        argv = [str(self.install.executable), "--config", str(config)]
        argv += ["--host", "127.0.0.1", "--port", str(self.port), "--num_workers", "1"]
        self.proc = Proc(argv, self.workdir / "litellm.log", {**PROXY_ENV, "LITELLM_MASTER_KEY": self.key})
        try:
            await wait_until(self._alive, START_TIMEOUT_S, "the LiteLLM proxy to answer")
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def _alive(self) -> bool:
        proc = self.proc
        if proc is not None and not proc.alive():
            raise RuntimeError(f"the LiteLLM proxy exited: {proc.log_text()[-1500:]}")
        return await _answers(f"{self.url}/health/liveliness")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


async def _answers(url: str) -> bool:
    try:
        timeout = aiohttp.ClientTimeout(total=5)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
            return resp.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False
