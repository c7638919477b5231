"""Config models, rules, loading and schema (SPEC §7)."""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from llorch.config import (
    ConfigError,
    LlorchConfig,
    PoolConfig,
    config_schema_json,
    load_config,
    resolve_config_path,
    validate_config,
)
from llorch_cli import config_cmd

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
HOST_NAME_RULE = (
    "expected 'local' or a host name: lowercase letters, digits and '-', in dot-separated labels of at "
    "most 63 characters (e.g. a Kubernetes node name)"
)
LLORCH_ENV = ("LLORCH_CONFIG", "LLORCH_STATE_DIR", "LLORCH_REDIS_URL", "LLORCH_API_BIND", "LLORCH_LOG_LEVEL")


def pool(i: int = 0, **keys: Any) -> dict[str, Any]:
    return {"id": f"p{i}", "engine": "mock", "model": "m", **keys}


def config(*pools: dict[str, Any], **keys: Any) -> dict[str, Any]:
    return {"version": 1, "pools": list(pools) or [pool()], **keys}


def errors_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    return info.value.errors


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in LLORCH_ENV:
        monkeypatch.delenv(var, raising=False)


# ---- examples and defaults ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "dev-mock.yaml",
        "dev-llamacpp.yaml",
        "workstation-mixed-gpu.yaml",
        "dev-box-fake-gpu.yaml",
        "workstation-on-demand.yaml",
    ],
)
def test_every_example_validates(name: str) -> None:
    cfg = load_config(EXAMPLES / name, env={})
    assert cfg.version == 1
    assert cfg.pools
    assert cfg.state_dir.is_absolute()
    assert all(m.path.is_absolute() for m in cfg.catalog.models)


def test_dev_mock_example_resolves_paths_from_its_directory() -> None:
    cfg = load_config(EXAMPLES / "dev-mock.yaml", env={})
    assert cfg.state_dir == REPO / ".llorch-state" / "mock"
    assert cfg.catalog.models[0].path == REPO / "tests" / "fixtures" / "mock-model.bin"
    assert cfg.catalog.models[0].path.is_file()
    assert cfg.redis.url is None
    (mock,) = cfg.pools
    assert (mock.devices, mock.slots, mock.engine_args) == ("cpu", 2, ["--token-delay-ms", "20"])
    assert (mock.queue.capacity, mock.queue.full_policy) == (16, "reject")
    assert mock.effective_engine_bin == "llorch-mock-engine"


def test_dev_llamacpp_example_is_a_cpu_llama_server_pool() -> None:
    cfg = load_config(EXAMPLES / "dev-llamacpp.yaml", env={})
    (smol,) = cfg.pools
    assert (smol.engine, smol.devices, smol.allow_cpu, smol.ctx, smol.slots) == (
        "llamacpp",
        "cpu",
        True,
        2048,
        1,
    )
    assert smol.effective_engine_bin == "llama-server"
    assert smol.effective_ram_factor == 1.2
    assert cfg.catalog.models[0].path == REPO / ".models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_spec_example_a_values() -> None:
    cfg = load_config(EXAMPLES / "workstation-mixed-gpu.yaml", env={})
    qwen0, qwen1, vllm = cfg.pools
    assert [t.name for t in cfg.api.tokens] == ["agents", "batch-jobs"]
    assert cfg.api.tokens[0].rps == 20.0 and isinstance(cfg.api.tokens[0].rps, float)
    assert (qwen0.devices, qwen1.devices, qwen0.queue.full_policy) == ([0], [1], "drop-lru")
    assert vllm.admission.batch.queue_capacity == 64
    assert vllm.timeouts.wall_ms == 300_000
    assert vllm.effective_engine_bin == "vllm"
    assert vllm.effective_ram_factor == 0.25
    assert cfg.sessions.budgets.tokens == 200_000


