"""behave hooks: every scenario gets a fresh Redis server, an event loop and an HTTP session.

The stack itself is started by the scenario's first Given step, because each journey needs its own pool
shape (slots, queue capacity, token delay). Whatever was started is stopped in after_scenario; a failed
scenario prints the tail of the service logs.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # so that `import tests.support...` works under behave

from tests.support.redis_server import RedisServer  # noqa: E402


async def _open_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))


def before_scenario(context: Any, scenario: Any) -> None:
    context.workdir = Path(tempfile.mkdtemp(prefix="llorch-bdd-"))
    context.loop = asyncio.new_event_loop()
    context.redis = RedisServer(context.workdir / "redis")
    context.stack = None
    context.streams = []
    context.http = context.loop.run_until_complete(_open_session())


async def _close(context: Any) -> None:
    for stream in context.streams:
        await stream.aclose()
    await context.http.close()


def after_scenario(context: Any, scenario: Any) -> None:
    try:
        context.loop.run_until_complete(_close(context))
        context.loop.close()
    finally:
        if context.stack is not None:
            if scenario.status == "failed":
                print(context.stack.logs()[-6000:])
            context.stack.stop()
        context.redis.stop()
        shutil.rmtree(context.workdir, ignore_errors=True)
