"""Effects of config keys that no other test changed (issue 15, "No inert config").

Each test sets one key to a non-default value, wires the parts the way the composition roots wire them
(``llorch_scheduler.__main__.build``, the gateway's ``load_tokens``, ``load_internal_token``) and
observes what the key changes. ``tests/unit/test_config_keys.py`` names these tests in its table.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from llorch.adapters.launch import engine_command
from llorch.config import ConfigError, LlorchConfig, validate_config
from llorch.errors import Code, OrchestratorError
from llorch.rpc import load_internal_token
from llorch.store import Store
from llorch.v1 import types_pb2
from llorch_gateway.auth import load_tokens
from llorch_poolmgr.__main__ import addresses
from llorch_scheduler.__main__ import Parts, build
from llorch_scheduler.metrics import SchedulerMetrics
from llorch_scheduler.registry import PoolRegistry
from llorch_scheduler.submission import Submission
from tests.support.procs import free_port

MODEL = "mock-tiny"
CAPACITY = 4


def _config(tmp_path: Path, **sections: Any) -> LlorchConfig:
    data: dict[str, Any] = {
        "version": 1,
        "state_dir": str(tmp_path / "state"),
        "catalog": {"models": [{"id": MODEL, "path": str(Path(__file__))}]},
        "pools": [
            {
                "id": "p1",
                "engine": "mock",
                "model": MODEL,
                "devices": "cpu",
                "queue": {"capacity": CAPACITY, "full_policy": "reject"},
            }
        ],
    }
    data.update(sections)
    return validate_config(data)


def _report(cfg: LlorchConfig) -> types_pb2.PoolState:
    """The pool report a pool manager sends for the config's one pool (1 Ready slot)."""
    pool = cfg.pools[0]
    return types_pb2.PoolState(
        pool_id=pool.id,
        engine=pool.engine,
        engine_version="mock-1",
        model_ref=pool.model,
        model_digest="sha256:0",
        ctx=pool.ctx,
        sampler_profile_version=pool.sampler_profile_version,
        state="Ready",
        replicas=[types_pb2.ReplicaState(replica_id="p1-r0", state="Ready", slots_total=1, pid=42)],
        queue_capacity=pool.queue.capacity,
        full_policy=pool.queue.full_policy,
        max_tokens_limit=pool.effective_max_tokens_limit,
        live=True,
        workloads=list(pool.workloads),
    )


def _parts(cfg: LlorchConfig, store: Store) -> Parts:
    registry = PoolRegistry()
    parts = build(cfg, store, registry, SchedulerMetrics(CollectorRegistry()), "token")
    registry.update("pm-0", f"127.0.0.1:{free_port()}", "127.0.0.1:1", [_report(cfg)])
    return parts


@pytest.fixture
async def store(redis_url: str) -> AsyncIterator[Store]:
    async with Store.connect(redis_url, prefix="keys:") as s:
        await s.client.flushdb()
        yield s


def _task(**fields: Any) -> Submission:
    return Submission(model_ref=MODEL, prompt="hello", **fields)


# -- scheduler.* ---------------------------------------------------------------------------------------


async def test_default_max_tokens_fills_a_task_that_names_none(tmp_path: Path, store: Store) -> None:
    parts = _parts(_config(tmp_path, scheduler={"default_max_tokens": 7}), store)
    admitted = await parts.admission.admit(_task())
    record = await store.task(admitted.task_id)
    assert record is not None and record.request.max_tokens == 7


async def test_default_deadline_ms_fills_a_task_that_names_none(tmp_path: Path, store: Store) -> None:
    parts = _parts(_config(tmp_path, scheduler={"default_deadline_ms": 123_456}), store)
    admitted = await parts.admission.admit(_task(max_tokens=4))
    record = await store.task(admitted.task_id)
    assert record is not None and record.deadline_ms == 123_456


async def test_max_deadline_ms_refuses_a_longer_deadline(tmp_path: Path, store: Store) -> None:
    scheduler = {"default_deadline_ms": 5000, "max_deadline_ms": 9000}
    parts = _parts(_config(tmp_path, scheduler=scheduler), store)
    await parts.admission.admit(_task(max_tokens=4, deadline_ms=9000))  # at the cap: admitted
    with pytest.raises(OrchestratorError) as refused:
        await parts.admission.admit(_task(max_tokens=4, deadline_ms=9001))
    assert refused.value.code == Code.INVALID_PARAMS and "at most 9000" in str(refused.value)


async def test_backoff_min_ms_raises_the_advertised_backoff(tmp_path: Path, store: Store) -> None:
    # A watermark of 1/CAPACITY advertises a backoff from the first task on; the raw estimate (one
    # token at the 25 ms prior) is far below the floor, so the floor is what is advertised.
    cfg = _config(tmp_path, scheduler={"backoff_min_ms": 5000}, queue={"soft_watermark": 1 / CAPACITY})
    admitted = await _parts(cfg, store).admission.admit(_task(max_tokens=4))
    assert admitted.backoff_ms == 5000


