"""Bad and hostile input at the HTTP edge (SPEC §2.1, §2.2, §2.5, §3, §4).

Every route answers malformed, wrong, oversized or hostile requests with the §4 envelope and the code's
fixed status, carries X-Correlation-Id whatever the status, and never shows a traceback. One stack serves
the whole module; the last test checks that it still runs a normal task after all of this.
"""

from __future__ import annotations

import asyncio
import json
import re
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from tests.support.redis_server import RedisServer
from tests.support.stack import Client, Stack, mock_pool, sse_frames

# SPEC §4: the HTTP status and `retriable` are fixed per code.
SPEC_CODES: dict[str, tuple[int, bool]] = {
    "INVALID_PARAMS": (400, False),
    "DEADLINE_UNMET": (400, False),
    "UNAUTHENTICATED": (401, False),
    "FORBIDDEN": (403, False),
    "NOT_FOUND": (404, False),
    "METHOD_NOT_ALLOWED": (405, False),
    "TASK_EXISTS": (409, False),
    "PAYLOAD_TOO_LARGE": (413, False),
}
MAX_BODY = 65536  # the Stack's api.max_body_bytes
CTX = 2048  # mock_pool's ctx
CID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
PRESENT = object()  # an `extra` value: the envelope field must be there, whatever its value
DROP = object()  # a `task()` override: leave the field out


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    # Module-scoped: the function-scoped redis_url would flush Redis under the running stack.
    built = Stack(
        tmp_path_factory.mktemp("bad-input"), redis_server.url, pools=[mock_pool(slots=2, capacity=64)]
    )
    try:
        asyncio.run(built.start())
        yield built
    finally:
        built.stop()


@pytest.fixture(scope="module")
def done_task(stack: Stack) -> str:
    """A task that has run to its `end` (3 tokens), for the read-side routes."""

    async def run() -> str:
        async with aiohttp.ClientSession() as session:
            client = Client(stack, session)
            task_id = await client.admit(prompt="for the read side", max_tokens=3)
            events = await client.events(task_id)
            assert events[-1].event == "end", events
            return task_id

    return asyncio.run(run())


# ----------------------------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def send(
    http: aiohttp.ClientSession,
    stack: Stack,
    method: str,
    path: str,
    body: Any = None,
    *,
    headers: dict[str, str] | None = None,
    token: bool = True,
) -> Reply:
    sent = {**(stack.headers if token else {}), **(headers or {})}
    async with http.request(method, stack.url + path, data=body, headers=sent) as resp:
        reply = Reply(resp.status, resp.headers, await resp.read())
    check_edge(reply, sent.get("X-Correlation-Id"))
    return reply


def check_edge(reply: Reply, sent_cid: str | None = None) -> None:
    """What every response carries, whatever its status (SPEC §2.1)."""
    assert b"Traceback" not in reply.body, reply.body[:2000]
    cid = reply.headers.get("X-Correlation-Id")
    assert cid, f"no X-Correlation-Id on a {reply.status}"
    if sent_cid is not None and CID_RE.fullmatch(sent_cid):
        assert cid == sent_cid
    else:
        assert uuid.UUID(cid).version == 4 and str(uuid.UUID(cid)) == cid, cid