def test_defaults_follow_spec(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = validate_config(config())
    assert cfg.state_dir == tmp_path / ".local/state/llorch"
    assert (cfg.api.bind, cfg.api.max_body_bytes, cfg.api.probes_require_auth) == (
        "127.0.0.1:8080",
        1048576,
        False,
    )
    assert cfg.api.effective_public_base_url == "http://127.0.0.1:8080"
    assert (cfg.grpc.scheduler, cfg.grpc.pool_manager_base_port, cfg.grpc.metrics_base_port) == (
        "127.0.0.1:50051",
        50061,
        9101,
    )
    assert (cfg.redis.url, cfg.redis.key_prefix) == (None, "llorch:")
    s = cfg.scheduler
    assert (s.default_max_tokens, s.default_deadline_ms, s.max_deadline_ms, s.dispatch_attempts) == (
        512,
        300_000,
        86_400_000,
        3,
    )
    assert (s.ewma_alpha, s.prior_ms_per_token, s.backoff_min_ms, s.backoff_max_ms) == (0.2, 25, 250, 60_000)
    assert (cfg.queue.soft_watermark, cfg.queue.max_batch_wait_ms) == (0.8, None)
    assert (cfg.sessions.ttl_ms, cfg.sessions.max_turns) == (600_000, 8)
    assert (cfg.sse.heartbeat_s, cfg.sse.retention_s, cfg.sse.queued_metrics_interval_ms) == (15, 900, 1000)
    assert cfg.sampler_profiles["v1"].top_k == 1
    assert cfg.catalog.trust_policy.mode == "permissive"
    assert not cfg.catalog.trust_policy.effective_require_signature
    assert cfg.effective_artifacts_dir == cfg.state_dir / "artifacts"
    assert cfg.artifacts.max_bytes == 8_388_608
    assert (cfg.policy.default, cfg.policy.max_redirects, cfg.policy.plugin_timeout_ms) == ("allow", 3, 200)
    assert (cfg.telemetry.log_level, cfg.telemetry.gpu_provider) == ("info", "nvml")
    p = cfg.pools[0]
    assert (p.devices, p.host, p.ctx, p.slots, p.replicas, p.workloads) == (
        "auto",
        "local",
        4096,
        1,
        1,
        ["completion"],
    )
    assert (p.queue.capacity, p.queue.full_policy, p.sampler_profile_version) == (64, "reject", "v1")
    assert (p.timeouts.wall_ms, p.timeouts.idle_ms, p.timeouts.start_ms, p.timeouts.selftest_ms) == (
        600_000,
        60_000,
        600_000,
        60_000,
    )
    assert (p.restart.initial_backoff_ms, p.restart.max_backoff_ms, p.restart.breaker_failures) == (
        1000,
        60_000,
        5,
    )
    assert (p.vram.factor, p.vram.kv_reserve_mib, p.vram.headroom_mib) == (1.10, None, 512)
    assert p.effective_max_tokens_limit == 4096
    assert p.effective_ram_factor == 0.25


def test_effective_properties() -> None:
    p = PoolConfig.model_validate(
        pool(engine="llamacpp", devices=[0, 1], tensor_split=[3.0, 1.0], max_tokens_limit=100, ram_factor=2.0)
    )
    assert p.effective_max_tokens_limit == 100
    assert p.effective_ram_factor == 2.0
    assert p.normalized_tensor_split == [0.75, 0.25]
    assert PoolConfig.model_validate(pool(engine="tgi")).effective_engine_bin == "text-generation-launcher"
    triton = PoolConfig.model_validate(pool(engine="triton", adapter={"model_name": "ens"}))
    assert triton.effective_engine_bin == "tritonserver"
    assert PoolConfig.model_validate(pool(engine_bin="/opt/m")).effective_engine_bin == "/opt/m"


def test_models_are_frozen() -> None:
    cfg = validate_config(config())
    with pytest.raises(ValidationError):
        cfg.pools[0].ctx = 1  # type: ignore[misc]


# ---- error format -------------------------------------------------------------------------------------


def test_unknown_key_names_the_path_and_the_closest_key() -> None:
    data = config(pool(0), pool(1, queue={"capcity": 3}))
    assert errors_of(data) == ["pools[1].queue.capcity: unknown key (did you mean 'capacity'?)"]


def test_unknown_key_without_a_close_match_has_no_hint() -> None:
    assert errors_of(config(pool(0, zzzzzz=1))) == ["pools[0].zzzzzz: unknown key"]
    assert errors_of(config(telemetryy={})) == ["telemetryy: unknown key (did you mean 'telemetry'?)"]


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"ctx": "4096"}, "pools[0].ctx: expected int, got string"),
        ({"slots": 2.0}, "pools[0].slots: expected int, got float"),
        ({"slots": True}, "pools[0].slots: expected int, got bool"),
        ({"preload": "true"}, "pools[0].preload: expected bool, got string"),
        ({"allow_cpu": 1}, "pools[0].allow_cpu: expected bool, got int"),
        ({"cost_per_1k_tokens": "0.5"}, "pools[0].cost_per_1k_tokens: expected number, got string"),
        ({"engine_args": [5]}, "pools[0].engine_args[0]: expected string, got int"),
        ({"engine_env": {"OMP_THREADS": 4}}, "pools[0].engine_env.OMP_THREADS: expected string, got int"),
        ({"queue": [64]}, "pools[0].queue: expected mapping, got list"),
        ({"ram_factor": True}, "pools[0].ram_factor: expected number, got bool"),
        ({"model": None}, "pools[0].model: expected string, got null"),
    ],
)
def test_types_are_not_coerced(keys: dict[str, Any], expected: str) -> None:
    assert errors_of(config(pool(**keys))) == [expected]


