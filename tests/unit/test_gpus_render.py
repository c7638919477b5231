"""Issue 13 at the gateway and the CLI, without a stack: the VRAM ledger (``GET /v1/gpus``) and the
replica sets rendered from the scheduler's replies, checked against the OpenAPI document; the
/v1/models status of on-demand sets; ``llorch gpus --ledger`` against a canned gateway."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from aiohttp.test_utils import make_mocked_request
from jsonschema import Draft202012Validator

from llorch.v1 import scheduler_pb2, types_pb2
from llorch_gateway import render
from llorch_gateway.openai_api import OpenAIApi
from llorch_gateway.openapi import build_document
from tests.support.canned_gateway import TOKEN, Canned, as_json, canned_gateway, run_cli

GIB = 1 << 30


def _validator(schema_name: str) -> Draft202012Validator:
    """A validator of one component schema of the served document (its refs resolve inside it)."""
    doc = build_document()
    return Draft202012Validator(
        {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
    )


def _reply() -> scheduler_pb2.GpusReply:
    busy = scheduler_pb2.Resident(
        pool_id="big",
        model_ref="m-14b",
        state="busy",
        residency="on-demand",
        used_bytes=9 * GIB,
        need_bytes=10 * GIB,
        running=2,
        loaded_at_ms=1_700_000_000_000,
    )
    idle = scheduler_pb2.Resident(
        pool_id="small",
        model_ref="m-1b",
        state="idle",
        idle_since_ms=1_700_000_050_000,
        pinned=True,
        residency="on-demand",
        used_bytes=GIB,
        need_bytes=GIB,
        loaded_at_ms=1_700_000_010_000,
    )
    cold = scheduler_pb2.Resident(
        pool_id="cold", model_ref="m-8b", state="unloaded", residency="on-demand", need_bytes=6 * GIB
    )
    return scheduler_pb2.GpusReply(
        devices=[
            scheduler_pb2.GpuLedger(
                device="0",
                name="Fake 24GB",
                total_bytes=24 * GIB,
                used_bytes=10 * GIB,
                reserved_bytes=0,
                free_bytes=14 * GIB,
                residents=[busy, idle, cold],
            ),
            scheduler_pb2.GpuLedger(device="cpu", total_bytes=64 * GIB, free_bytes=64 * GIB),
        ],
        max_swap_wait_ms=30_000,
        min_residency_ms=10_000,
    )


def test_the_ledger_renders_every_field_with_null_for_moments_that_are_zero() -> None:
    body = render.gpu_ledger(_reply())
    devices = cast(list[dict[str, Any]], body["devices"])
    assert [d["device"] for d in devices] == ["0", "cpu"]
    assert {k: v for k, v in devices[0].items() if k != "residents"} == {
        "device": "0",
        "name": "Fake 24GB",
        "total_bytes": 24 * GIB,
        "used_bytes": 10 * GIB,
        "reserved_bytes": 0,
        "free_bytes": 14 * GIB,
    }
    busy, idle, cold = devices[0]["residents"]
    assert busy == {
        "pool_id": "big",
        "model": "m-14b",
        "state": "busy",
        "idle_since_ms": None,
        "pinned": False,
        "residency": "on-demand",
        "used_bytes": 9 * GIB,
        "need_bytes": 10 * GIB,
        "running": 2,
        "loaded_at_ms": 1_700_000_000_000,
    }
    assert (idle["idle_since_ms"], idle["pinned"], idle["loaded_at_ms"]) == (
        1_700_000_050_000,
        True,
        1_700_000_010_000,
    )
    assert (cold["state"], cold["used_bytes"], cold["need_bytes"]) == ("unloaded", 0, 6 * GIB)
    assert cold["idle_since_ms"] is None and cold["loaded_at_ms"] is None
    # A device without a name is named by its label; the swap bounds travel as integers.
    assert (devices[1]["name"], devices[1]["residents"]) == ("cpu", [])
    assert (body["max_swap_wait_ms"], body["min_residency_ms"]) == (30_000, 10_000)
    # Compact JSON: integers stay numbers (never protobuf's int64-as-string).
    assert json.loads(json.dumps(body)) == body


def test_the_rendered_ledger_matches_the_documented_schema() -> None:
    validator = _validator("Gpus")
    body = render.gpu_ledger(_reply())
    assert list(validator.iter_errors(body)) == []
    assert list(validator.iter_errors(render.gpu_ledger(scheduler_pb2.GpusReply()))) == []
    # The schema can fail: a state outside the ledger's, a zero moment, a missing field.
    device = cast(list[dict[str, Any]], body["devices"])[0]
    for broken in ({"state": "evicting"}, {"loaded_at_ms": 0}, {"running": -1}):
        resident = {**device["residents"][0], **broken}
        assert list(validator.iter_errors({**body, "devices": [{**device, "residents": [resident]}]})), broken
    assert list(validator.iter_errors({k: v for k, v in body.items() if k != "min_residency_ms"}))


def _set(**fields: Any) -> scheduler_pb2.ReplicaSetView:
    base: dict[str, Any] = {"id": "rs-a", "engine": "mock", "model_id": "m", "ctx": 2048, "pools": ["p"]}
    return scheduler_pb2.ReplicaSetView(**{**base, **fields})


def test_a_replica_set_carries_its_residency_and_status() -> None:
    validator = _validator("ReplicaSet")
    on_demand = render.replica_set(_set(residency="on-demand", status="unloaded"))
    assert (on_demand["residency"], on_demand["status"]) == ("on-demand", "unloaded")
    always = render.replica_set(_set(residency="always", status="loaded", ready=True))
    assert (always["residency"], always["status"]) == ("always", "loaded")
    # A scheduler that does not say: always, status unknown.
    silent = render.replica_set(_set())
    assert (silent["residency"], silent["status"]) == ("always", None)
    for body in (on_demand, always, silent):
        assert list(validator.iter_errors(body)) == []
    assert list(validator.iter_errors({**on_demand, "status": "evicted"}))


class _Scheduler:
    """The two replies the /v1/models handler reads."""

    def __init__(self, sets: list[scheduler_pb2.ReplicaSetView], pools: dict[str, str]) -> None:
        self.sets = sets
        self.pools = pools

    async def replica_sets(self) -> scheduler_pb2.ListReplicaSetsResponse:
        return scheduler_pb2.ListReplicaSetsResponse(sets=self.sets)

    async def list_pools(self) -> scheduler_pb2.ListPoolsResponse:
        views = [
            scheduler_pb2.PoolView(state=types_pb2.PoolState(pool_id=p, state=s))
            for p, s in self.pools.items()
        ]
        return scheduler_pb2.ListPoolsResponse(pools=views)


async def _models(
    sets: list[scheduler_pb2.ReplicaSetView], pools: dict[str, str]
) -> dict[str, dict[str, Any]]:
    api = OpenAIApi(cast(Any, None), cast(Any, _Scheduler(sets, pools)))
    response = await api.models(make_mocked_request("GET", "/v1/models"))
    assert response.text is not None
    body = json.loads(response.text)
    return {entry["id"]: entry for entry in body["data"]}


async def test_models_shows_an_on_demand_model_that_is_not_loaded_as_unloaded() -> None:
    cold = _set(id="rs-cold", model_id="cold", pools=["p-cold"], residency="on-demand", status="unloaded")
    warming = _set(id="rs-warm", model_id="warm", pools=["p-warm"], residency="on-demand", status="loading")
    starting = _set(
        id="rs-start", model_id="start", pools=["p-start"], residency="on-demand", status="unloaded"
    )
    stopped = _set(id="rs-stop", model_id="stop", pools=["p-stop"], residency="always", status="unloaded")
    ready = _set(
        id="rs-ready", model_id="ready", pools=["p-ready"], residency="always", status="loaded", ready=True
    )
    pools = {
        "p-cold": "Stopped",
        "p-warm": "Stopped",
        "p-start": "Starting",
        "p-stop": "Stopped",
        "p-ready": "Ready",
    }
    models = await _models([cold, warming, starting, stopped, ready], pools)
    assert {m: (e["status"], e["residency"]) for m, e in models.items()} == {
        "cold": ("unloaded", "on-demand"),
        "warm": ("loading", "on-demand"),  # the scheduler says a load is under way
        "start": ("loading", "on-demand"),  # its pool says so before the scheduler does
        "stop": ("unavailable", "always"),  # nothing would load a stopped always pool
        "ready": ("ready", "always"),
    }
    for entry in models.values():
        assert list(_validator("OpenAIModel").iter_errors(entry)) == []


async def test_models_lists_each_model_from_its_set_nearest_to_serving() -> None:
    failed = _set(id="rs-a", model_id="m", pools=["p-a"], residency="always", status="unloaded")
    cold = _set(id="rs-b", model_id="m", pools=["p-b"], residency="on-demand", status="unloaded")
    loading = _set(id="rs-c", model_id="m", pools=["p-c"], residency="on-demand", status="loading")
    pools = {"p-a": "Failed", "p-b": "Stopped", "p-c": "Stopped"}
    assert (await _models([failed, cold], pools))["m"]["replica_set"] == "rs-b"
    assert (await _models([failed, cold, loading], pools))["m"]["replica_set"] == "rs-c"
    ready = _set(id="rs-z", model_id="m", pools=["p-z"], ready=True)
    assert (await _models([failed, cold, loading, ready], {**pools, "p-z": "Ready"}))["m"][
        "status"
    ] == "ready"


# ---- llorch gpus --ledger ----------------------------------------------------------------------------


@pytest.fixture
def gateway() -> Iterator[tuple[str, Canned]]:
    with canned_gateway() as running:
        yield running


def _llorch(url: str, tmp_path: Path, *args: str) -> int:
    return run_cli(url, tmp_path, "gpus", *args)


def test_ledger_prints_a_table_per_device(
    gateway: tuple[str, Canned], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, canned = gateway
    canned.routes = {"GET /v1/gpus": as_json(render.gpu_ledger(_reply()))}
    assert _llorch(url, tmp_path, "--ledger") == 0
    assert canned.seen == [("GET", "/v1/gpus", None, f"Bearer {TOKEN}")]
    out = capsys.readouterr().out
    lines = [line.rstrip() for line in out.splitlines()]
    assert (
        "swap: a resident model's queued work goes first for up to 30.0 s; "
        "a loaded model stays at least 10.0 s" in lines
    )
    assert "Device 0 · Fake 24GB" in lines
    assert any(line.endswith("10.0/24.0 GiB used · 0.0 GiB reserved · 14.0 GiB free") for line in lines), out
    rows = {
        line.split()[0]: line.split()
        for line in lines
        if line.split() and line.split()[0] in ("big", "small", "cold")
    }
    # POOL MODEL STATE RESIDENCY PINNED USED NEED RUNNING IDLE-FOR LOADED ("-": none)
    big, small, cold = rows["big"], rows["small"], rows["cold"]
    assert big[:11] == ["big", "m-14b", "busy", "on-demand", "no", "9.0", "GiB", "10.0", "GiB", "2", "-"]
    assert big[-1] == "ago"  # loaded; never idle while busy
    assert small[:10] == ["small", "m-1b", "idle", "on-demand", "yes", "1.0", "GiB", "1.0", "GiB", "0"]
    assert small.count("ago") == 1 and small[-1] == "ago"  # idle for a span, loaded some time ago
    assert small[10] != "-"
    assert cold == ["cold", "m-8b", "unloaded", "on-demand", "no", "-", "6.0", "GiB", "0", "-", "-"]
    assert "Device cpu" in lines and "  no residents" in lines
    assert TOKEN not in out


def test_ledger_json_prints_the_apis_answer(
    gateway: tuple[str, Canned], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, canned = gateway
    answer = render.gpu_ledger(_reply())
    canned.routes = {"GET /v1/gpus": as_json(answer)}
    assert _llorch(url, tmp_path, "--ledger", "--json") == 0
    assert json.loads(capsys.readouterr().out) == answer


def test_ledger_errors_are_one_line_and_local_flags_need_ledger(
    gateway: tuple[str, Canned], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, _ = gateway  # no route: the canned 404 of a gateway without /v1/gpus
    assert _llorch(url, tmp_path, "--ledger") == 1
    assert capsys.readouterr().err == "llorch gpus: NOT_FOUND: no route\n"
    assert _llorch(url, tmp_path) == 2  # --url without --ledger
    assert "go with --ledger" in capsys.readouterr().err