def check_error(
    reply: Reply, code: str, field: str | tuple[str, ...] | None = None, extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The §4 envelope with the code's fixed status and retriability, sent as application/json."""
    status, retriable = SPEC_CODES[code]
    assert reply.status == status, (reply.status, reply.body[:500])
    assert reply.headers.get("Content-Type", "").startswith("application/json"), reply.headers
    envelope = reply.json()
    assert isinstance(envelope, dict), envelope
    assert {"code", "message", "retriable"} <= envelope.keys(), envelope
    assert envelope["code"] == code, envelope
    assert envelope["retriable"] is retriable, envelope
    assert isinstance(envelope["message"], str) and envelope["message"], envelope
    if field is not None:
        fields = (field,) if isinstance(field, str) else field
        assert envelope.get("field") in fields, envelope
        if envelope["field"] != "body":
            assert envelope["field"].split(".")[0] in envelope["message"], envelope  # the message names it
    for key, value in (extra or {}).items():
        assert key in envelope, envelope
        assert value is PRESENT or envelope[key] == value, envelope
    return dict(envelope)


def task(**overrides: Any) -> bytes:
    """A valid TaskRequest body with fields overridden (or DROPped), as JSON bytes."""
    body: dict[str, Any] = {"model_ref": "mock-tiny", "prompt": "hello", "max_tokens": 2}
    body.update(overrides)
    return json.dumps({k: v for k, v in body.items() if v is not DROP}).encode()


def raw(fragment: str) -> bytes:
    """A body with raw JSON text spliced in (for literals json.dumps will not write)."""
    return ('{"model_ref":"mock-tiny","prompt":"hello",' + fragment + "}").encode()


# --------------------------------------------------------------------------------- POST /v1/tasks bodies

INVALID = "INVALID_PARAMS"
SUBMIT_REJECTS = [
    # not JSON, or not an object
    pytest.param(b"", INVALID, "body", None, id="empty-body"),
    pytest.param(b'{"model_ref":', INVALID, "body", None, id="truncated-json"),
    pytest.param(b"{'model_ref': 'mock-tiny'}", INVALID, "body", None, id="single-quotes"),
    pytest.param(task() + b" trailing", INVALID, "body", None, id="trailing-garbage"),
    pytest.param(b"[]", INVALID, "body", None, id="array"),
    pytest.param(b'[{"model_ref":"mock-tiny","prompt":"x"}]', INVALID, "body", None, id="array-of-task"),
    pytest.param(b'"mock-tiny"', INVALID, "body", None, id="string"),
    pytest.param(b"42", INVALID, "body", None, id="number"),
    pytest.param(b"null", INVALID, "body", None, id="null"),
    pytest.param(b"true", INVALID, "body", None, id="bool"),
    # unknown fields
    pytest.param(task(temperature=0.5), INVALID, "temperature", None, id="unknown-field"),
    pytest.param(
        task(budget={"tokens": 5, "dollars": 1}), INVALID, "budget.dollars", None, id="unknown-nested"
    ),
    # wrong types
    pytest.param(task(max_tokens="5"), INVALID, "max_tokens", None, id="string-for-int"),
    pytest.param(task(max_tokens=True), INVALID, "max_tokens", None, id="bool-for-int"),
    pytest.param(task(max_tokens=5.0), INVALID, "max_tokens", None, id="float-for-int"),
    pytest.param(task(seed=7.5), INVALID, "seed", None, id="fraction-for-int"),
    pytest.param(task(ctx=False), INVALID, "ctx", None, id="bool-for-ctx"),
    pytest.param(task(prompt=5), INVALID, "prompt", None, id="int-for-string"),
    pytest.param(task(prompt=["hello"]), INVALID, "prompt", None, id="list-for-string"),
    pytest.param(task(model_ref=7), INVALID, "model_ref", None, id="int-for-model-ref"),
    pytest.param(task(task_id=12345), INVALID, "task_id", None, id="int-for-task-id"),
    pytest.param(task(prompt=DROP, inputs="hello"), INVALID, "inputs", None, id="string-for-list"),
    pytest.param(task(prompt=DROP, inputs=[1]), INVALID, "inputs.0", None, id="int-in-inputs"),
    pytest.param(task(budget="lots"), INVALID, "budget", None, id="string-for-object"),
    pytest.param(task(model_ref=None), INVALID, "model_ref", None, id="null-model-ref"),
    pytest.param(task(priority=None), INVALID, "priority", None, id="null-priority"),
    pytest.param(task(ctx=None), INVALID, "ctx", None, id="null-ctx"),
    pytest.param(task(workload=None), INVALID, "workload", None, id="null-workload"),
    pytest.param(task(kv_hint=None), INVALID, "kv_hint", None, id="null-kv-hint"),
    # out of range
    pytest.param(task(max_tokens=0), INVALID, "max_tokens", None, id="max-tokens-0"),
    pytest.param(task(max_tokens=-5), INVALID, "max_tokens", None, id="max-tokens-negative"),
    pytest.param(task(max_tokens=CTX + 1), INVALID, "max_tokens", None, id="max-tokens-over-limit"),
    pytest.param(task(max_tokens=10**9), INVALID, "max_tokens", None, id="max-tokens-huge"),
    pytest.param(task(seed=-1), INVALID, "seed", None, id="seed-negative"),
    pytest.param(task(seed=2**31), INVALID, "seed", None, id="seed-2^31"),
    pytest.param(task(ctx=-1), INVALID, "ctx", None, id="ctx-negative"),
    pytest.param(task(ctx=CTX * 2), INVALID, "ctx", None, id="ctx-over-set"),
    pytest.param(
        task(ctx=16, max_tokens=10, prompt="x" * 40), INVALID, "max_tokens", None, id="over-own-ctx"
    ),
    pytest.param(
        task(deadline_ms=0), "DEADLINE_UNMET", None, {"predicted_start_ms": PRESENT}, id="deadline-0"
    ),
    pytest.param(
        task(deadline_ms=-1), "DEADLINE_UNMET", None, {"predicted_start_ms": PRESENT}, id="deadline-neg"
    ),
    pytest.param(task(deadline_ms=2**40), INVALID, "deadline_ms", None, id="deadline-over-max"),
    pytest.param(task(expected_tokens=0), INVALID, "expected_tokens", None, id="expected-tokens-0"),
    pytest.param(task(budget={"tokens": -1}), INVALID, "budget.tokens", None, id="budget-negative"),
    pytest.param(task(prompt=DROP, inputs=[]), INVALID, "inputs", None, id="inputs-empty"),
    pytest.param(task(prompt=DROP, inputs=["x"] * 65), INVALID, "inputs", None, id="inputs-65"),
    pytest.param(
        task(prompt=DROP, inputs=["a", "b"]), INVALID, ("inputs", "body"), None, id="inputs-2-completion"
    ),
    # bad enums
    pytest.param(task(workload="chat"), INVALID, "workload", None, id="bad-workload"),
    pytest.param(task(priority="urgent"), INVALID, "priority", None, id="bad-priority"),
    pytest.param(task(priority="Interactive"), INVALID, "priority", None, id="enum-case"),
    pytest.param(task(engine="openai"), INVALID, "engine", None, id="bad-engine"),
    pytest.param(task(engine="llamacpp"), INVALID, "engine", None, id="engine-of-other-set"),
    pytest.param(task(determinism="maybe"), INVALID, "determinism", None, id="bad-determinism"),
    pytest.param(task(kv_hint="warm"), INVALID, "kv_hint", None, id="bad-kv-hint"),
    pytest.param(task(workload="embedding"), INVALID, "workload", None, id="workload-not-served"),
    pytest.param(
        task(sampler_profile_version="v999"),
        INVALID,
        "sampler_profile_version",
        None,
        id="unknown-profile",
    ),
    # neither prompt nor inputs
    pytest.param(task(prompt=DROP), INVALID, ("prompt", "inputs", "body"), None, id="no-prompt-no-inputs"),
    pytest.param(task(prompt=None), INVALID, ("prompt", "inputs", "body"), None, id="null-prompt"),
    # unknown model
    pytest.param(
        task(model_ref="nope"), INVALID, "model_ref", {"served_models": ["mock-tiny"]}, id="unknown-model"
    ),
    pytest.param(
        task(model_ref="sha256:" + "0" * 64),
        INVALID,
        "model_ref",
        {"served_models": ["mock-tiny"]},
        id="unknown-digest",
    ),
    pytest.param(task(model_ref=""), INVALID, "model_ref", None, id="empty-model-ref"),
    # client-chosen ids
    pytest.param(task(task_id="-bad"), INVALID, "task_id", None, id="task-id-leading-dash"),
    pytest.param(task(task_id=""), INVALID, "task_id", None, id="task-id-empty"),
    pytest.param(task(task_id="a" * 129), INVALID, "task_id", None, id="task-id-129"),
    pytest.param(task(task_id="a" * 200), INVALID, "task_id", None, id="task-id-200"),
    pytest.param(task(task_id="a b"), INVALID, "task_id", None, id="task-id-space"),
    pytest.param(task(task_id="t\u00e2che"), INVALID, "task_id", None, id="task-id-unicode"),
    pytest.param(task(task_id="a/b"), INVALID, "task_id", None, id="task-id-slash"),
    pytest.param(task(session_id=".dot"), INVALID, "session_id", None, id="session-id-bad"),
    # hostile
    pytest.param(raw('"max_tokens":NaN'), INVALID, ("max_tokens", "body"), None, id="nan"),
    pytest.param(raw('"seed":Infinity'), INVALID, ("seed", "body"), None, id="infinity"),
    pytest.param(raw('"ctx":-Infinity'), INVALID, ("ctx", "body"), None, id="minus-infinity"),
    pytest.param(
        raw('"budget":{"cost":NaN}'), INVALID, ("budget.cost", "body"), None, id="nan-in-float-field"
    ),
    pytest.param(raw('"max_tokens":1e400'), INVALID, ("max_tokens", "body"), None, id="float-overflow"),
    pytest.param(raw(f'"seed":{2**64}'), INVALID, ("seed", "body"), None, id="int-2^64"),
    pytest.param(raw('"seed":' + "9" * 5000), INVALID, ("seed", "body"), None, id="int-5000-digits"),
    pytest.param(
        raw('"x":' + "9" * 5000),
        INVALID,
        ("x", "body"),
        None,
        id="int-5000-digits-unknown",
    ),
    pytest.param(b"[" * 30000 + b"]" * 30000, INVALID, "body", None, id="nested-30k-arrays"),
    pytest.param(
        raw('"budget":' + "[" * 20000 + "]" * 20000), INVALID, ("budget", "body"), None, id="nested-in-field"
    ),
    pytest.param(b'{"model_ref":"mock-tiny","prompt":"\xff\xfe"}', INVALID, "body", None, id="invalid-utf8"),
    pytest.param(b'{"model_ref":"mock-tiny","prompt":"\xc0\xaf"}', INVALID, "body", None, id="overlong-utf8"),
    pytest.param(
        b'{"model_ref":"mock-tiny","prompt":"\xe2\x82"}', INVALID, "body", None, id="truncated-utf8"
    ),
    pytest.param(
        b'{"model_ref":"mock-tiny","prompt":"a\x00b"}', INVALID, "body", None, id="raw-nul-in-string"
    ),
    pytest.param(b'{"model_ref":"mock-tiny",\x00"prompt":"x"}', INVALID, "body", None, id="raw-nul-outside"),
    pytest.param(
        raw('"x":1').replace(b'"prompt":"hello",', b""), INVALID, "x", None, id="unknown-and-no-prompt"
    ),
    pytest.param(task(prompt="\ud800"), INVALID, "prompt", None, id="lone-surrogate-prompt"),
    pytest.param(
        task(prompt=DROP, inputs=["\udfff"]),
        INVALID,
        ("inputs", "inputs.0"),
        None,
        id="lone-surrogate-inputs",
    ),
    pytest.param(
        task(prompt="x" * 60_000), INVALID, ("max_tokens", "prompt"), None, id="60kb-prompt-over-ctx"
    ),
    # size limit (the body is read before anything else is checked)
    pytest.param(
        task(prompt="x" * MAX_BODY),
        "PAYLOAD_TOO_LARGE",
        None,
        {"limit_bytes": MAX_BODY},
        id="body-over-limit",
    ),
    pytest.param(
        b"[" * 100_000, "PAYLOAD_TOO_LARGE", None, {"limit_bytes": MAX_BODY}, id="nested-100k-arrays"
    ),
    pytest.param(
        b'{"a":' * 100_000, "PAYLOAD_TOO_LARGE", None, {"limit_bytes": MAX_BODY}, id="nested-100k-objects"
    ),
    pytest.param(
        b"\xff" * (MAX_BODY + 1), "PAYLOAD_TOO_LARGE", None, {"limit_bytes": MAX_BODY}, id="junk-over-limit"
    ),
]


@pytest.mark.parametrize(("body", "code", "field", "extra"), SUBMIT_REJECTS)
async def test_submit_rejects_bad_bodies(
    stack: Stack,
    http: aiohttp.ClientSession,
    *,
    body: bytes,
    code: str,
    field: Any,
    extra: dict[str, Any] | None,
) -> None:
    reply = await send(http, stack, "POST", "/v1/tasks", body, headers={"Content-Type": "application/json"})
    envelope = check_error(reply, code, field, extra)
    if field is not None and "prompt" in field and "max_tokens" in field:
        assert "prompt" in envelope["message"] and "max_tokens" in envelope["message"], envelope


async def test_submit_at_the_size_limit_is_not_413(stack: Stack, http: aiohttp.ClientSession) -> None:
    body = task(prompt="")
    body = task(prompt="x" * (MAX_BODY - len(body)))
    assert len(body) == MAX_BODY
    reply = await send(http, stack, "POST", "/v1/tasks", body)
    check_error(reply, INVALID, "max_tokens")  # read and parsed; only the prompt is too long for ctx


async def test_chunked_body_over_the_limit_is_413(stack: Stack, http: aiohttp.ClientSession) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(8):
            yield b" " * 10_000

    reply = await send(http, stack, "POST", "/v1/tasks", chunks())
    check_error(reply, "PAYLOAD_TOO_LARGE", extra={"limit_bytes": MAX_BODY})


ACCEPTED = [
    pytest.param({"seed": 0, "ctx": 0, "max_tokens": 1}, True, id="lower-bounds"),
    pytest.param({"seed": 2**31 - 1, "max_tokens": CTX - 1, "prompt": "hi"}, False, id="upper-bounds"),
    pytest.param({"task_id": "A" + "b" * 127}, True, id="task-id-128"),
    pytest.param({"task_id": "a.b_c:d-e"}, True, id="task-id-punctuation"),
    pytest.param({"prompt": "a\u0000b\u0000"}, True, id="escaped-nul-in-prompt"),
    pytest.param({"prompt": "\u202eevil\u202c \U0001f600 \u00e9\u0301 \ufeff"}, True, id="unicode-prompt"),
    pytest.param({"prompt": DROP, "inputs": ["one input"]}, True, id="inputs-1"),
    pytest.param(
        {"max_tokens": None, "deadline_ms": None, "priority": "batch"}, False, id="nulls-for-defaults"
    ),
]


@pytest.mark.parametrize(("fields", "run_to_end"), ACCEPTED)
async def test_odd_but_valid_tasks_are_admitted(
    stack: Stack, http: aiohttp.ClientSession, fields: dict[str, Any], run_to_end: bool
) -> None:
    if "task_id" in fields:
        fields = {**fields, "task_id": fields["task_id"][:-8] + uuid.uuid4().hex[:8]}  # fresh per run
    fields = {"max_tokens": 2, **fields}
    reply = await send(http, stack, "POST", "/v1/tasks", task(**fields))
    assert reply.status == 202, reply.body
    task_id = reply.json()["task_id"]
    assert task_id == fields.get("task_id", task_id)
    client = Client(stack, http)
    if not run_to_end:  # long tasks: cancel; the stream still ends properly
        assert await client.cancel(task_id) == 204
    events = await client.events(task_id)
    if run_to_end:
        assert events[-1].event == "end", events[-1]
        assert events[-1].data["tokens_out"] == fields["max_tokens"]
    else:
        assert events[-1].event in ("end", "error"), events[-1]


async def test_duplicate_task_id_is_409(stack: Stack, http: aiohttp.ClientSession) -> None:
    task_id = f"dup-{uuid.uuid4().hex}"
    first = await send(http, stack, "POST", "/v1/tasks", task(task_id=task_id, max_tokens=3))
    assert first.status == 202, first.body
    again = await send(http, stack, "POST", "/v1/tasks", task(task_id=task_id, prompt="other"))
    check_error(again, "TASK_EXISTS")
    await Client(stack, http).events(task_id)  # ended, still within retention
    after_end = await send(http, stack, "POST", "/v1/tasks", task(task_id=task_id))
    check_error(after_end, "TASK_EXISTS")


# ---------------------------------------------------------------------------------------- ids in paths

TASK_ROUTES = [
    pytest.param("GET", "/v1/tasks/{}", id="status"),
    pytest.param("GET", "/v1/tasks/{}/stream", id="stream"),
    pytest.param("POST", "/v1/tasks/{}/cancel", id="cancel"),
]
BAD_PATH_IDS = [
    pytest.param("-bad", id="leading-dash"),
    pytest.param(".hidden", id="leading-dot"),
    pytest.param("a" * 129, id="129-chars"),
    pytest.param("a" * 200, id="200-chars"),
    pytest.param("a%20b", id="space"),
    pytest.param("t%C3%A2che", id="unicode"),
    pytest.param("a%00b", id="nul"),
    pytest.param("a%2Cb", id="comma"),
]


@pytest.mark.parametrize("path_id", BAD_PATH_IDS)
@pytest.mark.parametrize(("method", "template"), TASK_ROUTES)
async def test_bad_task_id_in_path_is_400(
    stack: Stack, http: aiohttp.ClientSession, method: str, template: str, path_id: str
) -> None:
    # A broken id rule (SPEC §2.1) is 400 INVALID_PARAMS naming the field; such an id is never known.
    reply = await send(http, stack, method, template.format(path_id))
    check_error(reply, INVALID, "task_id")


SESSION_ROUTES = [
    pytest.param("GET", "/v1/sessions/{}", id="session"),
    pytest.param("DELETE", "/v1/sessions/{}", id="delete-session"),
]


@pytest.mark.parametrize("path_id", BAD_PATH_IDS)
@pytest.mark.parametrize(("method", "template"), SESSION_ROUTES)
async def test_bad_session_id_in_path_is_400(
    stack: Stack, http: aiohttp.ClientSession, method: str, template: str, path_id: str
) -> None:
    check_error(await send(http, stack, method, template.format(path_id)), INVALID, "session_id")


@pytest.mark.parametrize("path_id", ["no-such-session", "z" * 128, "0"])
async def test_unknown_session_is_404_and_its_delete_204(
    stack: Stack, http: aiohttp.ClientSession, path_id: str
) -> None:
    check_error(await send(http, stack, "GET", f"/v1/sessions/{path_id}"), "NOT_FOUND")
    assert (await send(http, stack, "DELETE", f"/v1/sessions/{path_id}", b"ignored")).status == 204


@pytest.mark.parametrize("path_id", ["no-such-task", "z" * 128, "0"])
@pytest.mark.parametrize(("method", "template"), TASK_ROUTES)
async def test_unknown_task_is_404(
    stack: Stack, http: aiohttp.ClientSession, method: str, template: str, path_id: str
) -> None:
    reply = await send(http, stack, method, template.format(f"{path_id[:120]}{uuid.uuid4().hex[:8]}"))
    check_error(reply, "NOT_FOUND")


@pytest.mark.parametrize("pool_id", ["no-such-pool", "-bad", "p%C3%B6ol", "a" * 200, "mock-a%20", "a%00b"])
@pytest.mark.parametrize(
    ("method", "template"), [("GET", "/v1/pools/{}/health"), ("POST", "/v1/pools/{}/resume")]
)
async def test_unknown_pool_is_404(
    stack: Stack, http: aiohttp.ClientSession, pool_id: str, method: str, template: str
) -> None:
    check_error(await send(http, stack, method, template.format(pool_id), b"{not json"), "NOT_FOUND")


async def test_known_pool_health_is_200(stack: Stack, http: aiohttp.ClientSession) -> None:
    reply = await send(http, stack, "GET", "/v1/pools/mock-a/health")
    assert reply.status == 200 and reply.json()["pool_id"] == "mock-a"


async def test_cancel_of_an_ended_task_is_204(
    stack: Stack, http: aiohttp.ClientSession, done_task: str
) -> None:
    reply = await send(http, stack, "POST", f"/v1/tasks/{done_task}/cancel", b"ignored")
    assert reply.status == 204 and reply.body == b""


# ------------------------------------------------------------------------------------------ Last-Event-ID

BAD_EVENT_IDS = ["abc", "1.5", "", " ", "0x1", "1e3", "+1", "-2", "1 2", "9" * 20]


@pytest.mark.parametrize("value", BAD_EVENT_IDS)
async def test_bad_last_event_id_header_is_400(
    stack: Stack, http: aiohttp.ClientSession, done_task: str, value: str
) -> None:
    reply = await send(http, stack, "GET", f"/v1/tasks/{done_task}/stream", headers={"Last-Event-ID": value})
    check_error(reply, INVALID, ("Last-Event-ID", "last_event_id"))


@pytest.mark.parametrize(
    "value",
    [
        *BAD_EVENT_IDS,
        pytest.param("\u00b2", id="superscript-two"),
        pytest.param("\u0663", id="arabic-indic-three"),
    ],
)
async def test_bad_last_event_id_query_is_400(
    stack: Stack, http: aiohttp.ClientSession, done_task: str, value: str
) -> None:
    query = urllib.parse.quote(value, safe="")
    reply = await send(http, stack, "GET", f"/v1/tasks/{done_task}/stream?last_event_id={query}")
    check_error(reply, INVALID, ("Last-Event-ID", "last_event_id"))


@pytest.mark.parametrize(
    ("headers", "query", "first_id"),
    [
        ({"Last-Event-ID": "2"}, "", 3),
        ({}, "?last_event_id=2", 3),
        ({"Last-Event-ID": "-1"}, "", 0),
        ({}, "?last_event_id=0", 1),
    ],
)
async def test_valid_last_event_id_replays_after_it(
    stack: Stack,
    http: aiohttp.ClientSession,
    *,
    done_task: str,
    headers: dict[str, str],
    query: str,
    first_id: int,
) -> None:
    url = f"{stack.url}/v1/tasks/{done_task}/stream{query}"
    async with http.get(url, headers={**stack.headers, **headers}) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
        assert resp.headers.get("X-Correlation-Id")
        frames = [frame async for frame in sse_frames(resp.content)]
    assert [f.id for f in frames] == list(range(first_id, first_id + len(frames)))
    assert frames and frames[-1].event == "end"


# ---------------------------------------------------------------------------------------------- auth

V1_ROUTES = [
    pytest.param("POST", "/v1/tasks", id="submit"),
    pytest.param("GET", "/v1/tasks/some-task", id="status"),
    pytest.param("GET", "/v1/tasks/some-task/stream", id="stream"),
    pytest.param("POST", "/v1/tasks/some-task/cancel", id="cancel"),
    pytest.param("GET", "/v1/pools/mock-a/health", id="pool-health"),
    pytest.param("GET", "/v1/pools", id="pools"),
    pytest.param("POST", "/v1/pools/mock-a/resume", id="resume"),
    pytest.param("GET", "/v1/replicasets", id="replicasets"),
    pytest.param("GET", "/v1/capabilities", id="capabilities"),
    pytest.param("GET", "/v1/sessions/some-session", id="session"),
    pytest.param("DELETE", "/v1/sessions/some-session", id="delete-session"),
    pytest.param("GET", "/v1/no-such-route", id="unknown-v1-route"),
    pytest.param("DELETE", "/v1/tasks", id="wrong-method"),
]
BAD_CREDENTIALS = [
    pytest.param({}, "UNAUTHENTICATED", id="missing"),
    pytest.param({"Authorization": "Bearer "}, "UNAUTHENTICATED", id="empty-bearer"),
    pytest.param({"Authorization": "Bearer"}, "UNAUTHENTICATED", id="bare-scheme"),
    pytest.param({"Authorization": ""}, "UNAUTHENTICATED", id="empty-authorization"),
    pytest.param({"X-API-Key": ""}, "UNAUTHENTICATED", id="empty-api-key"),
    pytest.param({"Authorization": "Bearer wrong-token"}, "FORBIDDEN", id="wrong-bearer"),
    pytest.param({"X-API-Key": "wrong-token"}, "FORBIDDEN", id="wrong-api-key"),
]


@pytest.mark.parametrize(("headers", "code"), BAD_CREDENTIALS)
@pytest.mark.parametrize(("method", "path"), V1_ROUTES)
async def test_v1_routes_need_a_valid_token(
    stack: Stack, http: aiohttp.ClientSession, *, method: str, path: str, headers: dict[str, str], code: str
) -> None:
    reply = await send(http, stack, method, path, task(), headers=headers, token=False)
    check_error(reply, code)
    if code == "UNAUTHENTICATED":
        assert reply.headers.get("WWW-Authenticate") == 'Bearer realm="llorch"'
    else:
        assert "WWW-Authenticate" not in reply.headers


async def test_authorization_wins_over_api_key(stack: Stack, http: aiohttp.ClientSession) -> None:
    headers = {"Authorization": "Bearer wrong-token", "X-API-Key": stack.token}
    check_error(
        await send(http, stack, "GET", "/v1/pools/mock-a/health", None, headers=headers, token=False),
        "FORBIDDEN",
    )
    headers = {"Authorization": f"Bearer {stack.token}", "X-API-Key": "wrong-token"}
    assert (
        await send(http, stack, "GET", "/v1/pools/mock-a/health", None, headers=headers, token=False)
    ).status == 200


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({"X-API-Key": "{t}"}, id="api-key"),
        pytest.param({"Authorization": "bearer {t}"}, id="lowercase-scheme"),
    ],
)
async def test_accepted_token_forms(
    stack: Stack, http: aiohttp.ClientSession, headers: dict[str, str]
) -> None:
    sent = {k: v.format(t=stack.token) for k, v in headers.items()}
    assert (
        await send(http, stack, "GET", "/v1/pools/mock-a/health", None, headers=sent, token=False)
    ).status == 200
    reply = await send(http, stack, "POST", "/v1/tasks", task(max_tokens=1), headers=sent, token=False)
    assert reply.status == 202, reply.body


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong-token"}], ids=["no-token", "wrong-token"]
)
async def test_probes_are_open(
    stack: Stack, http: aiohttp.ClientSession, path: str, headers: dict[str, str]
) -> None:
    reply = await send(http, stack, "GET", path, None, headers=headers, token=False)
    assert reply.status == 200, reply.body
    if path == "/metrics":
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    else:
        assert reply.headers["Content-Type"].startswith("application/json")
        assert reply.json()["status"] in ("ok", "ready")