@pytest.mark.parametrize(
    ("value", "expected"), [("1", "expected int 1"), (True, "expected int 1"), (2, "must be 1")]
)
def test_version_must_be_the_int_1(value: object, expected: str) -> None:
    (error,) = errors_of({"version": value, "pools": [pool()]})
    assert error.startswith("version: ") and expected in error


def test_all_problems_are_reported_together() -> None:
    data = config(
        pool(0, ctx="big", queue={"capcity": 1}),
        pool(1, engine="llamacpp", devices="cpu", engine_args=["--port", "1"]),
        pool(1),
        api={"bind": "localhost"},
        telemetry={"fake_gpus": [{"index": 0, "name": "x", "total_mib": 1, "free_mib": 1}]},
    )
    assert sorted(errors_of(data)) == sorted(
        [
            "api.bind: expected host:port, e.g. 127.0.0.1:8080 (IPv6 as [::1]:8080), port 1..65535",
            "pools[0].ctx: expected int, got string",
            "pools[0].queue.capcity: unknown key (did you mean 'capacity'?)",
            "pools[1].devices: 'cpu' needs allow_cpu: true (GPU pools never fall back to the CPU)",
            "pools[1].engine_args[0]: '--port' is managed by llorch; set the pool's keys instead",
            "telemetry.fake_gpus: needs gpu_provider: fake",
            # Cross-pool rules still run over the pools whose identity keys are valid.
            "pools[2].id: duplicate pool id 'p1' (first at pools[1])",
        ]
    )


def test_error_messages_and_causes_never_carry_secrets() -> None:
    data = config(redis={"url": "redis://:hunter2@127.0.0.1:6379/0"}, pools="hunter2")
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    assert "hunter2" not in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


# ---- cross-field rules --------------------------------------------------------------------------------

