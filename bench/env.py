"""The system under test: one Redis, one stack whose single pool is a many-slot mock engine, and (unless
``direct=False``) the same number of standalone mock engines with the same command line for the direct
baseline."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp

from llorch.adapters.launch import engine_command
from llorch.config import PoolConfig
from llorch_poolmgr.supervisor import resolve_binary
from tests.support.procs import Proc, free_port, http_ok, wait_until
from tests.support.redis_server import RedisServer
from tests.support.stack import MOCK_MODEL, Stack, mock_pool

from .cpu import Role

POOL_ID = "bench"
MODEL_REF = "mock-tiny"


@dataclass(frozen=True, slots=True)
class Layout:
    """The pool: ``replicas`` mock engines of ``slots`` slots each, paced at ``token_delay_ms``."""

    replicas: int = 8
    slots: int = 64
    token_delay_ms: float = 20.0
    queue_capacity: int = 4096

    def pool(self) -> dict[str, Any]:
        return mock_pool(
            POOL_ID,
            slots=self.slots,
            capacity=self.queue_capacity,
            args=["--token-delay-ms", f"{self.token_delay_ms:g}"],
            replicas=self.replicas,
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "replicas": self.replicas,
            "slots_per_replica": self.slots,
            "token_delay_ms": self.token_delay_ms,
            "queue_capacity": self.queue_capacity,
        }


class BenchEnv:
    """Start with ``async with``; everything started is stopped on exit, also after a failure."""

    def __init__(self, workdir: Path, layout: Layout, direct: bool = True) -> None:
        self.workdir = workdir
        self.layout = layout
        self.with_direct = direct
        self.redis: RedisServer | None = None
        self.stack: Stack | None = None
        self.direct: list[Proc] = []
        self.direct_urls: list[str] = []

    async def __aenter__(self) -> BenchEnv:
        try:
            await self._start()
        except BaseException:
            self.stop()
            raise
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    async def _start(self) -> None:
        self.redis = RedisServer(self.workdir / "redis")
        self.stack = Stack(self.workdir / "stack", self.redis.url, pools=[self.layout.pool()])
        await self.stack.start(ready=False)
        pool = PoolConfig.model_validate(self.layout.pool())
        binary = resolve_binary(pool.effective_engine_bin)
        for index in range(self.layout.replicas if self.with_direct else 0):
            port = free_port()
            argv = list(engine_command(pool, binary, MOCK_MODEL, port, free_port).argv)
            self.direct.append(Proc(argv, self.workdir / f"direct-{index}.log"))
            self.direct_urls.append(f"http://127.0.0.1:{port}")
        await self.stack.wait_ready(timeout_s=90)
        for url in self.direct_urls:
            await wait_until(partial(http_ok, f"{url}/health"), 60, f"direct engine {url}")
        await wait_until(self._all_replicas_ready, 90, "every replica of the pool to be Ready")

    def stop(self) -> None:
        for proc in self.direct:
            proc.stop()
        self.direct.clear()
        if self.stack is not None:
            self.stack.stop()
        if self.redis is not None:
            self.redis.stop()

    def cpu_roles(self) -> tuple[Role, ...]:
        """The processes whose CPU time P9 accounts, by role: the gateway with its workers (children,
        ``api.workers`` > 1), the scheduler, the pool manager without its engines, the engines it
        spawned, Redis, the direct engines and this process (the load generator)."""
        procs = self.the_stack.procs
        roles = [
            Role("gateway", (procs["gateway"].pid,), "tree"),
            Role("scheduler", (procs["scheduler"].pid,)),
            Role("pool manager", (procs["pool-manager"].pid,)),
            Role("engines", (procs["pool-manager"].pid,), "children"),
        ]
        server = getattr(self.redis, "_server", None)
        if server is not None and server.proc is not None:
            roles.append(Role("redis", (server.proc.pid,)))
        if self.direct:
            roles.append(Role("direct engines", tuple(proc.pid for proc in self.direct)))
        roles.append(Role("load generator", (os.getpid(),)))
        return tuple(roles)

    @property
    def the_stack(self) -> Stack:
        assert self.stack is not None, "BenchEnv is not started"
        return self.stack

    async def _pool(self) -> dict[str, Any]:
        stack = self.the_stack
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{stack.url}/v1/pools/{POOL_ID}/health", headers=stack.headers) as resp,
        ):
            resp.raise_for_status()
            body: dict[str, Any] = await resp.json()
            return body

    async def _all_replicas_ready(self) -> bool:
        pool = await self._pool()
        replicas = pool["replicas"]
        return len(replicas) == self.layout.replicas and all(r["state"] == "Ready" for r in replicas)

    async def wait_idle(self, timeout_s: float = 60) -> None:
        """Wait until the pool runs nothing and every slot is free again."""
        total = self.layout.replicas * self.layout.slots

        async def idle() -> bool:
            metrics = (await self._pool())["metrics"]
            return bool(metrics["tasks_running"] == 0 and metrics["slots_free"] == total)

        await wait_until(idle, timeout_s, "the pool to be idle")

    async def set_pace(self, token_delay_ms: float) -> None:
        """Re-pace every engine, the pool's and the direct ones, through ``POST /mock/control``."""
        pool = await self._pool()
        urls = [f"http://127.0.0.1:{r['port']}" for r in pool["replicas"]] + self.direct_urls
        body = {"token_delay_ms": token_delay_ms}
        async with aiohttp.ClientSession() as session:

            async def one(url: str) -> None:
                async with session.post(f"{url}/mock/control", json=body) as resp:
                    resp.raise_for_status()

            await asyncio.gather(*(one(url) for url in urls))
