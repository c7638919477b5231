"""Metrics contract (SPEC §6): the scenario of §6 on the whole stack, every contract family with its type,
labels and budgets, the allowed extras; and JSON-lines logs without secrets."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.procs import wait_until
from tests.support.stack import Client, SseEvent, Stack, mock_pool

LINT = Path(__file__).resolve().parents[2] / "contracts" / "metrics.lint.json"
POOL = "mock-gpu"
GPU_TOTAL_BYTES = 12288 << 20
FAKE_GPU = {"index": 0, "name": "Fake 12GB", "total_mib": 12288, "free_mib": 12288}
# The allowed extras (SPEC §6) plus the per-GPU gauges and the circuit gauge: (type, label names).
EXTRAS: dict[str, tuple[str, list[str]]] = {
    "pool_ready": ("gauge", ["pool_id"]),
    "pool_circuit_open": ("gauge", ["pool_id"]),
    "engine_restarts_total": ("counter", ["pool_id", "reason"]),
    "preload_outcomes_total": ("counter", ["pool_id", "outcome"]),
    "driver_resets_total": ("counter", ["pool_id", "device"]),
    "drain_events_total": ("counter", ["pool_id", "reason"]),
    "tasks_failed_total": ("counter", ["engine", "pool_id", "code"]),
    "gateway_http_requests_total": ("counter", ["route", "method", "status"]),
    "sse_relay_lag_ms": ("histogram", []),
    "component_up": ("gauge", ["component"]),
    "gpu_device_vram_total_bytes": ("gauge", ["pool_id", "device"]),
    "gpu_device_vram_used_bytes": ("gauge", ["pool_id", "device"]),
    "gpu_device_utilization": ("gauge", ["pool_id", "device"]),
}


async def _scrape(http: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with http.get(f"{url}/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return {_name(f): f for f in text_string_to_metric_families(await r.text())}


def _value(families: dict[str, Any], sample_name: str, **labels: str) -> float:
    """The sum of the samples named ``sample_name`` whose labels include ``labels``."""
    family = families.get(sample_name.removesuffix("_count").removesuffix("_sum"))
    if family is None:
        return 0.0
    return float(
        sum(s.value for s in family.samples if s.name == sample_name and labels.items() <= s.labels.items())
    )


async def _follow(client: Client, task_id: str, seen: list[SseEvent]) -> None:
    async with contextlib.aclosing(client.follow(task_id)) as stream:
        async for event in stream:
            seen.append(event)


async def test_metrics_contract_and_logs(stack_factory: Any, http: aiohttp.ClientSession) -> None:
    stack: Stack = stack_factory(
        pools=[
            mock_pool(
                POOL,
                devices=[0],
                queue={"capacity": 1, "full_policy": "drop-lru"},
                args=["--token-delay-ms", "30", "--gpu-util", "37"],
            )
        ],
        extra={"telemetry": {"gpu_provider": "fake", "fake_gpus": [FAKE_GPU]}},
    )
    await stack.start()
    families: dict[str, Any] = {}

    async def scraped(predicate: Callable[[], bool]) -> bool:
        families.clear()
        families.update(await _scrape(http, stack.url))
        return predicate()

    await _scenario(Client(stack, http), scraped, families)
    await scraped(lambda: True)
    verified_before = _value(families, "catalog_verifications_total", result="pass")
    async with http.post(
        f"{stack.url}/v1/catalog/models/mock-tiny/verify?wait=true", headers=stack.headers
    ) as r:
        assert r.status == 200 and (await r.json())["verification"]["status"] == "pass"
    # An extra the scenario does not produce by itself: a drain of the (idle) pool.
    async with http.post(
        f"{stack.url}/v1/pools/{POOL}/drain", json={"deadline_ms": 30_000}, headers=stack.headers
    ) as r:
        assert r.status == 202, await r.text()

    lint = json.loads(LINT.read_text())
    required = {m["name"]: m for m in lint["required_metrics"]}

    def complete() -> bool:
        return (
            set(required) | set(EXTRAS) <= set(families)
            and _value(families, "tokens_out_total") >= 4  # the canceled task's too
            and _value(families, "catalog_verifications_total", result="pass") > verified_before
            and _value(families, "drain_events_total", pool_id=POOL, reason="completed") == 1
            and _value(families, "gpu_device_vram_total_bytes", pool_id=POOL, device="0") > 0
        )

    await wait_until(lambda: scraped(complete), 30, "every family and the scenario's counts on /metrics")

    # Step 3: names, types, exact label names (plus `le` on buckets), budgets.
    budgets = lint["label_cardinality_budget"]
    for name, spec in required.items():
        _check_family(families[name], name, spec["type"], spec["labels"], budgets)
    for name, (kind, labels) in EXTRAS.items():
        _check_family(families[name], name, kind, labels, budgets)
    _check_counts(families, _metrics_base_port(stack))
    _check_logs(stack)


async def _scenario(
    client: Client, scraped: Callable[[Callable[[], bool]], Awaitable[bool]], families: dict[str, Any]
) -> None:
    """SPEC §6 step 2 but the catalog verify: a completed task, a canceled one, an eviction, a 429."""
    done = await client.admit(max_tokens=3, task_id="obs-done")
    assert (await client.events(done))[-1].event == "end"
    running = await client.admit(max_tokens=1000)
    running_events: list[SseEvent] = []
    follower = asyncio.create_task(_follow(client, running, running_events))

    async def running_streams() -> bool:
        return any(e.event == "token" for e in running_events)

    await wait_until(running_streams, 30, "the long task's first token")
    # The follower stays on the running task: its live tokens feed sse_relay_lag_ms.
    await wait_until(
        lambda: scraped(lambda: _value(families, "sse_relay_lag_ms_count") >= 1),
        30,
        "a live event relayed over SSE",
    )
    evicted = await client.admit(max_tokens=2, priority="batch")
    queued = await client.admit(max_tokens=2, priority="interactive")  # the queue is full: evicts
    last = (await client.events(evicted))[-1]
    assert last.event == "error" and last.data["code"] == "QUEUE_FULL_DROP_LRU", last
    status, body, _ = await client.submit(max_tokens=2, priority="interactive")
    assert status == 429 and body["code"] == "QUEUE_FULL_DROP_LRU", body  # nothing left to displace
    for task_id in (queued, running):
        assert await client.cancel(task_id) == 204
    await asyncio.wait_for(follower, 30)
    assert running_events[-1].event == "error" and running_events[-1].data["code"] == "CANCELED"


def _check_counts(families: dict[str, Any], metrics_base_port: int) -> None:
    """The scenario's counts, each from its owner."""
    assert _value(families, "tasks_enqueued_total") == 4  # done, running, evicted, queued
    assert _value(families, "tasks_canceled_total", reason="client") == 2
    assert _value(families, "tasks_rejected_total", reason="QUEUE_FULL_DROP_LRU") == 2  # evicted + 429
    assert _value(families, "admission_backpressure_events_total", policy="drop-lru") == 2
    assert _value(families, "tasks_started_total", pool_id=POOL) == 2
    assert _value(families, "latency_decode_ms_count", pool_id=POOL) == 1  # the completed task only
    assert _value(families, "latency_first_token_ms_count", pool_id=POOL) == 2
    assert _value(families, "queue_depth") == 0
    states = {s.labels["state"]: s.value for s in families["model_state"].samples}
    assert states["Active"] == 1 and sum(states.values()) == 1 and len(states) == 5, states
    manager = f"127.0.0.1:{metrics_base_port + 10}"  # pool manager 0 (SPEC §1: 9111+n)
    up = {s.labels["component"]: s.value for s in families["component_up"].samples}
    assert up == {"scheduler": 1.0, f"pool-manager@{manager}": 1.0}, up
    # Per-GPU gauges from the fake GPU; the replica's own gauges from the mock's report.
    gpu = {"pool_id": POOL, "device": "0"}
    assert _value(families, "gpu_device_vram_total_bytes", **gpu) == GPU_TOTAL_BYTES
    assert 0 < _value(families, "gpu_device_vram_used_bytes", **gpu) <= GPU_TOTAL_BYTES
    assert _value(families, "gpu_device_utilization", **gpu) == 0.0  # the fake GPU's, not the mock's
    assert _value(families, "gpu_utilization", pool_id=POOL, device="0") == 37.0
    assert _value(families, "sse_relay_lag_ms_count") >= 1


