"""The HTTP edge under hostile, slow and faulty conditions (issue 10, "The edge").

Raw sockets against a real gateway in a real stack. Every rejection carries the SPEC §2.1 envelope and
X-Correlation-Id, and every connection ends: each case reads until the server closes, under a generous
hang guard (not a timing assertion). Faults that break a stack (Redis killed, scheduler killed) get a
stack and a Redis of their own.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.support.procs import wait_until
from tests.support.raw_http import HANG_GUARD_S, KillableRedis, RawReply, exchange, request
from tests.support.redis_server import RedisServer
from tests.support.stack import Client, Stack, mock_pool

CID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CLOSE = (b"Connection", b"close")
EDGE_TIMEOUT_S = 3.0  # api.keepalive_timeout_s and api.body_timeout_s of this module's stack
SLOW_GUARD_S = EDGE_TIMEOUT_S + HANG_GUARD_S


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    limits = {"keepalive_timeout_s": EDGE_TIMEOUT_S, "body_timeout_s": EDGE_TIMEOUT_S}
    built = Stack(
        tmp_path_factory.mktemp("edge"), redis_server.url, pools=[mock_pool(slots=2)], extra={"api": limits}
    )
    try:
        asyncio.run(built.start())
        yield built
    finally:
        built.stop()


@pytest.fixture(scope="module")
def done_task(stack: Stack) -> tuple[str, int]:
    """A finished task and the id of its terminal `end` event."""

    async def run() -> tuple[str, int]:
        async with aiohttp.ClientSession() as session:
            client = Client(stack, session)
            task_id = await client.admit(prompt="edge", max_tokens=3)
            events = await client.events(task_id)
            assert events[-1].event == "end", events
            return task_id, events[-1].id

    return asyncio.run(run())


def auth(stack: Stack) -> tuple[bytes, bytes]:
    return (b"Authorization", f"Bearer {stack.token}".encode())


def check_envelope(reply: RawReply, status: int, code: str) -> dict[str, object]:
    assert reply.status == status, reply.raw[:500]
    assert reply.headers.get("content-type", "").startswith("application/json"), reply.headers
    assert CID_RE.fullmatch(reply.headers.get("x-correlation-id", "")), reply.headers
    envelope = reply.envelope
    assert envelope["code"] == code, envelope
    assert isinstance(envelope["message"], str) and envelope["message"], envelope
    assert isinstance(envelope["retriable"], bool), envelope
    assert b"Traceback" not in reply.raw
    return envelope


def sse_frames(body: bytes) -> list[dict[str, str]]:
    frames = []
    for block in body.decode().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if line and not line.startswith(":"))
        if fields:
            frames.append(fields)
    return frames


# ------------------------------------------------------------------------------ rejections by the parser


@dataclass(frozen=True)
class Case:
    name: str
    payload: bytes
    status: int
    code: str


def parser_cases() -> list[Case]:
    cl = (b"Content-Length", b"2")
    te = (b"Transfer-Encoding", b"chunked")
    return [
        Case(
            "folded header",
            request("GET", "/healthz", [(b"X-A", b"a\r\n folded"), CLOSE]),
            400,
            "INVALID_PARAMS",
        ),
        Case(
            "9 KB header line",
            request("GET", "/healthz", [(b"X-Big", b"a" * 9216), CLOSE]),
            400,
            "INVALID_PARAMS",
        ),
        Case("CL plus TE", request("POST", "/v1/tasks", [cl, te, CLOSE], b"{}"), 400, "INVALID_PARAMS"),
        Case("duplicate CL", request("POST", "/v1/tasks", [cl, cl, CLOSE], b"{}"), 400, "INVALID_PARAMS"),
    ]


@pytest.mark.parametrize("case", parser_cases(), ids=lambda c: c.name)
async def test_parser_rejections_carry_the_envelope(stack: Stack, case: Case) -> None:
    reply = await exchange(stack.api_port, case.payload)
    envelope = check_envelope(reply, case.status, case.code)
    assert envelope["retriable"] is False


# ------------------------------------------------------------------------------------- hostile auth bytes


@pytest.mark.parametrize(
    ("name", "header"),
    [
        ("non-ASCII Authorization", (b"Authorization", "Bearer tökén".encode())),
        ("non-UTF-8 Authorization", (b"Authorization", b"Bearer \xff\xfe\x80")),
        ("non-UTF-8 X-API-Key", (b"X-API-Key", b"\xc3\x28\xff")),
        ("control byte X-API-Key", (b"X-API-Key", b"abc\x01def")),
    ],
)
async def test_non_ascii_credentials_are_401(stack: Stack, name: str, header: tuple[bytes, bytes]) -> None:
    reply = await exchange(stack.api_port, request("GET", "/v1/pools", [header, CLOSE]))
    if reply.status == 400:  # the parser may refuse the bytes first; it too must use the envelope
        check_envelope(reply, 400, "INVALID_PARAMS")
    else:
        check_envelope(reply, 401, "UNAUTHENTICATED")
        assert reply.headers.get("www-authenticate") == 'Bearer realm="llorch"'
    log = stack.procs["gateway"].log_text()
    assert "Traceback" not in log and "UnicodeEncodeError" not in log


# ------------------------------------------------------------------------------------------ slow clients


async def test_slow_clients_are_cut_off(stack: Stack) -> None:
    """Slowloris: a body that never ends or stops short gets 400 (field body) and a close; an unfinished head
    gets a close (no request to answer yet). All cases run at once, each under a hang guard."""
    token = auth(stack)
    head_only = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
    chunked = request("POST", "/v1/tasks", [token, (b"Transfer-Encoding", b"chunked")], b'5\r\n{"a":\r\n')
    short = request("POST", "/v1/tasks", [token, (b"Content-Length", b"100")], b'{"model_ref":')
    endless, stops_short, unfinished = await asyncio.gather(
        exchange(stack.api_port, chunked, SLOW_GUARD_S),
        exchange(stack.api_port, short, SLOW_GUARD_S),
        exchange(stack.api_port, head_only, SLOW_GUARD_S),
    )
    for reply in (endless, stops_short):
        envelope = check_envelope(reply, 400, "INVALID_PARAMS")
        assert envelope.get("field") == "body", envelope
        assert reply.headers.get("connection", "").lower() == "close", reply.headers
    assert unfinished.raw == b"", unfinished.raw[:300]


# --------------------------------------------------------------------------------- reconnect past the end


@pytest.mark.parametrize("beyond", [0, 1, 1000])
async def test_reconnect_at_or_past_the_end_gets_the_terminal_event(
    stack: Stack, done_task: tuple[str, int], beyond: int
) -> None:
    task_id, terminal = done_task
    last_id = str(terminal + beyond).encode()
    payload = request("GET", f"/v1/tasks/{task_id}/stream", [auth(stack), (b"Last-Event-ID", last_id), CLOSE])
    reply = await exchange(stack.api_port, payload)
    assert reply.status == 200, reply.raw[:500]
    assert CID_RE.fullmatch(reply.headers.get("x-correlation-id", ""))
    frames = sse_frames(reply.body)
    assert [(f["id"], f["event"]) for f in frames] == [(str(terminal), "end")], reply.body


async def test_reconnect_past_a_running_task_ends_with_its_terminal_event(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        task_id = await Client(stack, session).admit(prompt="ahead", max_tokens=40)
    payload = request(
        "GET", f"/v1/tasks/{task_id}/stream", [auth(stack), (b"Last-Event-ID", b"100000"), CLOSE]
    )
    reply = await exchange(stack.api_port, payload)
    assert reply.status == 200, reply.raw[:500]
    frames = sse_frames(reply.body)
    assert len(frames) == 1 and frames[0]["event"] in ("end", "error"), reply.body
    assert int(frames[0]["id"]) < 100000


@pytest.mark.parametrize("version", [b"HTTP/1.1", b"HTTP/1.0"])
async def test_a_live_stream_is_framed_for_the_clients_http_version(stack: Stack, version: bytes) -> None:
    """Live tokens (written straight to the connection while the relay's task waits) are chunked for
    HTTP/1.1 and raw for HTTP/1.0, which ends with the connection; every event comes once, in order."""
    async with aiohttp.ClientSession() as session:
        task_id = await Client(stack, session).admit(prompt="live", max_tokens=60)
    payload = request("GET", f"/v1/tasks/{task_id}/stream", [auth(stack), CLOSE])
    reply = await exchange(stack.api_port, payload.replace(b"HTTP/1.1", version, 1))
    assert reply.status == 200, reply.raw[:500]
    chunked = reply.headers.get("transfer-encoding") == "chunked"
    assert chunked == (version == b"HTTP/1.1"), reply.headers
    frames = sse_frames(reply.body)
    assert [int(f["id"]) for f in frames] == list(range(len(frames))), reply.body[:500]
    assert frames[-1]["event"] == "end", frames[-1]
    assert [json.loads(f["data"])["i"] for f in frames if f["event"] == "token"] == list(range(60))


async def test_head_of_a_running_tasks_stream_is_the_head_alone(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        task_id = await Client(stack, session).admit(prompt="head", max_tokens=40)
    reply = await exchange(
        stack.api_port, request("HEAD", f"/v1/tasks/{task_id}/stream", [auth(stack), CLOSE])
    )
    assert reply.status == 200, reply.raw[:500]
    assert reply.headers["content-type"].startswith("text/event-stream"), reply.headers
    assert reply.raw.endswith(b"\r\n\r\n") and reply.body == b"", reply.raw[-300:]
    unknown = await exchange(stack.api_port, request("HEAD", "/v1/tasks/t-none/stream", [auth(stack), CLOSE]))
    assert unknown.status == 404, unknown.raw[:500]


# -------------------------------------------------------------------------------------- dependency faults


async def test_scheduler_down_gives_503_with_retry_after(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis")
    stack = Stack(tmp_path / "stack", redis.url, pools=[mock_pool()])
    try:
        await stack.start()
        stack.procs["scheduler"].kill()
        stack.procs["scheduler"].popen.wait()
        body = json.dumps({"model_ref": "mock-tiny", "prompt": "hi"}).encode()
        headers = [
            auth(stack),
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            CLOSE,
        ]
        reply = await exchange(stack.api_port, request("POST", "/v1/tasks", headers, body))
        envelope = check_envelope(reply, 503, "POOL_UNREADY")
        assert envelope["retriable"] is True
        assert int(reply.headers["retry-after"]) >= 1, reply.headers
    finally:
        stack.stop()
        redis.stop()


async def test_redis_killed_mid_stream_ends_the_stream_not_a_second_response(tmp_path: Path) -> None:
    redis = KillableRedis(tmp_path / "redis")
    slow = mock_pool(args=["--token-delay-ms", "50"])
    stack = Stack(tmp_path / "stack", redis.url, pools=[slow])
    try:
        await stack.start()
        async with aiohttp.ClientSession() as session:
            task_id = await Client(stack, session).admit(prompt="long", max_tokens=1000)
        started = asyncio.Event()
        payload = request("GET", f"/v1/tasks/{task_id}/stream", [auth(stack)])
        streaming = asyncio.create_task(exchange(stack.api_port, payload, started=started))
        async with asyncio.timeout(HANG_GUARD_S):
            await started.wait()
        redis.kill()
        # The stream waits out feed.REDIS_GRACE_S first (a restart would keep it), then must close the
        # connection: the guard fails a hang.
        reply = await streaming
        assert reply.status == 200, reply.raw[:500]
        head_end = reply.raw.index(b"\r\n\r\n")
        assert b"HTTP/1." not in reply.raw[head_end:], reply.raw[-500:]
        assert reply.body.endswith(b": error INTERNAL\n\n"), reply.body[-300:]
        assert not any(f.get("event") in ("end", "error") for f in sse_frames(reply.body))

        async def not_ready() -> bool:
            async with aiohttp.ClientSession() as session, session.get(f"{stack.url}/readyz") as r:
                return r.status == 503

        await wait_until(not_ready, HANG_GUARD_S, "/readyz to report Redis down")
        assert "Traceback" not in stack.procs["gateway"].log_text()
    finally:
        stack.stop()
        redis.stop()