async def test_backoff_max_ms_caps_the_advertised_backoff(tmp_path: Path, store: Store) -> None:
    scheduler = {"backoff_min_ms": 1, "backoff_max_ms": 2000, "prior_ms_per_token": 100_000}
    cfg = _config(tmp_path, scheduler=scheduler, queue={"soft_watermark": 1 / CAPACITY})
    admitted = await _parts(cfg, store).admission.admit(_task(max_tokens=4))
    assert admitted.backoff_ms == 2000


async def test_soft_watermark_is_where_the_backoff_starts(tmp_path: Path, store: Store) -> None:
    low = _config(tmp_path, queue={"soft_watermark": 1 / CAPACITY})
    assert (await _parts(low, store).admission.admit(_task(max_tokens=4))).backoff_ms > 0
    await store.client.flushdb()
    default = _config(tmp_path)  # 0.8 of 4: the first task is below it
    assert (await _parts(default, store).admission.admit(_task(max_tokens=4))).backoff_ms == 0


async def test_prior_ms_per_token_scales_the_predicted_start(tmp_path: Path, store: Store) -> None:
    async def second_start(prior: float) -> int:
        await store.client.flushdb()
        parts = _parts(_config(tmp_path, scheduler={"prior_ms_per_token": prior}), store)
        await parts.admission.admit(_task(max_tokens=8))
        return (await parts.admission.admit(_task(max_tokens=8))).predicted_start_ms  # behind one task

    slow, fast = await second_start(1000), await second_start(10)
    assert slow >= 8 * 1000 > fast


async def test_ewma_alpha_weights_each_observation(tmp_path: Path, store: Store) -> None:
    parts = _parts(_config(tmp_path, scheduler={"ewma_alpha": 1.0}), store)
    estimator, rs = parts.admission.estimator, "rs"
    estimator.finished(rs, "a", tokens_out=10, decode_ms=100, ok=True)  # the first sample is taken as is
    estimator.finished(rs, "b", tokens_out=10, decode_ms=1000, ok=True)
    assert estimator.service_ms(rs, 1) == 100  # alpha 1 forgets the past; the default 0.2 gives 28


async def test_retention_s_sets_how_long_a_task_is_kept(tmp_path: Path, store: Store) -> None:
    async def ttls_s(retention_s: int | None) -> list[int]:
        await store.client.flushdb()
        sse = {} if retention_s is None else {"retention_s": retention_s}
        await _parts(_config(tmp_path, sse=sse), store).admission.admit(_task(max_tokens=4))
        return [int(await store.client.ttl(key)) async for key in store.client.scan_iter(match="keys:*")]

    # The task's keys outlive its deadline (300 s by default) by retention_s (900 s by default); other
    # keys keep TTLs of their own (a week), outside this window.
    def kept_for_retention(ttls: list[int]) -> list[int]:
        return [ttl for ttl in ttls if 100_000 <= ttl <= 110_000]

    assert kept_for_retention(await ttls_s(100_000))
    assert not kept_for_retention(await ttls_s(None))


# -- pools[].admission.interactive.* -------------------------------------------------------------------


async def test_interactive_class_limits_refuse_interactive_tasks_only(tmp_path: Path, store: Store) -> None:
    for interactive in ({"queue_capacity": 1}, {"rate_limit_rps": 0.001}):
        await store.client.flushdb()
        cfg = _config(tmp_path)
        pool = {**cfg.pools[0].model_dump(exclude_unset=True), "admission": {"interactive": interactive}}
        parts = _parts(_config(tmp_path, pools=[pool]), store)
        await parts.admission.admit(_task(max_tokens=4, priority="interactive"))
        with pytest.raises(OrchestratorError) as refused:
            await parts.admission.admit(_task(max_tokens=4, priority="interactive"))
        assert refused.value.code == Code.ADMISSION_REJECT, (interactive, refused.value)
        await parts.admission.admit(_task(max_tokens=4, priority="batch"))  # the other class has room


# -- sessions.budgets.* --------------------------------------------------------------------------------


async def test_session_budgets_are_the_defaults_of_a_new_session(tmp_path: Path, store: Store) -> None:
    budgets = {"tokens": 100, "time_ms": 60_000, "cost": 1.0}
    parts = _parts(_config(tmp_path, sessions={"budgets": budgets}), store)
    admitted = await parts.admission.admit(_task(session_id="s1", max_tokens=8))
    assert admitted.budgets is not None
    # The first turn reserves its tokens (prompt estimate + max_tokens) against the configured 100;
    # time and cost start from the configured values (cost_per_1k_tokens is 0 here).
    assert admitted.budgets.tokens is not None and 100 - 8 - 8 <= admitted.budgets.tokens < 100
    assert admitted.budgets.time_ms is not None and 0 < admitted.budgets.time_ms <= 60_000
    assert admitted.budgets.cost_micro == 1_000_000
    unlimited = await _parts(_config(tmp_path), store).admission.admit(_task(session_id="s2", max_tokens=8))
    assert unlimited.budgets is not None and unlimited.budgets.tokens is None