def _check_logs(stack: Stack) -> None:
    logs = stack.logs()
    assert stack.token not in logs and stack.env["LLORCH_INTERNAL_TOKEN"] not in logs
    lines = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "service", "event", "msg"} <= set(line) for line in lines)
    admitted = [
        line for line in lines if line["event"] == "admission_accepted" and line["task_id"] == "obs-done"
    ]
    assert admitted and admitted[0]["correlation_id"] and admitted[0]["job_id"] == "obs-done"


def _check_family(family: Any, name: str, kind: str, labels: list[str], budgets: dict[str, int]) -> None:
    assert family.type == kind, (name, family.type)
    values: dict[str, set[str]] = {}
    for sample in family.samples:
        if sample.name.endswith("_created"):
            continue  # prometheus_client's creation timestamps carry the same labels
        own = {k: v for k, v in sample.labels.items() if not (k == "le" and sample.name.endswith("_bucket"))}
        assert sorted(own) == sorted(labels), (name, sample)
        for key, value in own.items():
            values.setdefault(key, set()).add(value)
    for key, seen in values.items():
        assert len(seen) <= budgets.get(key, 10**9), (name, key)


def _metrics_base_port(stack: Stack) -> int:
    return int(yaml.safe_load(stack.config_path.read_text())["grpc"]["metrics_base_port"])


def _name(family: Any) -> str:
    """prometheus_client strips `_total` from counter family names; the contract keeps it."""
    return f"{family.name}_total" if family.type == "counter" else str(family.name)
