"""Steps for the on-demand residency journey (issue 13): two on-demand mock pools on one fake GPU that
holds only one of them."""

from __future__ import annotations

from typing import Any

from behave import given, then, when

from tests.support.bdd import client, get_json, run
from tests.support.procs import wait_until
from tests.support.stack import MOCK_MODEL, SseEvent, Stack, mock_pool

MODELS = {"model-a": ("pool-a", 2048), "model-b": ("pool-b", 1024)}


def _pool(model: str) -> dict[str, Any]:
    pool_id, ctx = MODELS[model]
    return mock_pool(
        pool_id,
        model=model,
        ctx=ctx,  # distinct sets: both catalog ids name one file
        devices=[0],
        residency="on-demand",
        vram={"kv_reserve_mib": 5 * 1024, "headroom_mib": 0, "factor": 1.0},
        args=["--token-delay-ms", "20"],
    )


@given("a running stack with two on-demand mock pools of 5 GiB each on a fake 8 GiB GPU")
def step_stack(context: Any) -> None:
    fake_gpu = {"index": 0, "name": "Fake 8GB", "total_mib": 8192, "free_mib": 8192}
    context.stack = Stack(
        context.workdir / "stack",
        context.redis.url,
        pools=[_pool(m) for m in MODELS],
        models=[{"id": m, "path": str(MOCK_MODEL)} for m in MODELS],
        extra={
            "telemetry": {"gpu_provider": "fake", "fake_gpus": [fake_gpu]},
            "residency": {"min_residency_s": 0},
        },
    )
    run(context, context.stack.start())


@when('I ask "{model}" for a completion')
def step_submit(context: Any, model: str) -> None:
    context.task_id = run(context, client(context).admit(model_ref=model, max_tokens=8))
    context.events = run(context, client(context).events(context.task_id))


@then('its first event is "{name}" with phase "{phase}"')
def step_first(context: Any, name: str, phase: str) -> None:
    first: SseEvent = context.events[0]
    assert (first.event, first.data.get("phase")) == (name, phase), first


@then('a "metrics" event with phase "loading" and a load estimate comes before its dispatch')
def step_loading_frame(context: Any) -> None:
    phases = [(e.data.get("phase"), e.data) for e in context.events if e.event == "metrics"]
    names = [p for p, _ in phases]
    assert "dispatch" in names, names
    before = [data for phase, data in phases[: names.index("dispatch")] if phase == "loading"]
    assert before, names
    assert all(d["load_eta_ms"] >= 0 and d["predicted_start_ms"] >= d["load_eta_ms"] for d in before)


@then("the task runs to its end")
def step_end(context: Any) -> None:
    last: SseEvent = context.events[-1]
    assert last.event == "end", last


async def _statuses(context: Any) -> dict[str, str]:
    body = await get_json(context, "/v1/models")
    return {m["id"]: m["status"] for m in body["data"]}


@then('the models list shows both "{first}" and "{second}" as "{status}"')
def step_both(context: Any, first: str, second: str, status: str) -> None:
    statuses = run(context, _statuses(context))
    assert (statuses[first], statuses[second]) == (status, status), statuses


@then('the models list shows "{first}" as "{s1}" and "{second}" as "{s2}"')
def step_each(context: Any, first: str, s1: str, second: str, s2: str) -> None:
    async def settled() -> bool:
        statuses = await _statuses(context)
        return (statuses[first], statuses[second]) == (s1, s2)

    run(context, wait_until(settled, 30, f"{first} {s1} and {second} {s2} in /v1/models"))


@then('the GPU ledger lists "{busy}" as idle on device "{device}" and "{gone}" as unloaded')
def step_ledger(context: Any, busy: str, device: str, gone: str) -> None:
    body = run(context, get_json(context, "/v1/gpus"))
    entry = next(d for d in body["devices"] if d["device"] == device)
    states = {r["pool_id"]: r["state"] for r in entry["residents"]}
    assert states == {busy: "idle", gone: "unloaded"}, states
    assert entry["total_bytes"] == 8192 << 20, entry
    assert entry["free_bytes"] == entry["total_bytes"] - entry["used_bytes"] - entry["reserved_bytes"]
