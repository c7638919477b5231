"""The catalog (SPEC §2.3, §5.7) through the whole stack: create, list, get, verify, lifecycle states
at admission, delete, trust, bad input, and a round trip across a scheduler restart."""

from __future__ import annotations

import base64
import hashlib
import signal
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.support.procs import wait_until
from tests.support.stack import MOCK_MODEL, Client, Stack, mock_pool


async def _call(
    http: aiohttp.ClientSession, stack: Stack, method: str, path: str, body: Any = None
) -> tuple[int, Any]:
    async with http.request(method, f"{stack.url}{path}", json=body, headers=stack.headers) as r:
        return r.status, (await r.json() if r.status != 204 else None)


async def _health(http: aiohttp.ClientSession, stack: Stack, pool_id: str) -> Any:
    status, health = await _call(http, stack, "GET", f"/v1/pools/{pool_id}/health")
    assert status == 200, health
    return health


def _digest(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


async def test_catalog_round_trip_states_and_restart(  # noqa: PLR0915
    stack_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    spare = tmp_path / "spare.bin"
    spare.write_bytes(b"another model")
    stack: Stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    client = Client(stack, http)

    status, listed = await _call(http, stack, "GET", "/v1/catalog/models")
    assert status == 200 and [m["id"] for m in listed["items"]] == ["mock-tiny"]
    configured = listed["items"][0]
    assert configured["state"] == "Active" and configured["path"] == str(MOCK_MODEL)

    new = {"id": "spare", "path": str(spare), "digest": _digest(spare), "tags": ["test"]}
    status, created = await _call(http, stack, "POST", "/v1/catalog/models", new)
    assert status == 201 and created["state"] == "Draft" and created["trusted"] is False
    assert created["verification"]["status"] == "never"
    assert (await _call(http, stack, "POST", "/v1/catalog/models", new))[0] == 200  # the same again
    status, clash = await _call(http, stack, "POST", "/v1/catalog/models", {**new, "tags": ["other"]})
    assert status == 409 and clash["code"] == "MODEL_EXISTS"

    status, verified = await _call(http, stack, "POST", "/v1/catalog/models/spare/verify?wait=true")
    assert status == 200 and verified["trusted"] is True and verified["verification"]["status"] == "pass"
    assert verified["manifests"][0]["digest"] == _digest(spare)
    assert any("signature" in w for w in verified["verification"]["warnings"])  # permissive: a warning
    status, pending = await _call(http, stack, "POST", "/v1/catalog/models/spare/verify")
    assert status == 202 and pending == {"id": "spare", "verification": {"status": "pending"}}

    status, tagged = await _call(http, stack, "GET", "/v1/catalog/models?tag=test")
    assert [m["id"] for m in tagged["items"]] == ["spare"]
    status, drafts = await _call(http, stack, "GET", "/v1/catalog/models?state=Draft")
    assert [m["id"] for m in drafts["items"]] == ["spare"]

    # Lifecycle at admission, on the served model.
    for state, code, http_status in (
        ("Draft", "MODEL_NOT_ACTIVE", 403),
        ("Deprecated", "MODEL_DEPRECATED", 403),
    ):
        status, changed = await _call(
            http, stack, "POST", "/v1/catalog/models/mock-tiny/state", {"state": state}
        )
        assert status == 202 and changed["state"] == state
        got, error, _ = await client.submit(max_tokens=2)
        assert (got, error["code"], error["state"]) == (http_status, code, state)
    await _call(http, stack, "POST", "/v1/catalog/models/mock-tiny/state", {"state": "Active"})
    session_task = await client.admit(max_tokens=2, session_id="keeps-going")
    assert (await client.events(session_task))[-1].event == "end"
    await _call(http, stack, "POST", "/v1/catalog/models/mock-tiny/state", {"state": "Deprecated"})
    going_on = await client.admit(max_tokens=2, session_id="keeps-going")  # an existing session goes on
    assert (await client.events(going_on))[-1].event == "end"
    await _call(http, stack, "POST", "/v1/catalog/models/mock-tiny/state", {"state": "Active"})

    status, refused = await _call(http, stack, "DELETE", "/v1/catalog/models/mock-tiny")
    assert status == 409 and refused["served_by"] == ["mock-a"]
    assert (await _call(http, stack, "DELETE", "/v1/catalog/models/spare"))[0] == 204
    assert (await _call(http, stack, "GET", "/v1/catalog/models/spare"))[0] == 404
    again = {"id": "again", "path": str(spare)}
    assert (await _call(http, stack, "POST", "/v1/catalog/models", again))[0] == 201

    async with http.get(f"{stack.url}/metrics") as r:
        text = await r.text()
    assert 'model_state{model_id="mock-tiny",state="Active"} 1.0' in text
    assert 'model_state{model_id="mock-tiny",state="Draft"} 0.0' in text
    assert 'catalog_verifications_total{engine="none",reason="missing_signature",result="pass"}' in text

    stack.procs["scheduler"].kill(signal.SIGKILL)
    stack._spawn("scheduler", "scheduler")
    await stack.wait_ready()
    status, after = await _call(http, stack, "GET", "/v1/catalog/models")
    assert [m["id"] for m in after["items"]] == ["again", "mock-tiny"]


async def test_retired_model_ends_queued_tasks_and_drains(
    stack_factory: Any, http: aiohttp.ClientSession
) -> None:
    stack: Stack = stack_factory(pools=[mock_pool(args=["--token-delay-ms", "20"])])
    await stack.start()
    client = Client(stack, http)
    running = await client.admit(max_tokens=30)
    queued = await client.admit(max_tokens=3)
    status, _ = await _call(
        http, stack, "POST", "/v1/catalog/models/mock-tiny/state", {"state": "Retired", "deadline_ms": 60000}
    )
    assert status == 202
    assert (await client.events(running))[-1].event == "end"  # running work finishes within the deadline
    ended = (await client.events(queued))[-1]
    assert ended.event == "error" and ended.data["code"] == "POOL_UNAVAILABLE"
    got, error, _ = await client.submit(max_tokens=2)
    assert (got, error["code"]) == (503, "POOL_UNAVAILABLE") and "retired" in error["message"]

    async def unloaded() -> bool:
        health = await _health(http, stack, "mock-a")
        return bool(health["state"] == "Stopped" and not health["live"])

    await wait_until(unloaded, 30, "the retired model's pool to unload")
    await _call(http, stack, "POST", "/v1/catalog/models/mock-tiny/state", {"state": "Active"})
    assert (await _call(http, stack, "POST", "/v1/pools/mock-a/resume"))[0] == 202  # loads it again

    async def ready() -> bool:
        return bool((await _health(http, stack, "mock-a"))["state"] == "Ready")

    await wait_until(ready, 30, "the pool to load again")
    assert (await client.events(await client.admit(max_tokens=2)))[-1].event == "end"


async def test_strict_trust_and_signatures(
    stack_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    model = tmp_path / "signed.bin"
    model.write_bytes(b"signed weights")
    digest = _digest(model)
    sbom = tmp_path / "sbom.json"
    sbom.write_text("{}")
    strict = {"mode": "strict", "ca_roots": [base64.b64encode(raw).decode()]}
    unsigned_served = tmp_path / "unsigned-served.bin"
    unsigned_served.write_bytes(b"unsigned weights")
    stack: Stack = stack_factory(
        pools=[mock_pool(), mock_pool("mock-unsigned", model="unsigned-served")],
        models=[
            # The served model opts out of strict (an entry's own policy wins); the other one cannot load.
            {"id": "mock-tiny", "path": str(MOCK_MODEL), "trust_policy": {"mode": "permissive"}},
            {"id": "unsigned-served", "path": str(unsigned_served)},
        ],
    )
    stack_config = yaml.safe_load(stack.config_path.read_text())
    stack_config["catalog"]["trust_policy"] = strict
    stack.config_path.write_text(yaml.safe_dump(stack_config))
    await stack.start()
    refused_pool = await _health(http, stack, "mock-unsigned")
    assert refused_pool["last_error"]["code"] == "UNTRUSTED_ARTIFACT" and not refused_pool["ready"]
    assert (
        "missing_signature" in refused_pool["last_error"]["message"]
        or "signature" in refused_pool["last_error"]["message"]
    )

    unsigned = {"id": "unsigned", "path": str(model), "digest": digest}
    status, error = await _call(http, stack, "POST", "/v1/catalog/models", unsigned)
    assert status == 400 and error["code"] == "UNTRUSTED_ARTIFACT"

    good = base64.b64encode(key.sign(digest.encode())).decode()
    signed = {
        "id": "signed",
        "path": str(model),
        "digest": digest,
        "signatures": [{"signer": "lab", "algo": "ed25519", "sig": good}],
        "sbom": {"uri": str(sbom), "digest": _digest(sbom)},
    }
    assert (await _call(http, stack, "POST", "/v1/catalog/models", signed))[0] == 201
    status, entry = await _call(http, stack, "POST", "/v1/catalog/models/signed/state", {"state": "Active"})
    assert status == 202 and entry["previous_state"] == "Draft"  # verified on the way: it passed

    forged = {
        **signed,
        "id": "forged",
        "signatures": [{"signer": "x", "algo": "ed25519", "sig": good[:-4] + "AAA="}],
    }
    assert (await _call(http, stack, "POST", "/v1/catalog/models", forged))[0] == 201
    status, refused = await _call(http, stack, "POST", "/v1/catalog/models/forged/state", {"state": "Active"})
    assert status == 400 and refused["code"] == "UNTRUSTED_ARTIFACT"
    status, forged_entry = await _call(http, stack, "GET", "/v1/catalog/models/forged")
    assert forged_entry["trusted"] is False and forged_entry["verification"]["status"] == "fail"


async def test_catalog_bad_input(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack: Stack = stack_factory(pools=[mock_pool()])
    await stack.start()
    cases: list[tuple[str, str, Any, int]] = [
        ("POST", "/v1/catalog/models", {"id": "x"}, 400),
        ("POST", "/v1/catalog/models", {"id": "x", "path": "relative/model.gguf"}, 400),
        ("POST", "/v1/catalog/models", {"id": "x", "path": "/models/../etc/passwd"}, 400),
        ("POST", "/v1/catalog/models", {"id": "x", "path": "/m.gguf", "digest": "md5:abc"}, 400),
        ("POST", "/v1/catalog/models", {"id": "../x", "path": "/m.gguf"}, 400),
        ("POST", "/v1/catalog/models", {"id": "x", "path": "/m.gguf", "colour": "red"}, 400),
        ("POST", "/v1/catalog/models", {"id": "x", "path": "/m.gguf", "state": "Shiny"}, 400),
        ("POST", "/v1/catalog/models", {"id": "x", "path": "/m.gguf", "tags": "a"}, 400),
        ("POST", "/v1/catalog/models", ["x"], 400),
        ("POST", "/v1/catalog/models", {"id": "x", "path": "/" + "a" * 70000}, 413),
        ("GET", "/v1/catalog/models?state=Shiny", None, 400),
        ("GET", "/v1/catalog/models/nope", None, 404),
        ("GET", "/v1/catalog/models/bad%20id", None, 400),
        ("POST", "/v1/catalog/models/nope/verify", None, 404),
        ("POST", "/v1/catalog/models/nope/state", {"state": "Active"}, 404),
        ("POST", "/v1/catalog/models/mock-tiny/state", {"state": "Shiny"}, 400),
        ("POST", "/v1/catalog/models/mock-tiny/state", {"state": "Active", "deadline_ms": 0}, 400),
        ("POST", "/v1/catalog/models/mock-tiny/verify?wait=maybe", None, 400),
        ("DELETE", "/v1/catalog/models/nope", None, 404),
        ("PUT", "/v1/catalog/models", None, 405),
    ]
    for method, path, body, want in cases:
        status, error = await _call(http, stack, method, path, body)
        assert status == want, (method, path, body, status, error)
        assert error["code"] and error["message"] and "Traceback" not in error["message"]