RULE_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("pools required", {"version": 1}, "pools: required key is missing"),
    ("pools non-empty", {"version": 1, "pools": []}, "pools: must have at least 1 item(s)"),
    (
        "unique pool ids",
        config(pool(0), pool(1), pool(0)),
        "pools[2].id: duplicate pool id 'p0' (first at pools[0])",
    ),
    (
        "sampler profile exists",
        config(pool(0, sampler_profile_version="v2")),
        "pools[0].sampler_profile_version: unknown sampler profile 'v2' (sampler_profiles has: v1)",
    ),
    (
        "full_policy agrees within a set",
        config(pool(0), pool(1, queue={"full_policy": "drop-lru"})),
        "pools[1].queue.full_policy: 'drop-lru' differs from pools[0] ('reject'); pools with the same "
        "(engine, model, ctx, sampler_profile_version) form one replica set and must agree",
    ),
    (
        "at most 3 engine kinds",
        config(*(pool(i, engine=e) for i, e in enumerate(["llamacpp", "vllm", "tgi", "mock"]))),
        "pools: uses 4 engine kinds (llamacpp, mock, tgi, vllm); at most 3 are allowed",
    ),
    (
        "pools + sets <= 256",
        config(*(pool(i, ctx=256 + i) for i in range(129))),
        "pools: 129 pools + 129 replica sets exceed the limit of 256",
    ),
    (
        "replicas <= 1024",
        config(*(pool(i, replicas=8) for i in range(129))),
        "pools: 1032 replicas in total exceed the limit of 1024",
    ),
    (
        "cpu needs allow_cpu",
        config(pool(0, engine="llamacpp", devices="cpu")),
        "pools[0].devices: 'cpu' needs allow_cpu: true (GPU pools never fall back to the CPU)",
    ),
    (
        "fake_gpus needs gpu_provider fake",
        config(telemetry={"fake_gpus": [{"index": 0, "name": "F", "total_mib": 8, "free_mib": 8}]}),
        "telemetry.fake_gpus: needs gpu_provider: fake",
    ),
    (
        "fake gpu free <= total",
        config(
            telemetry={
                "gpu_provider": "fake",
                "fake_gpus": [{"index": 0, "name": "F", "total_mib": 8, "free_mib": 9}],
            }
        ),
        "telemetry.fake_gpus[0].free_mib: must be <= total_mib (8)",
    ),
    (
        "redis url without password",
        config(redis={"url": "redis://user:s3cret@localhost:6379/0"}),
        "redis.url: must not contain a password; set LLORCH_REDIS_PASSWORD instead",
    ),
    (
        "redis url without password query",
        config(redis={"url": "unix:///run/redis.sock?password=s3cret"}),
        "redis.url: must not contain a password; set LLORCH_REDIS_PASSWORD instead",
    ),
    (
        "tensor_split is llamacpp only",
        config(pool(0, engine="vllm", devices=[0, 1], tensor_split=[1.0, 1.0])),
        "pools[0].tensor_split: only engine llamacpp supports tensor_split, not vllm",
    ),
    (
        "tensor_split needs 2 devices",
        config(pool(0, engine="llamacpp", devices=[0], tensor_split=[1.0])),
        "pools[0].tensor_split: needs devices to list at least 2 GPU indices",
    ),
    (
        "tensor_split length matches devices",
        config(pool(0, engine="llamacpp", devices=[0, 1], tensor_split=[1.0, 1.0, 1.0])),
        "pools[0].tensor_split: has 3 values but devices lists 2 GPUs",
    ),
    (
        "tensor_split values > 0",
        config(pool(0, engine="llamacpp", devices=[0, 1], tensor_split=[1.0, 0.0])),
        "pools[0].tensor_split[1]: must be > 0.0",
    ),
    ("pool id regex", config(pool(0, id="Pool_A")), "pools[0].id: must match ^[a-z0-9][a-z0-9-]{0,62}$"),
    ("pool id length", config(pool(0, id="a" * 64)), "pools[0].id: must match ^[a-z0-9][a-z0-9-]{0,62}$"),
    ("devices distinct", config(pool(0, devices=[1, 1])), "pools[0].devices: GPU indices must be distinct"),
    ("devices >= 0", config(pool(0, devices=[-1])), "pools[0].devices: GPU indices must be ints >= 0"),
    (
        "devices keyword",
        config(pool(0, devices="gpu")),
        "pools[0].devices: expected a list of GPU indices, 'cpu' or 'auto', got string",
    ),
    (
        "api token name regex",
        config(api={"tokens": [{"name": "Agents!", "token_env": "T"}]}),
        "api.tokens[0].name: must match ^[a-z0-9_-]{1,32}$",
    ),
    (
        "api token names unique",
        config(api={"tokens": [{"name": "a", "token_env": "T1"}, {"name": "a", "token_env": "T2"}]}),
        "api.tokens[1].name: duplicate token name 'a' (first at [0])",
    ),
    (
        "api token needs one source",
        config(api={"tokens": [{"name": "a"}]}),
        "api.tokens[0].token_env: exactly one of token_env or token_file is required",
    ),
    (
        "api token not both sources",
        config(api={"tokens": [{"name": "a", "token_env": "T", "token_file": "/t"}]}),
        "api.tokens[0].token_env: exactly one of token_env or token_file is required",
    ),
    (
        "catalog model id regex",
        config(catalog={"models": [{"id": "-bad", "path": "/m"}]}),
        "catalog.models[0].id: must match ^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$",
    ),
    (
        "catalog model ids unique",
        config(catalog={"models": [{"id": "m", "path": "/a"}, {"id": "m", "path": "/b"}]}),
        "catalog.models[1].id: duplicate model id 'm' (first at [0])",
    ),
    (
        "api.bind is host:port",
        config(api={"bind": "127.0.0.1"}),
        "api.bind: expected host:port, e.g. 127.0.0.1:8080 (IPv6 as [::1]:8080), port 1..65535",
    ),
    (
        "grpc.scheduler is host:port",
        config(grpc={"scheduler": "127.0.0.1:70000"}),
        "grpc.scheduler: expected host:port, e.g. 127.0.0.1:8080 (IPv6 as [::1]:8080), port 1..65535",
    ),
    (
        "completion not combined",
        config(pool(0, workloads=["completion", "embedding"])),
        "pools[0].workloads: completion cannot be combined with embedding or rerank in one pool",
    ),
    (
        "max_tokens_limit <= ctx",
        config(pool(0, ctx=2048, max_tokens_limit=2049)),
        "pools[0].max_tokens_limit: must be <= ctx (2048)",
    ),
    (
        "class cap <= capacity",
        config(pool(0, queue={"capacity": 8}, admission={"interactive": {"queue_capacity": 9}})),
        "pools[0].admission.interactive.queue_capacity: must be <= queue.capacity (8)",
    ),
    (
        "rps > 0",
        config(pool(0, admission={"batch": {"rate_limit_rps": 0.0}})),
        "pools[0].admission.batch.rate_limit_rps: must be > 0.0",
    ),
    (
        "timeouts >= 1000",
        config(pool(0, timeouts={"idle_ms": 999})),
        "pools[0].timeouts.idle_ms: must be >= 1000",
    ),
    ("ctx range", config(pool(0, ctx=128)), "pools[0].ctx: must be >= 256"),
    ("slots range", config(pool(0, slots=65)), "pools[0].slots: must be <= 64"),
    ("replicas range", config(pool(0, replicas=9)), "pools[0].replicas: must be <= 8"),
    (
        "capacity range",
        config(pool(0, queue={"capacity": 100_001})),
        "pools[0].queue.capacity: must be <= 100000",
    ),
    ("vram factor", config(pool(0, vram={"factor": 0.9})), "pools[0].vram.factor: must be >= 1.0"),
    ("host upper case", config(pool(0, host="GPU-Box")), f"pools[0].host: {HOST_NAME_RULE}"),
    ("host underscore", config(pool(0, host="gpu_box")), f"pools[0].host: {HOST_NAME_RULE}"),
    ("host leading dash", config(pool(0, host="-gpu")), f"pools[0].host: {HOST_NAME_RULE}"),
    ("host empty label", config(pool(0, host="gpu..lan")), f"pools[0].host: {HOST_NAME_RULE}"),
    ("host label > 63", config(pool(0, host="a" * 64)), f"pools[0].host: {HOST_NAME_RULE}"),
    ("host name > 253", config(pool(0, host=".".join(["a" * 63] * 4))), f"pools[0].host: {HOST_NAME_RULE}"),
    ("host type", config(pool(0, host=2)), "pools[0].host: expected string, got int"),
    (
        "engine enum",
        config(pool(0, engine="ollama")),
        "pools[0].engine: must be one of 'llamacpp', 'vllm', 'tgi', 'triton' or 'mock'",
    ),
    (
        "triton adapter needs model_name",
        config(pool(0, engine="triton")),
        "pools[0].adapter.model_name: required for engine triton",
    ),
    (
        "triton adapter keys",
        config(pool(0, engine="triton", adapter={"model_name": "e", "outptu": "x"})),
        "pools[0].adapter.outptu: unknown key (did you mean 'output'?)",
    ),
    (
        "other engines take no adapter keys",
        config(pool(0, engine="vllm", adapter={"model_name": "e"})),
        "pools[0].adapter.model_name: engine vllm accepts no adapter options in v1",
    ),
    (
        "scheduler deadlines ordered",
        config(scheduler={"default_deadline_ms": 10, "max_deadline_ms": 5}),
        "scheduler.default_deadline_ms: must be <= max_deadline_ms (5)",
    ),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in RULE_CASES], ids=[c[0] for c in RULE_CASES])
