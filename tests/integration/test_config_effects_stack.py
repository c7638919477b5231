"""Effects of config keys that only a whole stack shows (issue 15, "No inert config").

One stack with non-default ``api.bind`` (127.0.0.2), ``api.probes_require_auth``, ``redis.key_prefix``,
``telemetry.log_level``, ``telemetry.log_file``, ``pools[].max_tokens_limit``, ``pools[].engine_bin``
and (the Stack's own) ``sse.heartbeat_s: 1``; ``tests/unit/test_config_keys.py`` names this test in its
table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aioredis
import yaml

from tests.support.procs import wait_until
from tests.support.stack import Client, mock_pool

PREFIX = "keys-test:"
MISSING_BIN = "/nonexistent/llorch-keys-test-engine"
FIRST_TOKEN_DELAY_MS = 4000  # silence on the stream: several 1 s heartbeats, none at the default 15 s


async def _raw_stream(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> list[str]:
    """Every line of a task's SSE stream, comments included, until the terminal frame."""
    lines: list[str] = []
    async with http.get(url, headers=headers) as r:
        assert r.status == 200, await r.text()
        async for raw in r.content:
            lines.append(raw.decode().rstrip("\n"))
            if lines[-1] in ("event: end", "event: error"):
                break
    return lines


async def _true_when(text: Any) -> bool:
    return bool(await text())


async def test_prefix_probe_auth_log_and_heartbeat_keys_take_effect(
    stack_factory: Any, http: aiohttp.ClientSession, redis_url: str, tmp_path: Path
) -> None:
    log_file = tmp_path / "logs" / "llorch.jsonl"
    stack = stack_factory(
        pools=[
            mock_pool(args=["--first-token-delay-ms", str(FIRST_TOKEN_DELAY_MS)], max_tokens_limit=16),
            mock_pool("mock-nobin", engine_bin=MISSING_BIN, restart={"initial_backoff_ms": 60_000}),
        ],
        extra={
            "redis": {"key_prefix": PREFIX},
            "api": {"probes_require_auth": True},
            "telemetry": {"log_level": "warning", "log_file": str(log_file)},
        },
    )
    # 127.0.0.2 is loopback, yet not one of the names the gateway treats as loopback: it logs a warning
    # at startup, which the log_level and log_file assertions below need.
    config = yaml.safe_load(stack.config_path.read_text())
    config["api"]["bind"] = f"127.0.0.2:{stack.api_port}"
    stack.config_path.write_text(yaml.safe_dump(config))
    stack.url = f"http://127.0.0.2:{stack.api_port}"
    await stack.start(ready=False)

    async def ready() -> bool:  # /readyz needs the token now
        try:
            async with http.get(f"{stack.url}/readyz", headers=stack.headers) as r:
                return r.status == 200
        except aiohttp.ClientError:
            return False

    await wait_until(ready, 60, "the stack to be ready")

    # api.probes_require_auth: the probes refuse a caller without a token.
    for probe in ("/metrics", "/healthz", "/readyz"):
        async with http.get(f"{stack.url}{probe}") as r:
            assert r.status == 401, probe
    async with http.get(f"{stack.url}/metrics", headers=stack.headers) as r:
        assert r.status == 200

    # sse.heartbeat_s: the wait for the first token is filled with heartbeat comments.
    task_id = await Client(stack, http).admit(max_tokens=2)
    lines = await _raw_stream(http, f"{stack.url}/v1/tasks/{task_id}/stream", stack.headers)
    assert lines[-1] == "event: end", lines
    first_token = lines.index("event: token")
    assert ": hb" in lines[:first_token], lines

    # pools[].max_tokens_limit: a task over the pool's limit (below its ctx) is refused.
    status, body, _ = await Client(stack, http).submit(max_tokens=17)
    assert status == 400 and body["code"] == "INVALID_PARAMS", body

    # pools[].engine_bin: the pool manager runs that binary (the default one, on PATH, serves the other
    # pool), so this pool cannot start. The error does not name the path yet, only the missing file.
    async def nobin_error() -> str:
        async with http.get(f"{stack.url}/v1/pools/mock-nobin/health", headers=stack.headers) as r:
            return json.dumps((await r.json()).get("last_error") or "")

    await wait_until(lambda: _true_when(nobin_error), 60, "mock-nobin to report its start failure")
    assert "FileNotFoundError" in await nobin_error()

    # redis.key_prefix: every key the three services wrote carries the prefix.
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [key.decode() async for key in client.scan_iter(count=1000)]
    finally:
        await client.aclose()
    assert keys and all(key.startswith(PREFIX) for key in keys), sorted(keys)[:20]

    # telemetry.log_file gets the services' records; telemetry.log_level keeps info records out of it
    # and out of stderr, although a task was admitted ("task admitted" is an info record).
    records = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    assert any(r.get("event") == "bind_public" for r in records), records
    assert all(r.get("level") not in ("debug", "info") for r in records), records
    assert "admission_accepted" not in stack.logs()
