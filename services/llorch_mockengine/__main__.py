"""``llorch-mock-engine`` / ``python -m llorch_mockengine``: the composition root of the mock engine."""

from __future__ import annotations

import asyncio
import faulthandler
import logging
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from llorch_mockengine.app import build_app
from llorch_mockengine.engine import Engine
from llorch_mockengine.knobs import Knobs, parse_args

log = logging.getLogger("llorch_mockengine")

# Hanging streams must not hold shutdown up: SIGTERM exits about as fast as llama-server's (≈1 s).
_SHUTDOWN_TIMEOUT_S = 0.5


async def serve(knobs: Knobs) -> int:
    """Listen at once (the port opens before the "model" loads, like llama-server), then load."""
    engine = Engine(knobs)
    runner = web.AppRunner(
        build_app(engine), handler_cancellation=True, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    exit_code = 0
    try:
        site = web.TCPSite(runner, knobs.host, knobs.port, backlog=1024, reuse_address=True)
        await site.start()
        log.info("server is listening on http://%s:%d", knobs.host, knobs.port)
        load = asyncio.create_task(engine.load())
        stop_wait = asyncio.create_task(stop.wait())
        await asyncio.wait({load, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if load.done() and not load.result():
            exit_code = 1
        else:
            await stop_wait
        load.cancel()
        stop_wait.cancel()
    finally:
        await runner.cleanup()
    return exit_code


def main(argv: Sequence[str] | None = None) -> None:
    parsed = parse_args(argv)
    if isinstance(parsed, str):
        print(parsed)
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # A fatal signal (a SIGSEGV was seen once under heavy load) prints every thread's Python stack to
    # stderr, which the pool manager keeps in the engine's log.
    faulthandler.enable()
    try:
        import uvloop
    except ImportError:
        sys.exit(asyncio.run(serve(parsed)))
    sys.exit(uvloop.run(serve(parsed)))


if __name__ == "__main__":
    main()
