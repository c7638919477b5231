"""A real Redis-protocol server for tests: the same server `llorch up` embeds, without persistence."""

from __future__ import annotations

from pathlib import Path

from llorch_cli.embedded_redis import EmbeddedRedis


class RedisServer:
    def __init__(self, workdir: Path, password: str | None = None) -> None:
        """``password``: the server requires it (``requirepass``)."""
        self._server = EmbeddedRedis(workdir, appendonly=False, password=password)
        self._server.start()
        self.port = self._server.port
        self.url = self._server.url

    def stop(self) -> None:
        self._server.stop()
