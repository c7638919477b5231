"""Steps for discovery journeys: GET /v1/capabilities (engines, features, the caller's limits, per-device
concurrency on a fake GPU) and GET /v1/replicasets (slots, load, queue, full policy, SLO)."""

from __future__ import annotations

from typing import Any

from behave import given, then, when

from tests.support.bdd import client, get_json, run
from tests.support.procs import wait_until
from tests.support.stack import Stack, mock_pool

MIB = 1 << 20
SLO_FIELDS = ("first_token_ms_p50", "first_token_ms_p95", "decode_ms_p50", "on_time_ratio")


def stack_extra(context: Any) -> dict[str, Any]:
    """Config the scenario's Given steps collect before the stack starts."""
    if not hasattr(context, "stack_extra"):
        context.stack_extra = {}
    extra: dict[str, Any] = context.stack_extra
    return extra


def only_engine(context: Any) -> dict[str, Any]:
    engines = context.capabilities["engines"]
    assert len(engines) == 1, engines
    engine: dict[str, Any] = engines[0]
    return engine


def device(context: Any, name: str) -> dict[str, Any]:
    per_device = only_engine(context)["concurrency"]["per_device"]
    found = [d for d in per_device if d["device"] == name]
    assert len(found) == 1, per_device
    entry: dict[str, Any] = found[0]
    return entry


def only_set(sets: list[dict[str, Any]]) -> dict[str, Any]:
    assert isinstance(sets, list) and len(sets) == 1, sets
    return sets[0]


# ------------------------------------------------------------------------------------------------ given


@given("my API token is limited to {rps:d} requests per second and {tpm:d} tokens per minute")
def step_token_limits(context: Any, rps: int, tpm: int) -> None:
    token = {"name": "agents", "token_env": "LLORCH_API_TOKEN", "rps": rps, "tokens_per_min": tpm}
    stack_extra(context).setdefault("api", {})["tokens"] = [token]


@given(
    'a running stack with a mock pool of {slots:d} slots on fake GPU {index:d} "{name}" '
    "with {mib:d} MiB of VRAM"
)
def step_stack_gpu(context: Any, slots: int, index: int, name: str, mib: int) -> None:
    gpu = {"index": index, "name": name, "total_mib": mib, "free_mib": mib}
    extra = stack_extra(context)
    extra["telemetry"] = {"gpu_provider": "fake", "fake_gpus": [gpu]}
    config = mock_pool(devices=[index], slots=slots)
    context.pool_id = config["id"]
    context.stack = Stack(context.workdir / "stack", context.redis.url, pools=[config], extra=extra)
    run(context, context.stack.start())


# ------------------------------------------------------------------------------------------------- when


@when("I ask for the capabilities")
def step_capabilities(context: Any) -> None:
    context.capabilities = run(context, get_json(context, "/v1/capabilities"))


@when("I ask for the capabilities once the GPU is reported")
def step_capabilities_gpu(context: Any) -> None:
    async def reported() -> bool:
        caps = await get_json(context, "/v1/capabilities")
        context.capabilities = caps
        devices = [d for e in caps["engines"] for d in e["concurrency"]["per_device"]]
        return bool(devices) and all(d["name"] and d["slots_total"] for d in devices)

    run(context, wait_until(reported, 30, "the GPU and its Ready slots to appear in /v1/capabilities"))


@when("I list the replica sets")
def step_list_sets(context: Any) -> None:
    context.replica_sets = run(context, get_json(context, "/v1/replicasets"))


@when('the task named "{name}" runs to its end')
def step_named_runs(context: Any, name: str) -> None:
    task_id = context.named_tasks[name]  # named by the admission steps that queued it
    events = run(context, client(context).events(task_id))
    assert events[-1].event == "end", [e.event for e in events]


# ------------------------------------------------------------------------------------------------- then


@then('the API version is "{version}"')
def step_api_version(context: Any, version: str) -> None:
    assert context.capabilities["api_version"] == version, context.capabilities


@then('the only engine is "{engine}", serving model "{model}" for {workloads} with a context of {ctx:d}')
def step_engine(context: Any, engine: str, model: str, workloads: str, ctx: int) -> None:
    entry = only_engine(context)
    assert entry["engine"] == engine and entry["models"] == [model], entry
    wanted = sorted(w.strip().strip('"') for w in workloads.replace(" and ", ",").split(","))
    assert entry["supported_workloads"] == wanted and entry["ctx_max"] == ctx, entry
    versions = entry["engine_versions"]
    assert versions and all(isinstance(v, str) and v for v in versions), entry


@then('the engine offers sessions, budgets, kv hints and the "{first}" and "{second}" queue policies')
def step_features(context: Any, first: str, second: str) -> None:
    features = only_engine(context)["features"]
    assert features["sessions"] is True and features["budgets"] is True, features
    assert features["kv_hint"] is True, features
    assert sorted(features["queue_policies"]) == sorted([first, second]), features
    assert "best_effort" in features["determinism"], features
    assert features["tensor_split"] is False, features  # only llama.cpp splits tensors


