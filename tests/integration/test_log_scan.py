"""No token reaches a log (SPEC §5.10, ORCH-3037b): a stack serves requests that carry the API token,
wrong tokens and both in hostile places (query strings, paths, bodies, prompts, other headers, the
fetch tool's headers and URL), then every file its processes wrote is scanned for each of them."""

from __future__ import annotations

import secrets
from typing import Any

import aiohttp

from tests.support.log_scan import assert_no_secrets, find_secrets
from tests.support.stack import Client, mock_pool


async def _drive(stack: Any, http: aiohttp.ClientSession, wrong: str) -> int:
    """Requests with secrets in every place a client can put one; returns how many were sent."""
    url, good = stack.url, stack.token
    auth = {"Authorization": f"Bearer {good}"}
    sent = 0

    async def call(method: str, path: str, headers: dict[str, str], **kwargs: Any) -> None:
        nonlocal sent
        async with http.request(method, url + path, headers=headers, **kwargs) as response:
            await response.read()
            sent += 1

    for headers in (
        {"Authorization": f"Bearer {wrong}"},
        {"Authorization": f"Basic {good}"},
        {"Authorization": f"Token {good}"},
        {"Authorization": f"Bearer {good} trailing"},
        {"Authorization": f"Bearer {wrong}\u00e9".encode().decode("latin-1")},
        {"X-API-Key": wrong},
        {"Cookie": f"llorch={good}", "X-Forwarded-Authorization": f"Bearer {good}"},
        {"Proxy-Authorization": f"Bearer {good}"},
    ):
        await call("GET", "/v1/pools", headers)
        await call("POST", "/v1/tasks", headers, json={"model_ref": "mock-tiny", "prompt": good})
    for path in (
        f"/v1/pools?token={good}",
        f"/v1/tasks?api_key={good}&limit=5",
        f"/v1/tasks/{good}",
        f"/v1/sessions/{good}",
        f"/v1/pools/{good}/health",
        f"/v1/catalog/models/{good}",
        f"/{good}",
        f"/healthz?token={good}",
        f"/v1/tasks/{wrong}/stream?last_event_id={good}",
    ):
        await call("GET", path, auth)
        await call("GET", path, {})
    bodies: list[tuple[str, dict[str, Any]]] = [
        ("/v1/tasks", {"model_ref": "mock-tiny", "prompt": f"say {good}", "max_tokens": 4}),
        ("/v1/tasks", {"model_ref": "mock-tiny", "prompt": "x", good: good}),
        ("/v1/tasks", {"model_ref": "mock-tiny", "inputs": [good, wrong], "workload": "embedding"}),
        ("/v1/chat/completions", {"model": "mock-tiny", "messages": [{"role": "user", "content": good}]}),
        ("/v1/completions", {"model": "mock-tiny", "prompt": good, "max_tokens": 4}),
        (
            "/v1/messages",
            {"model": "mock-tiny", "max_tokens": 4, "messages": [{"role": "user", "content": good}]},
        ),
        ("/v1/responses", {"model": "mock-tiny", "input": good, "max_output_tokens": 4}),
        ("/v1/pools/mock-a/reload", {"new_model_ref": good[:20]}),
        ("/v1/policy/evaluate", {"url": f"https://user:{good}@example.com/?key={good}"}),
        (
            "/v1/tools/http-fetch",
            {
                "url": f"http://127.0.0.1:1/?token={good}",
                "headers": {"Authorization": f"Bearer {good}", "X-API-Key": good},
                "body": good,
            },
        ),
    ]
    for path, body in bodies:
        await call("POST", path, auth, json=body)
        await call("POST", path, {"Authorization": f"Bearer {wrong}"}, json=body)
    return sent


async def test_no_token_in_any_log(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    # debug: the most verbose logs the gateway writes; prompts stay unlogged (log_prompts false).
    stack = stack_factory(pools=[mock_pool()], extra={"telemetry": {"log_level": "debug"}})
    await stack.start()
    wrong = secrets.token_urlsafe(24)
    sent = await _drive(stack, http, wrong)
    client = Client(stack, http)
    task_id = await client.admit(prompt=f"echo {stack.token}", max_tokens=4)
    events = await client.events(task_id)  # a whole task: admission, dispatch, tokens, end
    assert events[-1].event == "end", events[-1]
    stack.stop()
    # The scan can find what it looks for: the gateway's log names requests it refused.
    assert find_secrets(stack.workdir, ["auth_failed" + "_" * 32]) == []
    assert "auth_failed" in (stack.workdir / "gateway.log").read_text()
    scanned = assert_no_secrets(stack, extra=[wrong])
    assert sent > 50 and scanned > 0
