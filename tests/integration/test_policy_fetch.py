"""The policy hook and http-fetch on the real stack (SPEC §2.3, §5.9): hostile URLs and redirect chains
to loopback are refused with the reason checked, an explicitly allowed host is fetched, plugins load
from a distribution on the gateway's path, decisions are logged (redacted) and counted, and bad input
gets the error envelope."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import free_port
from tests.support.stack import Stack, mock_pool

LAB = "127.0.0.2"  # the "public-style" host the config allows by name; any 127/8 address is local


@dataclass
class Servers:
    sentinel_port: int  # on 127.0.0.1: must never see a request
    lab_port: int
    sentinel_hits: list[str] = field(default_factory=list)

    @property
    def lab(self) -> str:
        return f"http://{LAB}:{self.lab_port}"


@pytest.fixture
async def servers() -> AsyncIterator[Servers]:
    found = Servers(free_port(), free_port())

    async def sentinel(request: web.Request) -> web.Response:
        found.sentinel_hits.append(request.path_qs)
        return web.Response(text="internal secret")

    async def ok(request: web.Request) -> web.Response:
        return web.Response(text="hello from the lab")

    async def redirect(request: web.Request) -> web.Response:
        status = int(request.query.get("status", "302"))
        return web.Response(status=status, headers={"Location": request.query["to"]})

    async def chain(request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        target = f"/chain/{n - 1}" if n > 0 else f"http://127.0.0.1:{found.sentinel_port}/chained"
        raise web.HTTPFound(target)

    sentinel_app = web.Application()
    sentinel_app.router.add_route("*", "/{tail:.*}", sentinel)
    lab_app = web.Application()
    lab_app.router.add_get("/ok", ok)
    lab_app.router.add_route("*", "/redirect", redirect)
    lab_app.router.add_get("/chain/{n}", chain)
    runners = [web.AppRunner(sentinel_app), web.AppRunner(lab_app)]
    for runner, (host, port) in zip(
        runners, [("127.0.0.1", found.sentinel_port), (LAB, found.lab_port)], strict=True
    ):
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
    yield found
    for runner in runners:
        await runner.cleanup()


def _plugin_dir(tmp_path: Path) -> Path:
    """A distribution with a `llorch.policy` entry point, on the gateway's PYTHONPATH (not installed)."""
    root = tmp_path / "plugins"
    dist = root / "tool_guard-1.0.dist-info"
    dist.mkdir(parents=True)
    (root / "tool_guard.py").write_text(
        textwrap.dedent(
            """
            from llorch.policy import PolicyDecision

            class ToolGuard:
                api_version = 1

                def decide(self, req):
                    if req.tool == "forbidden-tool":
                        return PolicyDecision("deny", "tool-guard", "this tool may not fetch")
                    return None
            """
        )
    )
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tool-guard\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[llorch.policy]\ntool-guard = tool_guard:ToolGuard\n")
    return root


async def _stack(stack_factory: Any, tmp_path: Path) -> Stack:
    stack: Stack = stack_factory(
        pools=[mock_pool()],
        extra={
            "api": {"max_body_bytes": 262_144},
            "policy": {
                "max_redirects": 3,
                "plugins": ["tool-guard"],
                "rules": [
                    {"id": "lab", "action": "allow", "hosts": [LAB], "methods": ["GET", "HEAD"]},
                    {"id": "no-evil", "action": "deny", "hosts": ["*.evil.test"]},
                ],
            },
        },
    )
    path = [str(_plugin_dir(tmp_path)), os.environ.get("PYTHONPATH", "")]
    stack.env["PYTHONPATH"] = os.pathsep.join(p for p in path if p)
    await stack.start()
    return stack