def test_rule_violation_is_reported(data: dict[str, Any], expected: str) -> None:
    assert errors_of(data) == [expected]


@pytest.mark.parametrize(
    "data",
    [
        config(pool(0), pool(1, ctx=8192, queue={"full_policy": "drop-lru"})),  # different sets may differ
        config(pool(0, engine="mock", devices="cpu")),  # the mock engine may run anywhere
        config(pool(0, engine="llamacpp", devices="cpu", allow_cpu=True)),
        config(pool(0, engine="llamacpp", devices=[0, 2], tensor_split=[2.0, 1.0])),
        config(pool(0, workloads=["embedding", "rerank"])),
        config(
            pool(
                0,
                ctx=2048,
                max_tokens_limit=2048,
                queue={"capacity": 8},
                admission={"batch": {"queue_capacity": 8}},
            )
        ),
        config(*(pool(i, ctx=256 + i) for i in range(128))),  # 128 pools + 128 sets = 256
        config(*(pool(i, replicas=8) for i in range(128))),  # 1024 replicas
        config(*(pool(i, engine=e) for i, e in enumerate(["llamacpp", "vllm", "mock", "mock"]))),
        config(redis={"url": "redis://default@127.0.0.1:6379/0"}),  # a user name is not a secret
        config(api={"bind": "[::1]:8080", "tokens": [{"name": "a", "token_file": "/t"}]}),
        config(pool(0, host="local"), pool(1, host="gpu-box-2"), pool(2, host="ip-10-0-1-7.ec2.internal")),
        config(pool(0, host="a" * 63), pool(1, host=".".join(["a" * 63] * 3 + ["b" * 61]))),  # 63 and 253
    ],
)
def test_rule_boundaries_are_accepted(data: dict[str, Any]) -> None:
    assert validate_config(data).pools