# -------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize(
    ("method", "path", "token"),
    [
        ("GET", "/index.html", False),
        ("GET", "/nope", False),
        ("POST", "/v2/tasks", False),
        ("GET", "/v1/nope", True),
        ("POST", "/v1/task", True),
        ("GET", "/v1/tasks/a/b/c", True),
        ("GET", "/v1/pools/mock-a", True),
        ("GET", "/healthz/extra", False),
    ],
)
async def test_unknown_route_is_404(
    stack: Stack, http: aiohttp.ClientSession, method: str, path: str, token: bool
) -> None:
    check_error(await send(http, stack, method, path, token=token), "NOT_FOUND")


@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("DELETE", "/v1/tasks", "POST"),
        ("PUT", "/v1/tasks", "GET"),
        ("DELETE", "/v1/tasks/some-task", "GET"),
        ("POST", "/v1/tasks/some-task", "GET"),
        ("POST", "/v1/tasks/some-task/stream", "GET"),
        ("GET", "/v1/tasks/some-task/cancel", "POST"),
        ("DELETE", "/v1/pools/mock-a/health", "GET"),
        ("PATCH", "/v1/pools", "GET"),
        ("POST", "/healthz", "GET"),
        ("POST", "/readyz", "GET"),
        ("DELETE", "/metrics", "GET"),
    ],
)
async def test_wrong_method_is_405_with_allow(
    stack: Stack, http: aiohttp.ClientSession, method: str, path: str, allowed: str
) -> None:
    reply = await send(http, stack, method, path, task())
    check_error(reply, "METHOD_NOT_ALLOWED")
    allow = {m.strip() for m in reply.headers.get("Allow", "").split(",")}
    assert allowed in allow and method not in allow, reply.headers