def _hostile(s: Servers) -> list[tuple[str, str, str]]:
    """(url, rule, a word the reason must hold): all of them must be refused."""
    p = s.sentinel_port
    lo = ("private-network", "loopback")
    return [
        (f"http://127.0.0.1:{p}/", *lo),
        (f"http://localhost:{p}/", *lo),
        (f"http://LOCALHOST.:{p}/", *lo),
        (f"http://127.1:{p}/", *lo),
        (f"http://127.0.1:{p}/", *lo),
        (f"http://0x7f.1:{p}/", *lo),
        (f"http://0x7f000001:{p}/", *lo),
        (f"http://0177.0.0.1:{p}/", *lo),
        (f"http://2130706433:{p}/", *lo),
        (f"http://017700000001:{p}/", *lo),
        (f"http://127.0.0.1.:{p}/", *lo),
        (f"http://user:pw@127.0.0.1:{p}/", *lo),
        (f"https://127.0.0.1:{p}/", *lo),
        (f"http://[::1]:{p}/", *lo),
        (f"http://[::ffff:127.0.0.1]:{p}/", *lo),
        (f"http://[::ffff:7f00:1]:{p}/", *lo),
        (f"http://[::127.0.0.1]:{p}/", *lo),
        (f"http://[64:ff9b::7f00:1]:{p}/", *lo),
        (f"http://[2002:7f00:1::]:{p}/", *lo),
        (f"http://0.0.0.0:{p}/", "private-network", "unspecified"),
        (f"http://0:{p}/", "private-network", "unspecified"),
        (f"http://[::]:{p}/", "private-network", "unspecified"),
        ("http://10.0.0.1/", "private-network", "private"),
        ("http://172.16.0.1/", "private-network", "private"),
        ("http://192.168.0.1/", "private-network", "private"),
        ("http://[fc00::1]/", "private-network", "private"),
        ("http://169.254.169.254/latest/meta-data/", "private-network", "metadata"),
        ("http://[fd00:ec2::254]/", "private-network", "metadata"),
        ("http://[::ffff:169.254.169.254]/", "private-network", "metadata"),
        ("http://[::ffff:a9fe:a9fe]/", "private-network", "metadata"),
        ("http://169.254.0.1/", "private-network", "link-local"),
        ("http://[fe80::1]/", "private-network", "link-local"),
        ("http://100.64.0.1/", "private-network", "cgnat"),
        ("http://224.0.0.1/", "private-network", "multicast"),
        ("http://[ff02::1]/", "private-network", "multicast"),
        ("file:///etc/passwd", "scheme", "http and https"),
        (f"gopher://127.0.0.1:{p}/", "scheme", "http and https"),
        ("http://ex%41mple.com/", "invalid-host", "characters"),
        ("http://a.evil.test/", "no-evil", "deny rule"),
    ]


def _redirects(s: Servers) -> list[tuple[str, str, str, str]]:
    """(method, lab path, rule, reason word): redirects from the allowed lab host to where it may not go."""
    p = s.sentinel_port
    lo = ("private-network", "loopback")
    return [
        ("GET", f"/redirect?to=http://127.0.0.1:{p}/r", *lo),
        ("GET", f"/redirect?to=http://localhost:{p}/r", *lo),
        ("GET", f"/redirect?to=http://[::1]:{p}/r", *lo),
        ("GET", f"/redirect?to=http://0x7f.1:{p}/r", *lo),
        ("GET", f"/redirect?to=http://2130706433:{p}/r&status=301", *lo),
        ("GET", f"/redirect?to=http://[::ffff:127.0.0.1]:{p}/r&status=307", *lo),
        ("HEAD", f"/redirect?to=http://127.1:{p}/r&status=308", *lo),
        ("GET", "/redirect?to=http://169.254.169.254/latest/meta-data/", "private-network", "metadata"),
        ("GET", "/redirect?to=file:///etc/passwd", "scheme", "http and https"),
        ("GET", "/redirect?to=http://b.evil.test/", "no-evil", "deny rule"),
        ("GET", "/chain/2", *lo),  # two hops inside the lab, the third to loopback
    ]


async def _post(http: aiohttp.ClientSession, stack: Stack, path: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**stack.headers, "Content-Type": "application/json"}
    async with http.post(f"{stack.url}{path}", data=data, headers=headers) as r:
        return r.status, await r.json()


async def test_hostile_urls_and_redirects_are_refused_and_the_lab_host_is_fetched(
    stack_factory: Any, http: aiohttp.ClientSession, servers: Servers, tmp_path: Path
) -> None:
    stack = await _stack(stack_factory, tmp_path)
    hostile = _hostile(servers)
    assert len(hostile) >= 30
    for url, rule, word in hostile:
        status, body = await _post(http, stack, "/v1/tools/http-fetch", {"url": url})
        assert status == 403 and body["code"] == "POLICY_DENIED", (url, body)
        assert body["rule"] == rule and word in body["message"], (url, body)
        assert body["decision_id"].startswith("pd-") and body["retriable"] is False
        status, verdict = await _post(http, stack, "/v1/policy/evaluate", {"url": url})
        assert status == 200 and (verdict["decision"], verdict["rule"]) == ("deny", rule), (url, verdict)
    for method, path, rule, word in _redirects(servers):
        status, body = await _post(
            http, stack, "/v1/tools/http-fetch", {"url": servers.lab + path, "method": method}
        )
        assert status == 403 and body["code"] == "POLICY_DENIED", (path, body)
        assert body["rule"] == rule and word in body["message"], (path, body)
    # The lab host is allowed by name, but only for the rule's methods: a POST falls to the default
    # allow, which opens no private address.
    status, body = await _post(
        http, stack, "/v1/tools/http-fetch", {"url": f"{servers.lab}/ok", "method": "POST"}
    )
    assert status == 403 and body["rule"] == "private-network", body
    status, body = await _post(http, stack, "/v1/tools/http-fetch", {"url": f"{servers.lab}/chain/5"})
    assert status == 200 and body["error"] == "too_many_redirects", body
    assert servers.sentinel_hits == []  # nothing ever reached loopback
    status, body = await _post(http, stack, "/v1/tools/http-fetch", {"url": f"{servers.lab}/ok"})
    assert status == 200 and (body["status"], body["body"], body["truncated"]) == (
        200,
        "hello from the lab",
        False,
    )
    async with http.get(f"{stack.url}/metrics") as r:
        families = {f.name: f for f in text_string_to_metric_families(await r.text())}
    counts = {
        (s.labels["decision"], s.labels["rule"]): s.value
        for s in families["policy_decisions"].samples
        if s.name == "policy_decisions_total"
    }
    assert counts[("allow", "lab")] >= 1 and counts[("deny", "private-network")] >= 2 * 30, counts