LLAMA_MANAGED = ["-m", "--model", "--host", "--port", "-c", "--ctx-size", "--parallel", "-np", "-ngl"]
LLAMA_MANAGED += ["--n-gpu-layers", "--device", "-dev", "--port=8081"]


@pytest.mark.parametrize(
    ("engine", "arg"),
    [(engine, flag) for engine in ("llamacpp", "mock") for flag in LLAMA_MANAGED]
    + [("vllm", "--max-model-len"), ("tgi", "--max-concurrent-requests"), ("triton", "--http-port=1")],
)
def test_managed_engine_flags_are_rejected(engine: str, arg: str) -> None:
    keys: dict[str, Any] = {"engine": engine, "engine_args": ["--threads", "4", arg]}
    if engine == "triton":
        keys["adapter"] = {"model_name": "ens"}
    flag = arg.split("=", maxsplit=1)[0]
    assert errors_of(config(pool(0, **keys))) == [
        f"pools[0].engine_args[2]: '{flag}' is managed by llorch; set the pool's keys instead"
    ]


@pytest.mark.parametrize("key", ["HF_TOKEN", "openai_api_key", "MySecretThing", "DB_PASSWORD", "keyring"])
def test_secret_like_engine_env_keys_are_rejected_without_their_value(key: str) -> None:
    (error,) = errors_of(config(pool(0, engine_env={"OMP_NUM_THREADS": "4", key: "v4lue-xyz"})))
    assert error.startswith(f"pools[0].engine_env.{key}: looks like a secret")
    assert "v4lue-xyz" not in error


