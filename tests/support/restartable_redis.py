"""A Redis server with AOF whose lifecycle a test controls: SIGKILL it and start it again on the same
port and data directory, so the services reconnect to the same URL and the data survives."""

from __future__ import annotations

import signal
from pathlib import Path

import redis.asyncio as aioredis

from llorch_cli.embedded_redis import server_binary
from tests.support.procs import Proc, free_port, wait_until


async def wait_answering(proc: Proc, url: str) -> None:
    """Wait until the Redis server ``proc`` answers PING at ``url``; fail at once if it exits."""

    async def pong() -> bool:
        if not proc.alive():
            raise AssertionError(f"redis exited at start:\n{proc.log_text()[-2000:]}")
        client = aioredis.Redis.from_url(url, socket_connect_timeout=0.5)
        try:
            return bool(await client.ping())
        except aioredis.RedisError:
            return False
        finally:
            await client.aclose()

    await wait_until(pong, 30, f"redis at {url}")


class RestartableRedis:
    """A Redis server with AOF whose lifecycle the test controls (same port and data dir on restart)."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Proc | None = None
        self.starts = 0

    def _argv(self) -> list[str]:
        return [
            server_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            "--logfile",
            "",
        ]

    async def start(self) -> None:
        self.starts += 1
        self.proc = Proc(self._argv(), self.dir / f"server-{self.starts}.log")
        await wait_answering(self.proc, self.url)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill(signal.SIGKILL)
        self.proc.popen.wait(10)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