async def test_evaluate_plugins_logs_and_bad_input(
    stack_factory: Any, http: aiohttp.ClientSession, servers: Servers, tmp_path: Path
) -> None:
    stack = await _stack(stack_factory, tmp_path)
    evaluate = "/v1/policy/evaluate"
    status, body = await _post(http, stack, evaluate, {"url": f"{servers.lab}/ok?token=sup3rsecret"})
    assert status == 200 and (body["decision"], body["rule"]) == ("allow", "lab"), body
    allowed_id = body["decision_id"]
    status, body = await _post(http, stack, evaluate, {"url": f"{servers.lab}/ok", "tool": "forbidden-tool"})
    assert status == 200 and (body["decision"], body["rule"]) == ("deny", "tool-guard"), body
    status, body = await _post(http, stack, evaluate, {"url": "http://a.evil.test/", "method": "POST"})
    assert (body["decision"], body["rule"]) == ("deny", "no-evil"), body

    lines = [json.loads(x) for x in stack.procs["gateway"].log_text().splitlines() if x.startswith("{")]
    decisions = [x for x in lines if x["event"] == "policy_decision"]
    assert any(allowed_id in x["msg"] and "token=REDACTED" in x["msg"] for x in decisions), decisions
    assert "sup3rsecret" not in stack.logs() and stack.token not in stack.logs()

    big = "x" * 70_000
    fetch = "/v1/tools/http-fetch"
    cases: list[tuple[str, Any, int, str, str | None]] = [
        (evaluate, b"{not json", 400, "INVALID_PARAMS", "body"),
        (evaluate, b"[1]", 400, "INVALID_PARAMS", "body"),
        (evaluate, {}, 400, "INVALID_PARAMS", "url"),
        (evaluate, {"url": 5}, 400, "INVALID_PARAMS", "url"),
        (evaluate, {"url": "http://x/", "extra": 1}, 400, "INVALID_PARAMS", "extra"),
        (evaluate, {"url": "http://x/", "method": "DELETE"}, 400, "INVALID_PARAMS", "method"),
        (evaluate, {"url": "/relative"}, 400, "INVALID_PARAMS", "url"),
        (evaluate, {"url": "http://x:99999/"}, 400, "INVALID_PARAMS", "url"),
        (fetch, b"\xff\xfe", 400, "INVALID_PARAMS", "body"),
        (fetch, {"url": f"{servers.lab}/ok", "headers": {"X-A": 1}}, 400, "INVALID_PARAMS", "headers.X-A"),
        (fetch, {"url": f"{servers.lab}/ok", "headers": ["x"]}, 400, "INVALID_PARAMS", "headers"),
        (fetch, {"url": f"{servers.lab}/ok", "headers": {"X-A": "a\r\nb"}}, 400, "INVALID_PARAMS", "headers"),
        (fetch, {"url": f"{servers.lab}/ok", "body": "x"}, 400, "INVALID_PARAMS", "body"),  # GET
        (fetch, {"url": f"{servers.lab}/ok", "method": "POST", "body": big}, 400, "INVALID_PARAMS", "body"),
        (fetch, {"url": "http://x/", "tool": "t"}, 400, "INVALID_PARAMS", "tool"),
        (fetch, {"url": "http://x/", "body": "y" * 300_000}, 413, "PAYLOAD_TOO_LARGE", None),
    ]
    for path, payload, want_status, code, field_name in cases:
        status, body = await _post(http, stack, path, payload)
        assert (status, body["code"]) == (want_status, code), (
            path,
            payload if len(str(payload)) < 200 else "…",
            body,
        )
        assert isinstance(body["message"], str) and body["retriable"] is False
        if field_name is not None:
            assert body["field"] == field_name, body
    async with http.post(f"{stack.url}{fetch}", json={"url": f"{servers.lab}/ok"}) as r:
        assert r.status == 401 and (await r.json())["code"] == "UNAUTHENTICATED"
    assert servers.sentinel_hits == []