pool_shapes = st.lists(
    st.tuples(
        st.sampled_from(["a", "b"]), st.sampled_from([2048, 4096]), st.sampled_from(["reject", "drop-lru"])
    ),
    min_size=1,
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(pool_shapes)
def test_full_policy_must_agree_exactly_within_each_approximated_set(
    shapes: list[tuple[str, int, str]],
) -> None:
    pools = [pool(i, model=m, ctx=c, queue={"full_policy": p}) for i, (m, c, p) in enumerate(shapes)]
    first_policy: dict[tuple[str, int], str] = {}
    expected_bad = []
    for i, (m, c, p) in enumerate(shapes):
        if first_policy.setdefault((m, c), p) != p:
            expected_bad.append(f"pools[{i}].queue.full_policy")
    try:
        validate_config(config(*pools))
        reported: list[str] = []
    except ConfigError as exc:
        reported = [e.split(":")[0] for e in exc.errors]
    assert reported == expected_bad


# ---- loading ------------------------------------------------------------------------------------------

RELATIVE_CONFIG = """
version: 1
state_dir: state
api: {tokens: [{name: ops, token_file: secrets/ops.token}]}
grpc: {internal_token_file: ../internal.token}
catalog: {models: [{id: m, path: models/m.gguf}, {id: abs, path: /models/a.gguf}, {id: home, path: ~/m.gguf}]}
artifacts: {dir: ./artifacts}
telemetry: {log_file: logs/llorch.jsonl}
pools:
  - {id: a, engine: mock, model: m, engine_bin: bin/engine}
  - {id: b, engine: mock, model: m, engine_bin: my-engine}
"""


def test_relative_paths_resolve_from_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    conf_dir = tmp_path / "etc" / "llorch"
    file = write(conf_dir / "config.yaml", RELATIVE_CONFIG)
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    cfg = load_config("../../etc/llorch/config.yaml", env={})
    assert file.exists()
    assert cfg.state_dir == conf_dir / "state"
    assert cfg.api.tokens[0].token_file == conf_dir / "secrets/ops.token"
    assert cfg.grpc.internal_token_file == tmp_path / "etc/internal.token"
    assert [m.path for m in cfg.catalog.models] == [
        conf_dir / "models/m.gguf",
        Path("/models/a.gguf"),
        home / "m.gguf",
    ]
    assert cfg.artifacts.dir == conf_dir / "artifacts"
    assert cfg.telemetry.log_file == conf_dir / "logs/llorch.jsonl"
    assert cfg.pools[0].effective_engine_bin == str(conf_dir / "bin/engine")
    assert cfg.pools[1].effective_engine_bin == "my-engine"  # a bare name stays a PATH lookup


def test_env_overrides_apply_before_validation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = write(
        tmp_path / "c.yaml", "version: 1\nstate_dir: /srv/a\npools: [{id: a, engine: mock, model: m}]\n"
    )
    monkeypatch.chdir(tmp_path)
    env = {
        "LLORCH_STATE_DIR": "rel/state",
        "LLORCH_REDIS_URL": "redis://127.0.0.1:6390/2",
        "LLORCH_API_BIND": "0.0.0.0:9000",
        "LLORCH_LOG_LEVEL": "DEBUG",
    }
    cfg = load_config(file, env=env)
    assert cfg.state_dir == tmp_path / "rel/state"  # relative to the caller's cwd, not the file
    assert cfg.redis.url == "redis://127.0.0.1:6390/2"
    assert cfg.api.bind == "0.0.0.0:9000"
    assert cfg.telemetry.log_level == "debug"
    assert load_config(file, env={"LLORCH_API_BIND": ""}).api.bind == "127.0.0.1:8080"  # empty = unset


def test_env_overrides_are_validated_too(tmp_path: Path) -> None:
    file = write(tmp_path / "c.yaml", "version: 1\npools: [{id: a, engine: mock, model: m}]\n")
    with pytest.raises(ConfigError) as info:
        load_config(file, env={"LLORCH_REDIS_URL": "redis://:pw-123@h:1/0", "LLORCH_API_BIND": "nope"})
    assert info.value.errors == [
        "api.bind: expected host:port, e.g. 127.0.0.1:8080 (IPv6 as [::1]:8080), port 1..65535",
        "redis.url: must not contain a password; set LLORCH_REDIS_PASSWORD instead",
    ]
    assert "pw-123" not in str(info.value)


def test_config_path_resolution_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_config_path(None, {}) == tmp_path / ".config/llorch/config.yaml"
    assert resolve_config_path(None, {"LLORCH_CONFIG": "/etc/l.yaml"}) == Path("/etc/l.yaml")
    assert resolve_config_path("x.yaml", {"LLORCH_CONFIG": "/etc/l.yaml"}) == Path("x.yaml")
    write(
        tmp_path / ".config/llorch/config.yaml", "version: 1\npools: [{id: home, engine: mock, model: m}]\n"
    )
    assert load_config(env={}).pools[0].id == "home"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 1\npools: [\n", "invalid YAML at line 3, column 1"),
        ("- 1\n- 2\n", "expected a mapping at the top level, got list"),
        ("", "expected a mapping at the top level, got null"),
        ("version: 1\nversion: 1\npools: []\n", "duplicate key 'version'"),
    ],
)
def test_bad_yaml_is_a_config_error(tmp_path: Path, text: str, message: str) -> None:
    file = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as info:
        load_config(file, env={})
    (error,) = info.value.errors
    assert error.startswith(f"{file}: ") and message in error


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml", env={})
    assert info.value.errors == [f"{tmp_path / 'nope.yaml'}: file not found"]


def test_validate_config_does_not_mutate_its_input() -> None:
    data = config(pool(0, queue={"capacity": 3}))
    before = copy.deepcopy(data)
    validate_config(data)
    assert data == before


# ---- schema and CLI -----------------------------------------------------------------------------------


def test_committed_schema_is_up_to_date() -> None:
    committed = (REPO / "contracts" / "config.schema.json").read_text(encoding="utf-8")
    assert committed == config_schema_json(), (
        "regenerate with: llorch config schema > contracts/config.schema.json"
    )


def test_schema_is_deterministic_json() -> None:
    text = config_schema_json()
    assert text.endswith("}\n") and text == config_schema_json()
    schema = json.loads(text)
    assert text == json.dumps(schema, sort_keys=True, indent=2) + "\n"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"version", "pools"}
    assert set(schema["properties"]) == set(LlorchConfig.model_fields)
    assert schema["properties"]["state_dir"]["default"] == "~/.local/state/llorch"


@functools.cache
def _schema_host_rule() -> dict[str, Any]:
    rule: dict[str, Any] = json.loads(config_schema_json())["$defs"]["PoolConfig"]["properties"]["host"]
    return rule


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.from_regex(r"[a-z0-9][a-z0-9.-]{0,20}[a-z0-9]", fullmatch=True),
        st.text(alphabet="aZ0-._ ", max_size=12),
    )
)
def test_schema_host_pattern_agrees_with_the_loader(host: str) -> None:
    """Editors check `pools[].host` with the published schema: it must accept exactly what loads."""
    rule = _schema_host_rule()
    by_schema = re.fullmatch(rule["pattern"].strip("^$"), host) is not None and len(host) <= rule["maxLength"]
    try:
        validate_config(config(pool(0, host=host)))
        loads = True
    except ConfigError:
        loads = False
    assert by_schema == loads, host