# ------------------------------------------------------------------------------------- correlation ids

GOOD_CIDS = ["abc", "A.b_c:d-1", "x" * 128, "0"]
BAD_CIDS = ["x" * 129, "a b", "", "a/b", "a,b", "<script>", "caf\u00e9"]


def _request_kind(kind: str, stack: Stack, done_task: str) -> tuple[str, str, Any, bool, int]:
    """(method, path, body, token, expected status) for one kind of response."""
    kinds: dict[str, tuple[str, str, Any, bool, int]] = {
        "202": ("POST", "/v1/tasks", task(max_tokens=1), True, 202),
        "200": ("GET", f"/v1/tasks/{done_task}", None, True, 200),
        "sse": ("GET", f"/v1/tasks/{done_task}/stream", None, True, 200),
        "204": ("POST", f"/v1/tasks/{done_task}/cancel", None, True, 204),
        "400": ("POST", "/v1/tasks", b"[]", True, 400),
        "401": ("GET", "/v1/pools", None, False, 401),
        "404": ("GET", "/nope", None, False, 404),
        "405": ("PUT", "/healthz", None, False, 405),
        "409": ("POST", "/v1/tasks", task(task_id=done_task), True, 409),
        "413": ("POST", "/v1/tasks", b" " * (MAX_BODY + 1), True, 413),
        "probe": ("GET", "/healthz", None, False, 200),
    }
    return kinds[kind]