# -- catalog.models[] ----------------------------------------------------------------------------------


async def test_configured_catalog_fields_reach_the_catalog(tmp_path: Path, store: Store) -> None:
    digest = "sha256:" + "ab" * 32
    signature = {"signer": "ops", "algo": "ed25519", "sig": "c2ln", "timestamp_ms": 1_700_000_000_000}
    declared = {
        "id": MODEL,
        "path": str(Path(__file__)),
        "digest": digest,
        "source_url": "https://huggingface.co/org/model",
        "tags": ["keys-test"],
        "state": "Canary",
        "signatures": [signature],
        "sbom": {"uri": "sbom.json", "digest": digest},
    }
    cfg = _config(tmp_path, catalog={"models": [declared]})
    parts = _parts(cfg, store)
    try:
        await parts.catalog.import_config(cfg.catalog.models)
        entry = parts.catalog.get(MODEL)
    finally:
        parts.catalog.close()
    assert {key: entry[key] for key in declared} == declared
    assert [e["id"] for e in parts.catalog.entries(tag="keys-test")] == [MODEL]


# -- pools[].tensor_split ------------------------------------------------------------------------------


def test_tensor_split_is_passed_to_llama_server(tmp_path: Path) -> None:
    def no_ports() -> int:
        raise AssertionError("llama-server needs no extra ports")

    pool = {"id": "split", "engine": "llamacpp", "model": MODEL, "devices": [0, 1], "tensor_split": [3, 1]}
    cfg = _config(tmp_path, pools=[pool])
    argv = engine_command(cfg.pools[0], "llama-server", Path(__file__), 9000, no_ports).argv
    assert argv[argv.index("-ts") + 1] == "3,1"
    plain = _config(tmp_path, pools=[{**pool, "tensor_split": None}]).pools[0]
    assert "-ts" not in engine_command(plain, "llama-server", Path(__file__), 9000, no_ports).argv


# -- api.tokens[] and grpc.* ---------------------------------------------------------------------------


def test_api_tokens_come_from_their_env_var_or_file_under_their_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KEYS_TEST_TOKEN", "from-env")
    token_file = tmp_path / "ci.token"
    token_file.write_text("from-file\n")
    token_file.chmod(0o600)
    tokens = [
        {"name": "agents", "token_env": "KEYS_TEST_TOKEN"},
        {"name": "ci", "token_file": str(token_file)},
    ]
    loaded = load_tokens(_config(tmp_path, api={"tokens": tokens}))
    assert [(t.name, t.value) for t in loaded] == [("agents", b"from-env"), ("ci", b"from-file")]


def test_internal_token_file_or_state_dir_is_where_the_internal_token_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLORCH_INTERNAL_TOKEN", raising=False)
    token_file = tmp_path / "elsewhere" / "internal.token"
    token_file.parent.mkdir()
    token_file.write_text("shared-secret\n")
    cfg = _config(tmp_path, grpc={"internal_token_file": str(token_file)})
    assert load_internal_token(cfg.state_dir, cfg.grpc.internal_token_file) == "shared-secret"
    # Without the key the token lives in state_dir, where `llorch up` creates it.
    plain = _config(tmp_path, state_dir=str(tmp_path / "other-state"))
    created = load_internal_token(plain.state_dir, plain.grpc.internal_token_file, create=True)
    assert (tmp_path / "other-state" / "internal.token").read_text() == created != "shared-secret"


def test_base_ports_place_each_pool_manager(tmp_path: Path) -> None:
    grpc = {"scheduler": "10.0.0.1:50051", "pool_manager_base_port": 40000, "metrics_base_port": 30000}
    cfg = _config(tmp_path, grpc=grpc)
    assert addresses(cfg, 2) == ("10.0.0.1:40002", "10.0.0.1:30012")  # manager n: base + n, metrics +10


# -- telemetry.log_prompts -----------------------------------------------------------------------------


def test_log_prompts_true_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    assert _config(tmp_path, telemetry={"log_prompts": False}).telemetry.log_prompts is False
    with pytest.raises(ConfigError) as refused:
        _config(tmp_path, telemetry={"log_prompts": True})
    [error] = refused.value.errors
    assert error.startswith("telemetry.log_prompts: ") and "not supported yet" in error


@pytest.mark.parametrize("interval_ms", [250, 4000])
async def test_the_queue_watch_scans_every_queued_metrics_interval(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch, interval_ms: int
) -> None:
    """sse.queued_metrics_interval_ms is the pause between two scans of the queues (the cadence of
    queued `metrics` frames): the watch's loop waits exactly that long before each scan."""
    from llorch_scheduler import queuewatch

    waits: list[float] = []

    async def pause(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            raise asyncio.CancelledError  # two turns of the loop are enough

    monkeypatch.setattr(queuewatch.asyncio, "sleep", pause)
    parts = _parts(_config(tmp_path, sse={"queued_metrics_interval_ms": interval_ms}), store)
    with pytest.raises(asyncio.CancelledError):
        await parts.watch.run()
    assert waits == [interval_ms / 1000] * 2
