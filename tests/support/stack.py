"""The whole stack as real processes on free ports: scheduler, pool manager(s), gateway, mock engines.

Tests talk to it only over HTTP, like a client would. Redis is the session's real server.
"""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from llorch import gpu
from llorch.config import load_config
from llorch_poolmgr.topology import manager_args, plan_managers

from .events_schema import check_event
from .procs import Proc, free_port, python_module, wait_until

ROOT = Path(__file__).resolve().parents[2]
MOCK_MODEL = ROOT / "tests" / "fixtures" / "mock-model.bin"


def _free_ports(offsets: Sequence[int], taken: set[int]) -> int:
    """A port p with p+o free for every o and none of them in `taken` (which then holds them).

    Pool manager n uses base+n and its metrics base+10+n; `taken` keeps one stack's ports distinct,
    since the OS may hand out a just-released port again.
    """
    for _ in range(200):
        port = free_port()
        wanted = {port + offset for offset in offsets}
        if max(wanted) > 65535 or wanted & taken:
            continue
        probes: list[socket.socket] = []
        try:
            for candidate in wanted:
                probe = socket.socket()
                probes.append(probe)
                probe.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        taken |= wanted
        return port
    raise RuntimeError("no free port range")


MANAGERS = 4  # room for this many pool managers per stack


def mock_pool(
    pool_id: str = "mock-a", slots: int = 1, capacity: int = 16, args: Sequence[str] = (), **extra: Any
) -> dict[str, Any]:
    return {
        "id": pool_id,
        "engine": "mock",
        "model": "mock-tiny",
        "devices": "cpu",
        "ctx": 2048,
        "slots": slots,
        "engine_args": ["--token-delay-ms", "5", *args],
        "queue": {"capacity": capacity, "full_policy": "reject"},
        **extra,
    }


@dataclass(frozen=True)
class SseEvent:
    id: int
    event: str
    data: dict[str, Any]


