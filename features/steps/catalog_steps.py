"""Steps for the model lifecycle journeys: the catalog (add, verify, list, delete, restart), its trust
policy (ed25519 signatures), lifecycle states at admission, and drain/resume of one pool.

Everything goes over HTTP to the real stack. Model files are written under the scenario's workdir; the
signing keys are made here with `cryptography`. Asynchronous outcomes (a pool's state, a restarted
scheduler) are polled with a bounded deadline, never slept on.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import signal
from pathlib import Path
from typing import Any

from behave import given, then, when
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.support.bdd import client, run
from tests.support.procs import wait_until
from tests.support.stack import MOCK_MODEL, Client, SseEvent, Stack, mock_pool

LONG_TASK_TOKENS = 2000  # far more than any scenario waits for: it ends only when canceled or cut


async def call(context: Any, method: str, path: str, body: Any = None) -> tuple[int, Any, Any]:
    """(status, JSON body or None, headers) of one API call, the shape the shared steps read."""
    stack: Stack = context.stack
    async with context.http.request(method, f"{stack.url}{path}", json=body, headers=stack.headers) as r:
        payload = await r.json() if r.status != 204 else None
        return r.status, payload, r.headers


def api(context: Any, method: str, path: str, body: Any = None) -> tuple[int, Any, Any]:
    reply = run(context, call(context, method, path, body))
    context.reply = reply
    return reply


def digest_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def write_file(context: Any, name: str, content: bytes) -> Path:
    folder: Path = context.workdir / "models"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_bytes(content)
    return path


def added(context: Any) -> dict[str, dict[str, Any]]:
    """The body each model id was first added with, by id."""
    if not hasattr(context, "catalog_bodies"):
        context.catalog_bodies = {}
    bodies: dict[str, dict[str, Any]] = context.catalog_bodies
    return bodies


def add_model(context: Any, body: dict[str, Any]) -> None:
    added(context).setdefault(body["id"], body)
    api(context, "POST", "/v1/catalog/models", body)


def new_model_file(context: Any, model_id: str, variant: str = "") -> Path:
    return write_file(context, f"{model_id}{variant}.bin", f"weights of {model_id}{variant}".encode())


def signed_body(context: Any, model_id: str, path: Path, key: Ed25519PrivateKey) -> dict[str, Any]:
    """A strict-policy entry: digest, an SBOM beside the file and an ed25519 signature of the digest."""
    digest = digest_of(path)
    sbom = write_file(context, f"{model_id}.sbom.json", b"{}")
    sig = base64.b64encode(key.sign(digest.encode())).decode()
    return {
        "id": model_id,
        "path": str(path),
        "digest": digest,
        "signatures": [{"signer": "lab", "algo": "ed25519", "sig": sig}],
        "sbom": {"uri": str(sbom), "digest": digest_of(sbom)},
    }


def catalog_entry(context: Any, model_id: str) -> dict[str, Any]:
    status, entry, _ = run(context, call(context, "GET", f"/v1/catalog/models/{model_id}"))
    assert status == 200, (status, entry)
    return dict(entry)


def catalog_ids(context: Any, query: str = "") -> list[str]:
    status, listed, _ = run(context, call(context, "GET", f"/v1/catalog/models{query}"))
    assert status == 200, (status, listed)
    return [m["id"] for m in listed["items"]]


async def health(context: Any, pool_id: str) -> dict[str, Any]:
    status, body, _ = await call(context, "GET", f"/v1/pools/{pool_id}/health")
    assert status == 200, (status, body)
    return dict(body)


def await_pool_state(context: Any, pool_id: str, state: str) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    async def reached() -> bool:
        seen.append(await health(context, pool_id))
        return bool(seen[-1]["state"] == state)

    try:
        run(context, wait_until(reached, 30, f"pool {pool_id} to report {state}"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {seen[-1:]}") from None
    return seen[-1]


async def start_long_task(api_client: Client) -> tuple[str, str]:
    """(task id, pool id) of a long task once it streams its first token."""
    task_id = await api_client.admit(max_tokens=LONG_TASK_TOKENS, prompt="a long answer")
    async with contextlib.aclosing(api_client.follow(task_id)) as stream:
        async for event in stream:
            if event.event == "token":
                break
        else:
            raise AssertionError(f"task {task_id} ended before its first token")
    pool_id = str((await api_client.status(task_id))["pool_id"])
    assert pool_id, f"a streaming task {task_id} names no pool"
    return task_id, pool_id


def ended_with(events: list[SseEvent], code: str) -> dict[str, Any]:
    names = [e.event for e in events]
    assert names[-1] == "error" and names.count("error") == 1 and "end" not in names, names
    error = events[-1].data
    assert error["code"] == code, error
    return error


# ------------------------------------------------------------------------------------------------ given


@given("a running stack whose catalog trusts only models signed by the lab's ed25519 key")
def step_strict_stack(context: Any) -> None:
    context.lab_key = Ed25519PrivateKey.generate()
    raw = context.lab_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    policy = {"mode": "strict", "ca_roots": [base64.b64encode(raw).decode()]}
    # The unsigned mock model the pool serves opts out (an entry's own policy wins), or it would not load.
    served = {"id": "mock-tiny", "path": str(MOCK_MODEL), "trust_policy": {"mode": "permissive"}}
    config = mock_pool()
    context.pool_id = config["id"]
    context.stack = Stack(
        context.workdir / "stack",
        context.redis.url,
        pools=[config],
        models=[served],
        extra={"catalog": {"trust_policy": policy}},
    )
    run(context, context.stack.start())


@given(
    'a running stack with two 1-slot mock pools "{first}" and "{second}" that take {delay_ms:d} ms per token'
)
def step_two_pools(context: Any, first: str, second: str, delay_ms: int) -> None:
    delay = ["--token-delay-ms", str(delay_ms)]
    context.pool_ids = [first, second]
    pools = [mock_pool(first, slots=1, args=delay), mock_pool(second, slots=1, args=delay)]
    context.stack = Stack(context.workdir / "stack", context.redis.url, pools=pools)
    run(context, context.stack.start())


@given('both pools report "{state}"')
def step_both_pools(context: Any, state: str) -> None:
    for pool_id in context.pool_ids:
        await_pool_state(context, pool_id, state)


# ------------------------------------------------------------------------------------------------- when


@when("I list the catalog")
def step_list(context: Any) -> None:
    status, listed, _ = api(context, "GET", "/v1/catalog/models")
    assert status == 200, (status, listed)
    context.catalog = listed["items"]


@when('I add a model file as "{model_id}" with its digest and tag "{tag}"')
def step_add(context: Any, model_id: str, tag: str) -> None:
    path = new_model_file(context, model_id)
    add_model(context, {"id": model_id, "path": str(path), "digest": digest_of(path), "tags": [tag]})


@when('I add the same model file as "{model_id}" again')
def step_add_again(context: Any, model_id: str) -> None:
    api(context, "POST", "/v1/catalog/models", added(context)[model_id])


@when('I add another model file as "{model_id}" with its digest and tag "{tag}"')
def step_add_other(context: Any, model_id: str, tag: str) -> None:
    path = new_model_file(context, model_id, variant="-other")
    add_model(context, {"id": model_id, "path": str(path), "digest": digest_of(path), "tags": [tag]})


@when('I add a model file as "{model_id}" with its digest and SBOM but no signature')
def step_add_unsigned(context: Any, model_id: str) -> None:
    body = signed_body(context, model_id, new_model_file(context, model_id), context.lab_key)
    del body["signatures"]
    add_model(context, body)


@when('I add a model file as "{model_id}" with its digest and SBOM, signed by the lab\'s key')
def step_add_signed(context: Any, model_id: str) -> None:
    add_model(context, signed_body(context, model_id, new_model_file(context, model_id), context.lab_key))


@when('I add the file of "{original}" as "{model_id}", signed in the lab\'s name by another key')
def step_add_forged(context: Any, original: str, model_id: str) -> None:
    path = Path(added(context)[original]["path"])
    add_model(context, signed_body(context, model_id, path, Ed25519PrivateKey.generate()))


@when('I verify "{model_id}" and wait for the result')
def step_verify(context: Any, model_id: str) -> None:
    status, entry, _ = api(context, "POST", f"/v1/catalog/models/{model_id}/verify?wait=true")
    assert status == 200, (status, entry)


@when('I delete "{model_id}" from the catalog')
def step_delete(context: Any, model_id: str) -> None:
    api(context, "DELETE", f"/v1/catalog/models/{model_id}")


@when('I set "{model_id}" to "{state}"')
def step_set_state(context: Any, model_id: str, state: str) -> None:
    api(context, "POST", f"/v1/catalog/models/{model_id}/state", {"state": state})


@when('I retire "{model_id}" with a drain deadline of {deadline_ms:d} ms')
def step_retire(context: Any, model_id: str, deadline_ms: int) -> None:
    body = {"state": "Retired", "deadline_ms": deadline_ms}
    status, reply, _ = api(context, "POST", f"/v1/catalog/models/{model_id}/state", body)
    assert status == 202 and reply["state"] == "Retired", (status, reply)


@when("the scheduler is killed and started again")
def step_restart_scheduler(context: Any) -> None:
    stack: Stack = context.stack
    old = stack.procs["scheduler"]
    old.kill(signal.SIGKILL)
    old.stop()  # reaps it and closes its log
    stack._spawn("scheduler", "scheduler")
    run(context, stack.wait_ready())


@when("a long task runs on one of the pools")
def step_long_on_one(context: Any) -> None:
    context.long_task, context.busy_pool = run(context, start_long_task(client(context)))


@when("another long task runs on the other pool")
def step_long_on_other(context: Any) -> None:
    context.other_task, context.other_pool = run(context, start_long_task(client(context)))
    assert context.other_pool != context.busy_pool, (context.other_pool, context.busy_pool)


@when("I drain the pool running the long task with a deadline of {deadline_ms:d} ms")
def step_drain(context: Any, deadline_ms: int) -> None:
    context.drained_pool = context.busy_pool
    api(context, "POST", f"/v1/pools/{context.drained_pool}/drain", {"deadline_ms": deadline_ms})


@when("the task on the other pool is canceled")
def step_cancel_other(context: Any) -> None:
    assert run(context, client(context).cancel(context.other_task)) == 204


@when("I resume the drained pool")
def step_resume(context: Any) -> None:
    status, body, _ = api(context, "POST", f"/v1/pools/{context.drained_pool}/resume")
    assert status == 202 and body["pool_id"] == context.drained_pool, (status, body)


# ------------------------------------------------------------------------------------------------- then


@then('the catalog lists only the configured model "{model_id}", "{state}", at its configured path')
def step_configured(context: Any, model_id: str, state: str) -> None:
    assert [m["id"] for m in context.catalog] == [model_id], context.catalog
    entry = context.catalog[0]
    assert entry["state"] == state and entry["path"] == str(MOCK_MODEL), entry


@then('the catalog answers {status:d} with "{model_id}" as an untrusted Draft that was never verified')
def step_created(context: Any, status: int, model_id: str) -> None:
    got, entry, _ = context.reply
    assert got == status, (got, entry)
    assert entry["id"] == model_id and entry["state"] == "Draft", entry
    assert entry["trusted"] is False and entry["verification"]["status"] == "never", entry
    assert entry["path"] == added(context)[model_id]["path"], entry


@then("the catalog answers {status:d}")
def step_catalog_status(context: Any, status: int) -> None:
    got, body, _ = context.reply
    assert got == status, (got, body)


@then('the catalog answers {status:d}: "{model_id}" went from "{previous}" to "{state}"')
def step_state_changed(context: Any, status: int, model_id: str, previous: str, state: str) -> None:
    got, body, _ = context.reply
    assert got == status, (got, body)
    assert body == {"id": model_id, "state": state, "previous_state": previous}, body


@then('the verification of "{model_id}" passed and pinned the file\'s digest in its manifest')
def step_verified(context: Any, model_id: str) -> None:
    entry = context.reply[1]
    assert entry["id"] == model_id and entry["verification"]["status"] == "pass", entry
    digest = added(context)[model_id]["digest"]
    assert entry["digest"] == digest, entry
    assert [m["digest"] for m in entry["manifests"]] == [digest], entry


@then('the verification warns that "{model_id}" carries no signature')
def step_warns_unsigned(context: Any, model_id: str) -> None:
    verification = context.reply[1]["verification"]
    assert any("signature" in w for w in verification["warnings"]), verification
    assert verification["errors"] == [], verification


@then('the catalog shows "{model_id}" as a trusted "{state}" model whose verification passed')
def step_trusted(context: Any, model_id: str, state: str) -> None:
    entry = catalog_entry(context, model_id)
    assert entry["state"] == state and entry["trusted"] is True, entry
    assert entry["verification"]["status"] == "pass", entry


@then('the catalog shows "{model_id}" as an untrusted "{state}" model whose verification failed')
def step_untrusted(context: Any, model_id: str, state: str) -> None:
    entry = catalog_entry(context, model_id)
    assert entry["state"] == state and entry["trusted"] is False, entry
    assert entry["verification"]["status"] == "fail" and entry["verification"]["errors"], entry


@then('listing the catalog by {field} "{value}" gives only "{model_id}"')
def step_list_by(context: Any, field: str, value: str, model_id: str) -> None:
    assert field in ("tag", "state"), field
    assert catalog_ids(context, f"?{field}={value}") == [model_id]


@then('the catalog entry "{model_id}" still points at the first file')
def step_unchanged(context: Any, model_id: str) -> None:
    entry = catalog_entry(context, model_id)
    first = added(context)[model_id]
    assert entry["path"] == first["path"] and entry["digest"] == first["digest"], (entry, first)


@then('the catalog entry "{model_id}" is tagged "{tag}"')
def step_tagged(context: Any, model_id: str, tag: str) -> None:
    entry = catalog_entry(context, model_id)
    assert entry["tags"] == [tag], entry


@then('the refusal names pool "{pool_id}" as the one serving it')
def step_served_by(context: Any, pool_id: str) -> None:
    body = context.reply[1]
    assert body["served_by"] == [pool_id] and body["retriable"] is False, body


@then('the refusal lists "{reason}"')
def step_refusal_reason(context: Any, reason: str) -> None:
    body = context.reply[1]
    assert reason in body["errors"], body


@then('the refusal says the model is "{state}"')
def step_refusal_state(context: Any, state: str) -> None:
    body = context.reply[1]
    assert body["state"] == state and state.lower() in body["message"].lower(), body


@then('the catalog keeps "{model_id}"')
def step_keeps(context: Any, model_id: str) -> None:
    assert catalog_entry(context, model_id)["id"] == model_id


@then('the catalog has no "{model_id}"')
def step_absent(context: Any, model_id: str) -> None:
    status, body, _ = run(context, call(context, "GET", f"/v1/catalog/models/{model_id}"))
    assert status == 404 and body["code"] == "NOT_FOUND", (status, body)
    assert model_id not in catalog_ids(context)


@then('the catalog lists exactly "{first}" and "{second}"')
def step_lists_exactly(context: Any, first: str, second: str) -> None:
    assert catalog_ids(context) == sorted([first, second])


@then('the queued task "{name}" ends with a "{code}" error before any token')
def step_queued_ended(context: Any, name: str, code: str) -> None:
    events = run(context, client(context).events(context.named_tasks[name]))
    assert not [e for e in events if e.event == "token"], events
    assert ended_with(events, code)["tokens_out"] == 0, events[-1]


@then('the long task ends with a "{code}" error after streaming tokens')
def step_long_ended(context: Any, code: str) -> None:
    events = run(context, client(context).events(context.long_task))
    streamed = sum(1 for e in events if e.event == "token")
    error = ended_with(events, code)
    assert 0 < streamed < LONG_TASK_TOKENS and error["tokens_out"] == streamed, (streamed, error)


@then("the drain is accepted with a deadline of {deadline_ms:d} ms")
def step_drain_accepted(context: Any, deadline_ms: int) -> None:
    status, body, _ = context.reply
    want = {"pool_id": context.drained_pool, "state": "draining", "deadline_ms": deadline_ms}
    assert (status, body) == (202, want), (status, body)


@then('the drained pool soon reports "{state}", live but not ready, and draining')
def step_drained(context: Any, state: str) -> None:
    seen = await_pool_state(context, context.drained_pool, state)
    assert seen["live"] is True and seen["ready"] is False and seen["draining"] is True, seen


@then('the drained pool soon reports "{state}", live and ready, and no longer draining')
def step_resumed(context: Any, state: str) -> None:
    seen = await_pool_state(context, context.drained_pool, state)
    assert seen["live"] is True and seen["ready"] is True and seen["draining"] is False, seen


def runs_on_other_pool(context: Any, task_id: str) -> None:
    api_client = client(context)
    events = run(context, api_client.events(task_id))
    assert events[-1].event == "end", [e.event for e in events]
    status = run(context, api_client.status(task_id))
    assert status["pool_id"] == context.other_pool != context.drained_pool, status


@then('the task "{name}" runs to its end on the other pool')
def step_named_on_other(context: Any, name: str) -> None:
    runs_on_other_pool(context, context.named_tasks[name])


@then("a new task runs to its end on the other pool")
def step_new_on_other(context: Any) -> None:
    runs_on_other_pool(context, run(context, client(context).admit(max_tokens=2, prompt="after the drain")))
