"""Artifacts (SPEC §2.3, §5.8) through a real gateway: round trip, dedup, lineage, filters and paging,
the download URL from ``api.public_base_url``, 413, concurrent posts of one document, bad and hostile
input in the §4 envelope, auth, the Haiku gate's storing step (on a mock task), and the store surviving
a gateway killed and started again."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gates.client import ApiClient
from tests.gates.test_haiku import Outcome, Target, store
from tests.support.stack import Stack, mock_pool

PUBLIC = "https://orch.example.test:9443/llorch"  # what a dev box uses; not where the gateway listens
MAX_BYTES = 4096
EXTRA = {"api": {"public_base_url": PUBLIC + "/"}, "artifacts": {"max_bytes": MAX_BYTES}}


async def _call(
    http: aiohttp.ClientSession, stack: Stack, method: str, path: str, body: Any = None, **kw: Any
) -> tuple[int, Any]:
    headers = kw.pop("headers", stack.headers)
    async with http.request(method, f"{stack.url}{path}", json=body, headers=headers, **kw) as r:
        text = await r.text()
        assert r.headers["Content-Type"].startswith("application/json"), (r.status, text)
        return r.status, json.loads(text)


def _expected_id(kind: str, content: dict[str, Any]) -> str:
    doc = json.dumps(
        {"kind": kind, "content": content}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    return "sha256:" + hashlib.sha256(doc.encode()).hexdigest()


async def _gate_stores_its_text(stack: Stack, out: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The Haiku gate's own storing step (tests/gates/test_haiku.py ``store``), over the public API,
    on a task the mock engine ran: it posts a trace artifact and reads it back."""
    monkeypatch.setenv("LLORCH_GATE_OUT", str(out))
    async with ApiClient(stack.url, stack.token) as client:
        submitted = await client.submit({"model_ref": "mock-tiny", "prompt": "p", "max_tokens": 3})
        assert submitted.status == 202, submitted.body
        frames = await client.stream(submitted.task_id)
        target = Target("rs", "mock-tiny", "mock", ("mock-a",), cpu=True)
        outcome = Outcome(target, False, "p", submitted.task_id, frames, 0.0)
        said = await store(client, outcome, "cpu-fallback")
        assert said.startswith("stored as trace artifact sha256:"), said
        listed = await client.get_json("/v1/artifacts?tag=haiku-gate&kind=trace")
        assert isinstance(listed, dict) and len(listed["items"]) == 1
        gate_id = str(listed["items"][0]["id"])
        stored = await client.get_artifact(gate_id)
    assert stored["metadata"] == {"gate": "haiku", "task_id": submitted.task_id, "mode": "cpu-fallback"}
    assert isinstance(stored["content"], dict) and stored["content"]["text"] == outcome.text
    assert (out / "haiku.txt").exists()
    return gate_id