@then("my rate limits read {rps:d} requests per second and {tpm:d} tokens per minute")
def step_limits(context: Any, rps: int, tpm: int) -> None:
    limits = only_engine(context)["rate_limits"]
    assert limits == {"requests_per_s": rps, "tokens_per_min": tpm}, limits


@then("my rate limits read as unlimited")
def step_unlimited(context: Any) -> None:
    limits = only_engine(context)["rate_limits"]
    assert limits == {"requests_per_s": None, "tokens_per_min": None}, limits


@then('device "{name}" is a "{gpu_name}" with {mib:d} MiB of VRAM and {free:d} of {total:d} slots free')
def step_gpu_device(context: Any, name: str, gpu_name: str, mib: int, free: int, total: int) -> None:
    entry = device(context, name)
    assert entry["name"] == gpu_name and entry["vram_total_bytes"] == mib * MIB, entry
    assert isinstance(entry["vram_free_bytes"], int) and 0 < entry["vram_free_bytes"] <= mib * MIB, entry
    assert entry["slots_free"] == free and entry["slots_total"] == total, entry


@then('device "{name}" has no GPU name or VRAM and {free:d} of {total:d} slots free')
def step_cpu_device(context: Any, name: str, free: int, total: int) -> None:
    entry = device(context, name)
    assert entry["name"] is None and entry["vram_total_bytes"] is None, entry
    assert entry["vram_free_bytes"] is None, entry
    assert entry["slots_free"] == free and entry["slots_total"] == total, entry


@then("{free:d} of {total:d} slots are free in total")
def step_total_slots(context: Any, free: int, total: int) -> None:
    concurrency = only_engine(context)["concurrency"]
    assert concurrency["slots_free"] == free and concurrency["slots_total"] == total, concurrency


@then('there is one ready "{engine}" replica set for model "{model}" made of pool "{pool}"')
def step_one_set(context: Any, engine: str, model: str, pool: str) -> None:
    rs = only_set(context.replica_sets)
    assert rs["id"].startswith("rs-") and rs["ready"] is True, rs
    assert rs["engine"] == engine and rs["model_id"] == model and rs["pools"] == [pool], rs
    assert rs["engine_version"] and rs["model_digest"].startswith("sha256:"), rs


@then("the replica set has {free:d} of {total:d} slots free at load {load:f}, with nothing queued")
def step_set_slots(context: Any, free: int, total: int, load: float) -> None:
    rs = only_set(context.replica_sets)
    assert rs["slots_free"] == free and rs["slots_total"] == total and rs["load"] == load, rs
    assert rs["queue_depth"] == {"interactive": 0, "batch": 0}, rs


@then('its queue takes {capacity:d} tasks under full_policy "{policy}"')
def step_set_queue(context: Any, capacity: int, policy: str) -> None:
    rs = only_set(context.replica_sets)
    assert rs["queue_capacity"] == capacity and rs["full_policy"] == policy, rs


@then("its SLO figures are null before any task has ended")
def step_slo_empty(context: Any) -> None:
    slo = only_set(context.replica_sets)["slo"]
    assert slo == dict.fromkeys(SLO_FIELDS), slo


@then(
    "the replica set soon shows {free:d} of {total:d} slots free at load {load:f}, "
    "with {interactive:d} interactive and {batch:d} batch task queued"
)
@then(
    "the replica set soon shows {free:d} of {total:d} slots free at load {load:f}, "
    "with {interactive:d} interactive and {batch:d} batch tasks queued"
)
def step_set_soon(context: Any, free: int, total: int, load: float, interactive: int, batch: int) -> None:
    want = {
        "slots_free": free,
        "slots_total": total,
        "load": load,
        "queue_depth": {"interactive": interactive, "batch": batch},
    }

    async def shows() -> bool:
        context.replica_sets = await get_json(context, "/v1/replicasets")
        rs = only_set(context.replica_sets)
        return all(rs[key] == value for key, value in want.items())

    try:
        run(context, wait_until(shows, 30, f"the replica set to show {want}"))
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen {context.replica_sets}") from None


@then("its SLO figures now report first-token and decode times and an on-time ratio of {ratio:f}")
def step_slo_data(context: Any, ratio: float) -> None:
    slo = only_set(context.replica_sets)["slo"]
    assert slo["on_time_ratio"] == ratio, slo
    times = [slo[key] for key in ("first_token_ms_p50", "first_token_ms_p95", "decode_ms_p50")]
    assert all(isinstance(t, int) and t >= 0 for t in times), slo
    assert slo["first_token_ms_p50"] <= slo["first_token_ms_p95"], slo