class Stack:
    def __init__(
        self,
        workdir: Path,
        redis_url: str,
        pools: list[dict[str, Any]],
        models: list[dict[str, Any]] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.token = secrets.token_urlsafe(24)
        taken: set[int] = set()
        self.api_port = _free_ports([0], taken)
        self.url = f"http://127.0.0.1:{self.api_port}"
        config: dict[str, Any] = {
            "version": 1,
            "state_dir": str(workdir / "state"),
            "api": {"bind": f"127.0.0.1:{self.api_port}", "max_body_bytes": 65536},
            "grpc": {
                "scheduler": f"127.0.0.1:{_free_ports([0], taken)}",
                "pool_manager_base_port": _free_ports(range(MANAGERS), taken),
                # +0 scheduler, +1 the supervisor of `llorch up`, +10.. pool managers
                "metrics_base_port": _free_ports([0, 1, *range(10, 10 + MANAGERS)], taken),
            },
            "redis": {"url": redis_url},
            "sse": {"heartbeat_s": 1, "retention_s": 60, "queued_metrics_interval_ms": 1000},
            "catalog": {"models": models or [{"id": "mock-tiny", "path": str(MOCK_MODEL)}]},
            "pools": pools,
            "telemetry": {"log_level": "info"},
        }
        for key, value in (extra or {}).items():  # one level deep: extra api keys keep the bind
            config[key] = {**config[key], **value} if isinstance(config.get(key), dict) else value
        self.config_path = workdir / "llorch.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.env = {"LLORCH_API_TOKEN": self.token, "LLORCH_INTERNAL_TOKEN": secrets.token_urlsafe(24)}
        self.procs: dict[str, Proc] = {}

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _spawn(
        self, name: str, *args: str, config: Path | None = None, env: dict[str, str] | None = None
    ) -> Proc:
        argv = python_module("llorch_cli.main", *args, "--config", str(config or self.config_path))
        proc = Proc(argv, self.workdir / f"{name}.log", {**self.env, **(env or {})})
        self.procs[name] = proc
        return proc

    def start_scheduler(self, args: Sequence[str] = ()) -> Proc:
        """The scheduler (again, after a test killed it)."""
        return self._spawn("scheduler", "scheduler", *args)

    def start_pool_manager(
        self,
        args: Sequence[str] = ("--index", "0"),
        name: str = "pool-manager",
        config: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> Proc:
        """A pool manager with ``args`` (default: index 0, the local pools) on the stack's config, or on
        ``config`` (another host's copy of it); ``env`` adds to the stack's environment."""
        return self._spawn(name, "pool-manager", *args, config=config, env=env)

    def start_pool_managers(self) -> None:
        """One pool manager per device mask plus one for CPU pools, planned as `llorch up` plans them."""
        cfg = load_config(self.config_path)
        probe = gpu.open_probe(cfg.telemetry, cfg.state_dir)
        for plan in plan_managers(cfg, probe.devices()):
            self._spawn(f"pool-manager-{plan.name}", *manager_args(plan))
        probe.close()

    async def start(
        self, ready: bool = True, per_device: bool = False, scheduler_args: Sequence[str] = ()
    ) -> None:
        self.start_scheduler(scheduler_args)
        if per_device:
            self.start_pool_managers()
        else:
            self.start_pool_manager()
        self._spawn("gateway", "gateway")
        if ready:
            await self.wait_ready()

    async def wait_ready(self, timeout_s: float = 60) -> None:
        async def ready() -> bool:
            for name, proc in self.procs.items():
                if not proc.alive():
                    raise AssertionError(f"{name} exited:\n{proc.log_text()[-3000:]}")
            try:
                async with aiohttp.ClientSession() as s, s.get(f"{self.url}/readyz") as r:
                    return r.status == 200
            except aiohttp.ClientError:
                return False

        await wait_until(ready, timeout_s, "the stack to be ready")

    async def wait_pools_ready(self, *pool_ids: str, timeout_s: float = 60) -> None:
        """Until each named pool is Ready (``wait_ready`` needs only one pool of the stack)."""

        async def ready() -> bool:
            async with aiohttp.ClientSession(headers=self.headers) as s:
                for pool_id in pool_ids:
                    async with s.get(f"{self.url}/v1/pools/{pool_id}/health") as r:
                        if r.status != 200 or (await r.json())["state"] != "Ready":
                            return False
            return True

        await wait_until(ready, timeout_s, f"pools {', '.join(pool_ids)} to be Ready")

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()

    def logs(self) -> str:
        return "".join(p.log_text() for p in self.procs.values())


class Client:
    """A thin HTTP client of the public API for tests."""

    def __init__(self, stack: Stack, session: aiohttp.ClientSession) -> None:
        self.stack = stack
        self.session = session

    async def submit(self, **body: Any) -> tuple[int, dict[str, Any], Any]:
        body.setdefault("model_ref", "mock-tiny")
        body.setdefault("prompt", "hello")
        async with self.session.post(
            f"{self.stack.url}/v1/tasks", json=body, headers=self.stack.headers
        ) as r:
            return r.status, await r.json(), r.headers

    async def admit(self, **body: Any) -> str:
        status, payload, _ = await self.submit(**body)
        assert status == 202, payload
        return str(payload["task_id"])

    async def cancel(self, task_id: str) -> int:
        url = f"{self.stack.url}/v1/tasks/{task_id}/cancel"
        async with self.session.post(url, headers=self.stack.headers) as r:
            return r.status

    async def status(self, task_id: str) -> dict[str, Any]:
        async with self.session.get(f"{self.stack.url}/v1/tasks/{task_id}", headers=self.stack.headers) as r:
            assert r.status == 200, await r.text()
            return dict(await r.json())

    async def events(self, task_id: str, last_event_id: int | None = None) -> list[SseEvent]:
        return [e async for e in self.follow(task_id, last_event_id)]

    async def follow(self, task_id: str, last_event_id: int | None = None) -> AsyncIterator[SseEvent]:
        headers = dict(self.stack.headers)
        if last_event_id is not None:
            headers["Last-Event-ID"] = str(last_event_id)
        url = f"{self.stack.url}/v1/tasks/{task_id}/stream"
        async with self.session.get(url, headers=headers) as r:
            assert r.status == 200, await r.text()
            async for frame in sse_frames(r.content):
                yield frame


async def sse_frames(content: aiohttp.StreamReader) -> AsyncIterator[SseEvent]:
    """Parse SSE frames strictly: each frame is id/event/data lines; comments are heartbeats."""
    fields: dict[str, str] = {}
    async for raw in content:
        line = raw.decode().rstrip("\n")
        if line.startswith(":"):
            continue
        if line == "":
            if fields:
                data = json.loads(fields["data"])
                check_event(fields["event"], data)
                yield SseEvent(int(fields["id"]), fields["event"], data)
                fields = {}
            continue
        key, _, value = line.partition(": ")
        assert key in ("id", "event", "data") and key not in fields, f"bad SSE line {line!r}"
        fields[key] = value