KINDS = ["202", "200", "sse", "204", "400", "401", "404", "405", "409", "413", "probe"]


@pytest.mark.parametrize("cid", GOOD_CIDS + BAD_CIDS)
@pytest.mark.parametrize("kind", KINDS)
async def test_correlation_id_echoed_or_replaced(
    stack: Stack, http: aiohttp.ClientSession, done_task: str, kind: str, cid: str
) -> None:
    method, path, body, token, status = _request_kind(kind, stack, done_task)
    reply = await send(http, stack, method, path, body, headers={"X-Correlation-Id": cid}, token=token)
    assert reply.status == status, reply.body[:500]
    if cid in GOOD_CIDS:
        assert reply.headers["X-Correlation-Id"] == cid
    else:
        assert reply.headers["X-Correlation-Id"] != cid  # send() has checked it is a fresh UUID4


# ------------------------------------------------------------------------------ still healthy afterwards


async def test_stack_still_runs_a_normal_task(stack: Stack, http: aiohttp.ClientSession) -> None:
    for name, proc in stack.procs.items():
        assert proc.alive(), f"{name} died:\n{proc.log_text()[-3000:]}"
    ready = await send(http, stack, "GET", "/readyz", token=False)
    assert ready.status == 200, ready.body
    client = Client(stack, http)
    task_id = await client.admit(prompt="Are you still there?", max_tokens=5)
    events = await client.events(task_id)
    assert events[-1].event == "end" and events[-1].data["tokens_out"] == 5, events[-1]
    assert [e.data["i"] for e in events if e.event == "token"] == list(range(5))
    assert (await client.status(task_id))["state"] == "succeeded"