def test_cli_validate_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = write(tmp_path / "c.yaml", "version: 1\npools: [{id: a, engine: mock, model: m}]\n")
    assert config_cmd.validate(str(file)) == 0
    out, err = capsys.readouterr()
    assert (out, err) == (f"ok: {file}\n", "")


def test_cli_validate_reports_every_error_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = write(
        tmp_path / "c.yaml", "version: 1\npools: [{id: a, engine: mock, model: m, ctx: x, slot: 1}]\n"
    )
    assert config_cmd.validate(str(file)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "pools[0].ctx: expected int, got string",
        "pools[0].slot: unknown key (did you mean 'slots'?)",
    ]


def test_cli_validate_uses_llorch_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    file = write(tmp_path / "c.yaml", "version: 1\npools: [{id: a, engine: mock, model: m}]\n")
    monkeypatch.setenv("LLORCH_CONFIG", str(file))
    assert config_cmd.validate(None) == 0


def test_cli_schema_prints_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    assert config_cmd.schema() == 0
    assert capsys.readouterr().out == config_schema_json()


# ---- grpc.tls and redis credentials (issue 15) --------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"grpc": {"tls": {"cert_file": "c.pem"}}}, "grpc.tls.key_file: cert_file and key_file go together"),
        ({"grpc": {"tls": {"key_file": "k.pem"}}}, "grpc.tls.key_file: cert_file and key_file go together"),
        (
            {"grpc": {"tls": {"cert_file": "c.pem", "key_file": "k.pem", "require_client_cert": True}}},
            "grpc.tls.require_client_cert: needs ca_file (to check clients) and cert_file/key_file "
            "(presented as a client)",
        ),
        (
            {"grpc": {"tls": {"ca_file": "ca.pem", "require_client_cert": True}}},
            "grpc.tls.require_client_cert: needs ca_file (to check clients) and cert_file/key_file "
            "(presented as a client)",
        ),
        ({"grpc": {"tls": {"ca": "ca.pem"}}}, "grpc.tls.ca: unknown key"),
        (
            {"redis": {"url": "redis://h:6379/0", "tls_ca_file": "ca.pem"}},
            "redis.tls_ca_file: needs a rediss://",
        ),
        ({"redis": {"tls_ca_file": "ca.pem"}}, "redis.tls_ca_file: needs a rediss:// redis.url"),
        ({"redis": {"username": ""}}, "redis.username"),
    ],
    ids=[
        "cert-no-key",
        "key-no-cert",
        "mtls-no-ca",
        "mtls-no-cert",
        "unknown",
        "ca-plain",
        "ca-embedded",
        "user",
    ],
)
def test_tls_and_redis_credential_rules(keys: dict[str, Any], expected: str) -> None:
    errors = errors_of(config(**keys))
    assert any(e.startswith(expected) for e in errors), errors


def test_tls_and_redis_credentials_default_off_and_resolve_relative_paths(tmp_path: Path) -> None:
    assert validate_config(config()).grpc.tls is None
    redis = validate_config(config()).redis
    assert (redis.username, redis.password_file, redis.tls_ca_file) == (None, None, None)
    file = write(
        tmp_path / "etc" / "config.yaml",
        "version: 1\n"
        "grpc: {tls: {cert_file: pki/me.pem, key_file: pki/me.key, ca_file: pki/ca.pem,"
        " require_client_cert: true}}\n"
        "redis: {url: 'rediss://redis.lan:6380/0', username: llorch, password_file: redis.pw,"
        " tls_ca_file: pki/redis-ca.pem}\n"
        "pools: [{id: a, engine: mock, model: m}]\n",
    )
    cfg = load_config(file, env={})
    pki = tmp_path / "etc" / "pki"
    assert cfg.grpc.tls is not None
    assert (cfg.grpc.tls.cert_file, cfg.grpc.tls.key_file, cfg.grpc.tls.ca_file) == (
        pki / "me.pem",
        pki / "me.key",
        pki / "ca.pem",
    )
    assert cfg.grpc.tls.require_client_cert
    assert cfg.redis.password_file == tmp_path / "etc" / "redis.pw"
    assert (cfg.redis.username, cfg.redis.tls_ca_file) == ("llorch", pki / "redis-ca.pem")
