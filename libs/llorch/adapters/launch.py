"""Every engine's command line and adapter, in one place (SPEC §8 "Launch" lines, §7 ``pools[]``).

:func:`engine_command` plans one replica's launch and returns a :class:`Launch`: the argv plus what the
adapter must know about it (the API port, Triton's separate metrics port, the served model name).
:func:`make_adapter` turns a pool and that plan into the pool's :class:`EngineAdapter`. The default
binary per engine is :attr:`llorch.config.PoolConfig.effective_engine_bin`. ``pool.engine_args`` are
appended last; config validation has already rejected the flags managed here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from llorch.adapters._http import DEFAULT_REQUEST_TIMEOUT_S
from llorch.adapters.base import EngineAdapter
from llorch.adapters.llamacpp import LlamaCppAdapter
from llorch.adapters.openai import OpenAIAdapter
from llorch.adapters.tgi import TgiAdapter
from llorch.adapters.triton import TritonAdapter
from llorch.config import PoolConfig

LOOPBACK = "127.0.0.1"


@dataclass(frozen=True, slots=True)
class Launch:
    """One planned engine start.

    ``argv`` is the full command line (binary first); ``port`` the HTTP API port on loopback;
    ``metrics_port`` Triton's ``--metrics-port`` (None for engines that serve ``/metrics`` on the API
    port); ``model_path`` the model (Triton: the model repository) as passed on the command line, which
    vLLM also uses as the served model name.
    """

    argv: tuple[str, ...]
    port: int
    model_path: str
    metrics_port: int | None = None

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def metrics_url(self) -> str:
        """Where this engine's Prometheus text is: the metrics port for Triton, else the API port."""
        port = self.port if self.metrics_port is None else self.metrics_port
        return f"http://{LOOPBACK}:{port}/metrics"


def engine_command(
    pool: PoolConfig,
    binary: str,
    model_path: Path,
    port: int,
    free_port: Callable[[], int],
    *,
    gpus: list[int] | None = None,
    slots_dir: Path | None = None,
) -> Launch:
    """Plan the launch of one replica of ``pool`` listening on ``port``.

    ``free_port`` is called only for engines that need more ports (Triton's gRPC and metrics ports).
    ``gpus`` is the replica's resolved device mask when the pool says ``devices: auto``; ``slots_dir``
    lets llama-server erase a slot's KV (it refuses ``action=erase`` without ``--slot-save-path``).
    """
    path = str(model_path)
    extra = list(pool.engine_args)
    if gpus is None and isinstance(pool.devices, list):
        gpus = list(pool.devices)
    if pool.engine in ("llamacpp", "mock"):
        argv = _llama_server(pool, binary, path, port, gpus)
        if slots_dir is not None and pool.engine == "llamacpp":
            argv += ["--slot-save-path", str(slots_dir)]
        return Launch((*argv, *extra), port, path)
    if pool.engine == "vllm":
        argv = [binary, "serve", path, "--host", LOOPBACK, "--port", str(port)]
        argv += ["--max-model-len", str(pool.ctx), "--max-num-seqs", str(pool.slots)]
        if gpus and len(gpus) > 1:
            argv += ["--tensor-parallel-size", str(len(gpus))]
        return Launch((*argv, *extra), port, path)
    if pool.engine == "tgi":
        argv = [binary, "--model-id", path, "--hostname", LOOPBACK, "--port", str(port)]
        argv += ["--max-total-tokens", str(pool.ctx), "--max-concurrent-requests", str(pool.slots)]
        if gpus and len(gpus) > 1:
            argv += ["--num-shard", str(len(gpus))]
        return Launch((*argv, *extra), port, path)
    if pool.engine == "triton":
        grpc_port, metrics_port = free_port(), free_port()
        argv = [binary, "--model-repository", path, "--http-address", LOOPBACK, "--http-port", str(port)]
        argv += ["--grpc-port", str(grpc_port), "--metrics-port", str(metrics_port)]
        return Launch((*argv, *extra), port, path, metrics_port=metrics_port)
    raise ValueError(f"unknown engine {pool.engine!r}")


def make_adapter(
    pool: PoolConfig,
    launch: Launch,
    *,
    session: aiohttp.ClientSession | None = None,
    request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S,
) -> EngineAdapter:
    """The adapter for a replica of ``pool`` started from ``launch`` (the mock speaks llama-server)."""
    url = launch.base_url
    if pool.engine in ("llamacpp", "mock"):
        return LlamaCppAdapter(url, session=session, request_timeout_s=request_timeout_s)
    if pool.engine == "vllm":
        return OpenAIAdapter(
            url,
            launch.model_path,
            slots_total=pool.slots,
            ctx=pool.ctx,
            session=session,
            request_timeout_s=request_timeout_s,
        )
    if pool.engine == "tgi":
        return TgiAdapter(
            url,
            slots_total=pool.slots,
            ctx=pool.ctx,
            model_path=launch.model_path,
            session=session,
            request_timeout_s=request_timeout_s,
        )
    if pool.engine == "triton":
        return TritonAdapter.from_options(
            url,
            pool.adapter,
            metrics_url=launch.metrics_url,
            slots_total=pool.slots,
            ctx=pool.ctx,
            model_path=launch.model_path,
            session=session,
            request_timeout_s=request_timeout_s,
        )
    raise ValueError(f"unknown engine {pool.engine!r}")


def _llama_server(
    pool: PoolConfig, binary: str, model_path: str, port: int, gpus: list[int] | None
) -> list[str]:
    """llama-server's command line (the mock engine accepts the same flags)."""
    argv = [
        binary,
        "-m",
        model_path,
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "-c",
        str(pool.ctx * pool.slots),
        "--parallel",
        str(pool.slots),
        "--metrics",
        "--no-webui",
        "--alias",
        pool.id,
    ]
    if pool.slots == 1:
        argv.append("--no-cont-batching")
    if gpus:
        argv += ["-ngl", "999"]
        if pool.tensor_split:
            argv += ["-ts", ",".join(f"{share:g}" for share in pool.tensor_split)]
    if "embedding" in pool.workloads:
        argv.append("--embedding")
    return argv