async def test_round_trip_dedup_lineage_filters_and_restart(
    stack_factory: Any, http: aiohttp.ClientSession, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack: Stack = stack_factory(pools=[mock_pool()], extra=EXTRA)
    await stack.start()
    plan = {"steps": ["read", "write"], "note": "héllo ✓", "n": 1.5}
    status, ref = await _call(
        http,
        stack,
        "POST",
        "/v1/artifacts",
        {"kind": "plan", "content": plan, "tags": ["gate", "a"], "metadata": {"task_id": "t-1"}},
    )
    assert status == 201, ref
    aid = _expected_id("plan", plan)
    assert ref == {
        "id": aid,
        "kind": "plan",
        "digest": aid,
        "created_ms": ref["created_ms"],
        "tags": ["a", "gate"],
        "parent": None,
        "size_bytes": len(
            json.dumps(plan, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        ),
        "url": f"{PUBLIC}/v1/artifacts/{aid}",
    }
    status, doc = await _call(http, stack, "GET", f"/v1/artifacts/{aid}")
    assert status == 200 and doc == {**ref, "content": plan, "metadata": {"task_id": "t-1"}}
    async with http.get(f"{stack.url}/v1/artifacts/{aid}/content", headers=stack.headers) as r:
        assert r.status == 200 and r.headers["Content-Type"] == "application/json; charset=utf-8"
        assert r.headers["ETag"] == f'"{aid.removeprefix("sha256:")}"'
        body = await r.read()
    assert hashlib.sha256(b'{"content":' + body + b',"kind":"plan"}').hexdigest() == aid.removeprefix(
        "sha256:"
    )
    assert json.loads(body) == plan and len(body) == ref["size_bytes"]

    # The same {kind, content} again: 200, same id, tags merged, the first metadata kept.
    status, again = await _call(
        http,
        stack,
        "POST",
        "/v1/artifacts",
        {"kind": "plan", "content": plan, "tags": ["b"], "metadata": {"x": 2}},
    )
    assert status == 200 and again["id"] == aid and again["tags"] == ["a", "b", "gate"]
    assert (await _call(http, stack, "GET", f"/v1/artifacts/{aid}"))[1]["metadata"] == {"task_id": "t-1"}
    # Another kind with the same content is another artifact.
    status, other = await _call(http, stack, "POST", "/v1/artifacts", {"kind": "summary", "content": plan})
    assert status == 201 and other["id"] != aid

    # Lineage: a child names its parent; an unknown parent is 400.
    status, child = await _call(
        http,
        stack,
        "POST",
        "/v1/artifacts",
        {"kind": "diff", "content": {"d": 1}, "parent": aid, "tags": ["gate"]},
    )
    assert status == 201 and child["parent"] == aid
    unknown = "sha256:" + "ab" * 32
    status, err = await _call(
        http, stack, "POST", "/v1/artifacts", {"kind": "diff", "content": {"d": 2}, "parent": unknown}
    )
    assert status == 400 and err["code"] == "INVALID_PARAMS" and err["field"] == "parent"

    # Listing: newest first, filters, paging.
    status, listed = await _call(http, stack, "GET", "/v1/artifacts")
    assert status == 200 and [i["id"] for i in listed["items"]] == [child["id"], other["id"], aid]
    assert listed["next_cursor"] is None
    assert [i["id"] for i in (await _call(http, stack, "GET", "/v1/artifacts?tag=gate"))[1]["items"]] == [
        child["id"],
        aid,
    ]
    assert [i["id"] for i in (await _call(http, stack, "GET", "/v1/artifacts?kind=summary"))[1]["items"]] == [
        other["id"]
    ]
    assert (await _call(http, stack, "GET", "/v1/artifacts?kind=trace"))[1]["items"] == []
    assert [
        i["id"] for i in (await _call(http, stack, "GET", f"/v1/artifacts?parent={aid}"))[1]["items"]
    ] == [child["id"]]
    status, first = await _call(http, stack, "GET", "/v1/artifacts?limit=2")
    assert [i["id"] for i in first["items"]] == [child["id"], other["id"]] and first["next_cursor"]
    status, rest = await _call(
        http, stack, "GET", "/v1/artifacts", params={"limit": 2, "cursor": first["next_cursor"]}
    )
    assert [i["id"] for i in rest["items"]] == [aid] and rest["next_cursor"] is None

    gate_id = await _gate_stores_its_text(stack, tmp_path, monkeypatch)

    # Killed outright and started again: the index and the files are still there.
    stack.procs["gateway"].kill(signal.SIGKILL)
    stack._spawn("gateway", "gateway")
    await stack.wait_ready()
    status, doc_after = await _call(http, stack, "GET", f"/v1/artifacts/{aid}")
    assert status == 200 and doc_after == {**doc, "tags": ["a", "b", "gate"]}
    assert [i["id"] for i in (await _call(http, stack, "GET", "/v1/artifacts"))[1]["items"]] == [
        gate_id,
        child["id"],
        other["id"],
        aid,
    ]
    assert (await _call(http, stack, "POST", "/v1/artifacts", {"kind": "plan", "content": plan}))[0] == 200
    files = list((stack.workdir / "state" / "artifacts" / "sha256").rglob("*.json"))
    assert len(files) == 4 and (stack.workdir / "state" / "artifacts" / "index.sqlite").exists()


async def test_limits_bad_input_and_auth(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack: Stack = stack_factory(pools=[mock_pool()], extra=EXTRA)
    await stack.start()
    # Canonical content over artifacts.max_bytes (the body itself is under api.max_body_bytes): 413.
    big = {"t": "x" * MAX_BYTES}
    status, err = await _call(http, stack, "POST", "/v1/artifacts", {"kind": "other", "content": big})
    assert status == 413 and err["code"] == "PAYLOAD_TOO_LARGE" and err["limit_bytes"] == MAX_BYTES
    assert err["retriable"] is False
    fits = {"t": "x" * (MAX_BYTES - len('{"t":""}'))}
    assert (await _call(http, stack, "POST", "/v1/artifacts", {"kind": "other", "content": fits}))[0] == 201

    # The same document posted concurrently: one creates it, the others find it.
    same = {"kind": "summary", "content": {"race": True}, "tags": ["r"]}
    answers = await asyncio.gather(*(_call(http, stack, "POST", "/v1/artifacts", same) for _ in range(8)))
    assert sorted(status for status, _ in answers) == [200] * 7 + [201]
    assert len({ref["id"] for _, ref in answers}) == 1

    good = {"kind": "trace", "content": {"a": 1}}
    bad_bodies: list[tuple[Any, str]] = [
        ({**good, "kind": "haiku"}, "kind"),
        ({**good, "kind": 1}, "kind"),
        ({**good, "content": [1, 2]}, "content"),
        ({**good, "content": None}, "content"),
        ({**good, "tags": "gate"}, "tags"),
        ({**good, "tags": ["x" * 65]}, "tags.0"),
        ({**good, "tags": [str(n) for n in range(33)]}, "tags"),
        ({**good, "parent": "../../../etc/passwd"}, "parent"),
        ({**good, "metadata": []}, "metadata"),
        ({**good, "surprise": True}, "surprise"),
        ({"content": {}}, "kind"),
        ([good], "body"),
    ]
    for body, field in bad_bodies:
        status, err = await _call(http, stack, "POST", "/v1/artifacts", body)
        assert (status, err["code"], err["field"]) == (400, "INVALID_PARAMS", field), body
    raw_bodies = [
        b"{",
        b"not json",
        b'{"kind":"trace","content":{"a":NaN}}',
        b'{"kind":"trace","content":{"a":1e999}}',
    ]
    raw_bodies += [
        b'{"kind":"trace","content":{"\\ud800":1}}',
        b'{"kind":"trace","content":{},"tags":["\\udfff"]}',
    ]
    raw_bodies += [b'{"kind":"trace","content":' + b"[" * 100_000 + b"]" * 100_000 + b"}", b"\xff\xfe"]
    for raw in raw_bodies:
        status, err = await _call(http, stack, "POST", "/v1/artifacts", data=raw)
        assert status in (400, 413) and err["code"] in ("INVALID_PARAMS", "PAYLOAD_TOO_LARGE"), raw[:60]
        assert err["retriable"] is False

    hostile_ids = [
        "..%2F..%2Fetc%2Fpasswd",
        "sha256:..%2F..",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "SHA256:" + "a" * 64,
        "sha256%3A" + "a" * 63 + "%00",
        "x" * 5000,
        "%C0%AE%C0%AE",
    ]
    for bad in hostile_ids:
        for suffix in ("", "/content"):
            status, err = await _call(http, stack, "GET", f"/v1/artifacts/{bad}{suffix}")
            assert status == 400 and err["code"] == "INVALID_PARAMS" and err["field"] == "id", bad
    for suffix in ("", "/content"):  # an encoded colon: the same id, just unknown
        status, err = await _call(http, stack, "GET", f"/v1/artifacts/sha256%3A{'a' * 64}{suffix}")
        assert status == 404 and err["code"] == "NOT_FOUND"

    for query, field in [
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-1", "limit"),
        ("limit=%EF%BC%91", "limit"),  # a full-width digit
        ("kind=haiku", "kind"),
        ("parent=nope", "parent"),
        ("cursor=..%2F", "cursor"),
        ("tag=" + "x" * 65, "tag"),
        ("sort=asc", "sort"),
    ]:
        status, err = await _call(http, stack, "GET", f"/v1/artifacts?{query}")
        assert status == 400 and err["code"] == "INVALID_PARAMS" and err["field"] == field, query

    # Every route needs auth.
    some = "/v1/artifacts/sha256:" + "a" * 64
    routes = [("POST", "/v1/artifacts"), ("GET", "/v1/artifacts"), ("GET", some), ("GET", some + "/content")]
    for method, path in routes:
        status, err = await _call(http, stack, method, path, good, headers={})
        assert status == 401 and err["code"] == "UNAUTHENTICATED"
        status, err = await _call(http, stack, method, path, good, headers={"Authorization": "Bearer wrong"})
        assert status == 403 and err["code"] == "FORBIDDEN"
    assert stack.procs["gateway"].alive()
    assert "Traceback" not in stack.procs["gateway"].log_text()


async def test_the_artifacts_route_takes_bodies_up_to_its_own_limit(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    """SPEC §5.8: an upload may be ``artifacts.max_bytes`` plus 64 KiB of envelope, above the body limit of
    every other route (``api.max_body_bytes``), which stays as it was."""
    api_limit, artifact_limit = 2048, 8192
    extra = {"api": {"max_body_bytes": api_limit}, "artifacts": {"max_bytes": artifact_limit}}
    stack: Stack = stack_factory(pools=[mock_pool()], extra=extra)
    await stack.start()
    content = {"t": "x" * (artifact_limit - 100)}  # the body is over api.max_body_bytes
    status, ref = await _call(http, stack, "POST", "/v1/artifacts", {"kind": "other", "content": content})
    assert status == 201, ref
    envelope = artifact_limit + 65536
    huge = {"kind": "other", "content": {"t": "x" * envelope}}
    status, err = await _call(http, stack, "POST", "/v1/artifacts", huge)
    assert (status, err["code"], err["limit_bytes"]) == (413, "PAYLOAD_TOO_LARGE", envelope)
    task = {"model_ref": "mock-tiny", "prompt": "x" * (api_limit + 1), "max_tokens": 1}
    status, err = await _call(http, stack, "POST", "/v1/tasks", task)
    assert (status, err["code"], err["limit_bytes"]) == (413, "PAYLOAD_TOO_LARGE", api_limit)
