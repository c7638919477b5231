"""Configuration: one YAML file, validated once at load (SPEC §7).

The models mirror the YAML exactly (field names are the YAML keys), are strict (no type coercion: ``"5"``
is not an int), forbid unknown keys and are frozen. :func:`load_config` reads the file, resolves relative
paths against the file's directory, applies the ``LLORCH_*`` overrides and validates; every problem is
reported together in one :class:`ConfigError`. The rules and messages live in :mod:`llorch.config_rules`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Final, Literal, Self, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PlainValidator,
    Strict,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from llorch import config_rules as rules

CONFIG_ENV: Final = "LLORCH_CONFIG"
DEFAULT_CONFIG_PATH: Final = "~/.config/llorch/config.yaml"
ENV_OVERRIDES: Final[Mapping[str, tuple[str, ...]]] = {
    "LLORCH_STATE_DIR": ("state_dir",),
    "LLORCH_REDIS_URL": ("redis", "url"),
    "LLORCH_API_BIND": ("api", "bind"),
    "LLORCH_LOG_LEVEL": ("telemetry", "log_level"),
}
DEFAULT_ENGINE_BIN: Final[Mapping[str, str]] = {
    "llamacpp": "llama-server",
    "vllm": "vllm",
    "tgi": "text-generation-launcher",
    "triton": "tritonserver",
    "mock": "llorch-mock-engine",
}

Engine = Literal["llamacpp", "vllm", "tgi", "triton", "mock"]
FullPolicy = Literal["reject", "drop-lru"]
Residency = Literal["always", "on-demand"]
Workload = Literal["completion", "embedding", "rerank"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
ModelState = Literal["Draft", "Active", "Canary", "Deprecated", "Retired"]
# Paths are written as strings in YAML, so they are the one lax type; `~` is expanded.
ConfigPath = Annotated[Path, Strict(False), AfterValidator(lambda p: p.expanduser())]
HostPort = Annotated[str, AfterValidator(rules.check_host_port)]
Devices = Annotated[
    list[int] | Literal["cpu", "auto"],
    PlainValidator(rules.parse_devices, json_schema_input_type=list[NonNegativeInt] | Literal["cpu", "auto"]),
]
PoolHost = Annotated[
    str,
    AfterValidator(rules.check_pool_host),
    Field(json_schema_extra={"pattern": rules.POOL_HOST_PATTERN, "maxLength": rules.POOL_HOST_MAX_LENGTH}),
]
EnvName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")]
Port = Annotated[int, Field(ge=1, le=65535)]
_T = TypeVar("_T")


class ConfigError(Exception):
    """The config is invalid; ``errors`` holds every problem as ``<path>: <message>``."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("invalid configuration:\n" + "\n".join(f"  {e}" for e in errors))
        self.errors = errors


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ApiToken(_Model):
    name: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_-]{1,32}$")]
    token_env: EnvName | None = None
    token_file: ConfigPath | None = None
    rps: float | None = Field(default=None, gt=0)
    tokens_per_min: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> Self:
        if (self.token_env is None) == (self.token_file is None):
            rules.raise_problems(
                "ApiToken", [(("token_env",), "exactly one of token_env or token_file is required")]
            )
        return self


class ApiConfig(_Model):
    bind: HostPort = "127.0.0.1:8080"
    public_base_url: str | None = None
    max_body_bytes: int = Field(default=1_048_576, ge=1024)
    probes_require_auth: bool = False
    keepalive_timeout_s: float = Field(default=15.0, gt=0)  # idle connections, and a request head
    body_timeout_s: float = Field(default=15.0, gt=0)  # the whole body, counted from its head
    workers: int = Field(default=1, ge=1, le=64)  # gateway processes sharing `bind` (SO_REUSEPORT)
    tokens: list[ApiToken] = []

    @model_validator(mode="after")
    def _unique_names(self) -> Self:
        names = (t.name for t in self.tokens)
        rules.raise_problems("ApiConfig", rules.duplicate_problems(names, "token name", ("tokens",), "name"))
        return self

    @property
    def effective_public_base_url(self) -> str:
        return (self.public_base_url or f"http://{self.bind}").rstrip("/")


class GrpcTlsConfig(_Model):
    """TLS on every internal gRPC server and channel (SPEC §10); the internal token stays required.

    A server presents ``cert_file``/``key_file``; a client checks the server against ``ca_file`` (null:
    the system roots) and, for mTLS, presents the same certificate. ``require_client_cert`` makes the
    servers refuse a client whose certificate ``ca_file`` did not sign."""

    cert_file: ConfigPath | None = None  # PEM chain, this process's identity (server and mTLS client)
    key_file: ConfigPath | None = None
    ca_file: ConfigPath | None = None  # PEM roots that signed the peers' certificates
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _complete(self) -> Self:
        problems: list[rules.Problem] = []
        if (self.cert_file is None) != (self.key_file is None):
            problems.append((("key_file",), "cert_file and key_file go together"))
        if self.require_client_cert and (self.ca_file is None or self.cert_file is None):
            msg = "needs ca_file (to check clients) and cert_file/key_file (presented as a client)"
            problems.append((("require_client_cert",), msg))
        rules.raise_problems("GrpcTlsConfig", problems)
        return self


class GrpcConfig(_Model):
    scheduler: HostPort = "127.0.0.1:50051"
    pool_manager_base_port: Port = 50061
    metrics_base_port: Port = 9101
    internal_token_file: ConfigPath | None = None
    tls: GrpcTlsConfig | None = None  # null: plaintext gRPC (loopback only)


class RedisConfig(_Model):
    """``url: null`` makes ``llorch up`` start a private redis-server that requires a generated password.

    The password comes from ``LLORCH_REDIS_PASSWORD``, else ``password_file``; never from the URL."""

    url: Annotated[str | None, AfterValidator(rules.check_redis_url)] = None
    key_prefix: Annotated[str, StringConstraints(min_length=1)] = "llorch:"
    cluster: bool = False  # `url` is one node of a Redis Cluster (not with the embedded Redis)
    username: Annotated[str, StringConstraints(min_length=1)] | None = None  # an ACL user (null: default)
    password_file: ConfigPath | None = None
    tls_ca_file: ConfigPath | None = None  # roots that signed a rediss:// server's certificate

    @model_validator(mode="after")
    def _cluster_needs_url(self) -> Self:
        problems: list[rules.Problem] = []
        if self.cluster and self.url is None:
            problems.append(
                (("cluster",), "needs redis.url (a cluster node): the embedded Redis is one server")
            )
        if self.tls_ca_file is not None and not (self.url or "").startswith("rediss://"):
            problems.append((("tls_ca_file",), "needs a rediss:// redis.url"))
        rules.raise_problems("RedisConfig", problems)
        return self


class SchedulerConfig(_Model):
    default_max_tokens: int = Field(default=512, ge=1)
    default_deadline_ms: int = Field(default=300_000, ge=1)
    max_deadline_ms: int = Field(default=86_400_000, ge=1)
    dispatch_attempts: int = Field(default=3, ge=1)
    ewma_alpha: float = Field(default=0.2, gt=0, le=1)
    prior_ms_per_token: float = Field(default=25, gt=0)
    backoff_min_ms: int = Field(default=250, ge=1)
    backoff_max_ms: int = Field(default=60_000, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        problems: list[rules.Problem] = []
        if self.default_deadline_ms > self.max_deadline_ms:
            problems.append(
                (("default_deadline_ms",), f"must be <= max_deadline_ms ({self.max_deadline_ms})")
            )
        if self.backoff_min_ms > self.backoff_max_ms:
            problems.append((("backoff_min_ms",), f"must be <= backoff_max_ms ({self.backoff_max_ms})"))
        rules.raise_problems("SchedulerConfig", problems)
        return self


class ResidencyConfig(_Model):
    """How the scheduler swaps on-demand pools (issue 13)."""

    max_swap_wait_ms: int = Field(default=30_000, ge=0)  # a resident model's queued work goes first this long
    min_residency_s: int = Field(default=10, ge=0)  # a loaded model stays at least this long
    cpu_memory_mib: int | None = Field(default=None, ge=1)  # the "cpu" device's budget; null: MemTotal


class QueueConfig(_Model):
    soft_watermark: float = Field(default=0.8, gt=0, le=1)
    max_batch_wait_ms: int | None = Field(default=None, ge=1)  # aging is off when null


class BudgetsConfig(_Model):
    """Default session budgets; null means unlimited."""

    tokens: int | None = Field(default=None, ge=0)
    time_ms: int | None = Field(default=None, ge=0)
    cost: float | None = Field(default=None, ge=0)


class SessionsConfig(_Model):
    ttl_ms: int = Field(default=600_000, ge=1)
    max_turns: int = Field(default=8, ge=1)
    budgets: BudgetsConfig = BudgetsConfig()


class SseConfig(_Model):
    heartbeat_s: int = Field(default=15, ge=1)
    retention_s: int = Field(default=900, ge=1)
    queued_metrics_interval_ms: int = Field(default=1000, ge=1)


class SamplerProfile(_Model):
    temperature: float = Field(ge=0)
    top_k: int = Field(ge=0)
    top_p: float = Field(gt=0, le=1)
    min_p: float = Field(ge=0, le=1)
    repeat_penalty: float = Field(gt=0)


ProfileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")]
SamplerProfiles = dict[ProfileName, SamplerProfile]
GREEDY_V1: Final = SamplerProfile(temperature=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0)


class PoolQueueConfig(_Model):
    capacity: int = Field(default=64, ge=1, le=100_000)
    full_policy: FullPolicy = "reject"


class ClassAdmission(_Model):
    queue_capacity: int | None = Field(default=None, ge=1)  # null: the pool's queue.capacity
    rate_limit_rps: float | None = Field(default=None, gt=0)


class AdmissionConfig(_Model):
    interactive: ClassAdmission = ClassAdmission()
    batch: ClassAdmission = ClassAdmission()


class TimeoutsConfig(_Model):
    wall_ms: int = Field(default=600_000, ge=1000)
    idle_ms: int = Field(default=60_000, ge=1000)
    start_ms: int = Field(default=600_000, ge=1000)
    selftest_ms: int = Field(default=60_000, ge=1000)


class RestartConfig(_Model):
    initial_backoff_ms: int = Field(default=1000, ge=1)
    max_backoff_ms: int = Field(default=60_000, ge=1)
    breaker_failures: int = Field(default=5, ge=1)
    breaker_window_s: int = Field(default=300, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.max_backoff_ms < self.initial_backoff_ms:
            msg = f"must be >= initial_backoff_ms ({self.initial_backoff_ms})"
            rules.raise_problems("RestartConfig", [(("max_backoff_ms",), msg)])
        return self


class VramConfig(_Model):
    factor: float = Field(default=1.10, ge=1.0)
    kv_reserve_mib: int | None = Field(default=None, ge=0)  # null: estimated from ctx x slots
    headroom_mib: int = Field(default=512, ge=0)


class PoolIdentity(_Model):
    """The ``pools[]`` keys that place a pool in a replica set, and those the cross-pool rules read."""

    id: Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")]
    engine: Engine
    model: str  # a catalog id; an unknown one makes the pool Unready at runtime, not a config error
    ctx: int = Field(default=4096, ge=256, le=1_048_576)  # per slot
    sampler_profile_version: str = "v1"
    replicas: int = Field(default=1, ge=1, le=8)
    queue: PoolQueueConfig = PoolQueueConfig()
    # Issue 13: "on-demand" pools start unloaded; the scheduler loads them when their queue needs them
    # and unloads them when idle for idle_unload_s or to make room (never while busy, never if pinned).
    # Declared here, before devices: the pools of one replica set must agree on it, and the rules on
    # devices, preload, idle_unload_s and pinned read it.
    residency: Residency = "always"


class PoolConfig(PoolIdentity):
    """One ``pools[]`` entry: engine + model + device mask + ctx + slots, owned by one pool manager."""

    # Field order matters: a rule on one key may read the keys declared before it (base class first).
    allow_cpu: bool = False
    devices: Devices = Field(default="auto", validate_default=True)  # on-demand refuses the default
    host: PoolHost = rules.LOCAL_HOST  # whose pool manager serves it: `llorch up`'s, or `--host NAME`'s
    slots: int = Field(default=1, ge=1, le=64)
    max_tokens_limit: int | None = Field(default=None, ge=1)  # null: ctx
    workloads: list[Workload] = Field(default=["completion"], min_length=1)
    tensor_split: list[Annotated[float, Field(gt=0)]] | None = None
    cost_per_1k_tokens: float = Field(default=0.0, ge=0)
    preload: bool = True
    idle_unload_s: int | None = Field(default=None, ge=1)  # on-demand only; null: 300
    pinned: bool | None = None  # on-demand only; null: false
    admission: AdmissionConfig = AdmissionConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    restart: RestartConfig = RestartConfig()
    vram: VramConfig = VramConfig()
    ram_factor: float | None = Field(default=None, gt=0)  # null: 0.25 for GPU pools, 1.2 for CPU pools
    engine_bin: str | None = None  # null: the engine's usual binary on PATH
    engine_args: list[str] = []
    engine_env: dict[EnvName, str] = {}
    adapter: dict[str, str] = Field(default={}, validate_default=True)  # triton requires model_name

    @field_validator(
        "devices",
        "max_tokens_limit",
        "workloads",
        "tensor_split",
        "preload",
        "idle_unload_s",
        "pinned",
        "admission",
        "engine_args",
        "engine_env",
        "adapter",
    )
    @classmethod
    def _pool_rules(cls, value: _T, info: ValidationInfo) -> _T:
        assert info.field_name is not None
        rules.raise_problems("PoolConfig", rules.pool_field_problems(info.field_name, value, info.data))
        return value

    @property
    def served_workloads(self) -> list[str]:
        """The configured workloads, plus ``chat`` where the pool completes text on an engine with a
        chat endpoint (the engine's own chat template renders the messages)."""
        chat = "completion" in self.workloads and self.engine != "triton"
        return [*self.workloads, *(["chat"] if chat else [])]

    @property
    def effective_ram_factor(self) -> float:
        if self.ram_factor is not None:
            return self.ram_factor
        return 1.2 if self.devices == "cpu" else 0.25

    @property
    def on_demand(self) -> bool:
        return self.residency == "on-demand"

    @property
    def effective_idle_unload_s(self) -> int:
        return 300 if self.idle_unload_s is None else self.idle_unload_s

    @property
    def effective_max_tokens_limit(self) -> int:
        return self.ctx if self.max_tokens_limit is None else self.max_tokens_limit

    @property
    def effective_engine_bin(self) -> str:
        return self.engine_bin or DEFAULT_ENGINE_BIN[self.engine]

    @property
    def normalized_tensor_split(self) -> list[float] | None:
        if self.tensor_split is None:
            return None
        total = sum(self.tensor_split)
        return [share / total for share in self.tensor_split]


class TrustPolicy(_Model):
    mode: Literal["strict", "permissive"] = "permissive"
    allowed_registries: list[str] = []
    require_signature: bool | None = None  # null: true under strict, false under permissive
    require_sbom: bool | None = None
    ca_roots: list[str] = []

    @property
    def effective_require_signature(self) -> bool:
        return self.mode == "strict" if self.require_signature is None else self.require_signature

    @property
    def effective_require_sbom(self) -> bool:
        return self.mode == "strict" if self.require_sbom is None else self.require_sbom


class SignatureConfig(_Model):
    signer: str
    algo: str
    sig: str
    timestamp_ms: int | None = None


class SbomConfig(_Model):
    uri: str
    digest: Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")]


class CatalogModelConfig(_Model):
    id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}$")]
    path: ConfigPath
    digest: Annotated[str, StringConstraints(pattern=r"^sha256:[0-9a-f]{64}$")] | None = None
    source_url: str | None = None
    tags: list[str] = []
    state: ModelState = "Active"
    signatures: list[SignatureConfig] = []
    sbom: SbomConfig | None = None
    trust_policy: TrustPolicy | None = None  # overrides catalog.trust_policy for this entry


class CatalogConfig(_Model):
    trust_policy: TrustPolicy = TrustPolicy()
    models: list[CatalogModelConfig] = []

    @model_validator(mode="after")
    def _unique_ids(self) -> Self:
        ids = (m.id for m in self.models)
        rules.raise_problems("CatalogConfig", rules.duplicate_problems(ids, "model id", ("models",), "id"))
        return self


class ArtifactsConfig(_Model):
    dir: ConfigPath | None = None  # null: <state_dir>/artifacts
    max_bytes: int = Field(default=8_388_608, ge=1)  # canonical content; over it: 413
    retention_days: int | None = Field(default=None, ge=1)  # null: keep forever


POLICY_BUILTIN_RULES: Final = ("default", "scheme", "invalid-host", "plugin-error", "private-network")
"""The ``rule`` of decisions no config rule made (:mod:`llorch.policy`)."""


class PolicyRule(_Model):
    """One allow/deny rule of the policy hook (SPEC §5.9); a request matches when every list does.

    ``hosts`` are case-insensitive globs (``*.example.com``). An allow rule whose pattern is a plain
    host (no glob characters) *names* that host: under ``deny_private_networks`` it alone lets a fetch
    reach the host's private addresses. ``max_bytes`` and ``timeout_ms`` override the policy's own
    limits for the fetches this rule allows.
    """

    id: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")]
    action: Literal["allow", "deny"]
    hosts: list[Annotated[str, StringConstraints(min_length=1, max_length=253)]] = Field(min_length=1)
    schemes: list[Literal["http", "https"]] = ["http", "https"]
    methods: list[Literal["GET", "HEAD", "POST"]] = ["GET", "HEAD", "POST"]
    ports: list[Port] | None = None  # null: any port
    max_bytes: int | None = Field(default=None, ge=1)
    timeout_ms: int | None = Field(default=None, ge=1)


class PolicyConfig(_Model):
    default: Literal["allow", "deny"] = "allow"
    deny_private_networks: bool = True
    rules: list[PolicyRule] = []
    plugins: list[str] = []  # entry-point names in group llorch.policy, in evaluation order
    plugin_timeout_ms: int = Field(default=200, ge=1)
    max_bytes: int = Field(default=1_048_576, ge=1)
    timeout_ms: int = Field(default=10_000, ge=1)
    max_redirects: int = Field(default=3, ge=0)

    @model_validator(mode="after")
    def _unique(self) -> Self:
        problems = rules.duplicate_problems((r.id for r in self.rules), "rule id", ("rules",), "id")
        problems += rules.duplicate_problems(self.plugins, "plugin", ("plugins",))
        for i, rule in enumerate(self.rules):  # decisions and metrics name these; a rule may not
            if rule.id in POLICY_BUILTIN_RULES or rule.id.startswith("plugin:"):
                problems.append((("rules", i, "id"), f"{rule.id!r} is reserved for a built-in rule"))
        rules.raise_problems("PolicyConfig", problems)
        return self


class FakeGpu(_Model):
    index: int = Field(ge=0)
    name: str
    total_mib: int = Field(ge=1)
    free_mib: int = Field(ge=0)

    @model_validator(mode="after")
    def _fits(self) -> Self:
        if self.free_mib > self.total_mib:
            rules.raise_problems("FakeGpu", [(("free_mib",), f"must be <= total_mib ({self.total_mib})")])
        return self


class TelemetryConfig(_Model):
    log_level: LogLevel = "info"
    log_file: ConfigPath | None = None
    log_prompts: bool = False  # only false: prompts and outputs are never logged (SPEC §5.11)
    otlp_endpoint: str | None = None
    gpu_provider: Literal["nvml", "fake"] = "nvml"
    fake_gpus: list[FakeGpu] = []

    @model_validator(mode="after")
    def _fake_gpus(self) -> Self:
        indices = (str(g.index) for g in self.fake_gpus)
        problems = rules.duplicate_problems(indices, "GPU index", ("fake_gpus",), "index")
        if self.fake_gpus and self.gpu_provider != "fake":
            problems.append((("fake_gpus",), "needs gpu_provider: fake"))
        if self.log_prompts:
            # Accepting `true` and logging nothing would be inert config (issue 15).
            msg = "true is not supported yet: prompts and outputs are never logged; remove it or set false"
            problems.append((("log_prompts",), msg))
        rules.raise_problems("TelemetryConfig", problems)
        return self


class LlorchConfig(_Model):
    """The root of the config file."""

    version: Literal[1]
    state_dir: ConfigPath = Field(default=Path("~/.local/state/llorch"), validate_default=True)
    api: ApiConfig = ApiConfig()
    grpc: GrpcConfig = GrpcConfig()
    redis: RedisConfig = RedisConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    queue: QueueConfig = QueueConfig()
    residency: ResidencyConfig = ResidencyConfig()
    sessions: SessionsConfig = SessionsConfig()
    sse: SseConfig = SseConfig()
    sampler_profiles: SamplerProfiles = {"v1": GREEDY_V1}
    pools: list[PoolConfig] = Field(min_length=1)
    catalog: CatalogConfig = CatalogConfig()
    artifacts: ArtifactsConfig = ArtifactsConfig()
    policy: PolicyConfig = PolicyConfig()
    telemetry: TelemetryConfig = TelemetryConfig()

    @field_validator("version", mode="before")
    @classmethod
    def _no_bool_version(cls, value: object) -> object:
        if type(value) is not int:  # True == 1 would pass Literal[1]
            raise ValueError(f"expected int 1, got {rules.type_name(value)}")
        return value

    @model_validator(mode="after")
    def _cross_pool(self) -> Self:
        problems = rules.cross_pool_problems(enumerate(self.pools), self.sampler_profiles.keys())
        rules.raise_problems("LlorchConfig", problems, rules.CROSS_POOL_ERROR)
        return self

    @property
    def effective_artifacts_dir(self) -> Path:
        return self.artifacts.dir if self.artifacts.dir is not None else self.state_dir / "artifacts"


# ---- loading ------------------------------------------------------------------------------------------


def resolve_config_path(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The file to load: ``path``, else ``$LLORCH_CONFIG``, else ``~/.config/llorch/config.yaml``."""
    env = os.environ if env is None else env
    chosen = path if path is not None else env.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH
    return Path(chosen).expanduser()


def load_config(path: Path | str | None = None, env: Mapping[str, str] | None = None) -> LlorchConfig:
    """Read, resolve and validate the config file (SPEC §7); raise :class:`ConfigError` with all problems.

    Relative paths in the file are taken relative to the file's directory, so ``--config FILE`` works from
    any working directory. Then the env overrides apply (``LLORCH_STATE_DIR``, ``LLORCH_REDIS_URL``,
    ``LLORCH_API_BIND``, ``LLORCH_LOG_LEVEL``; unset or empty ones are ignored), then validation.
    """
    env = os.environ if env is None else env
    file = resolve_config_path(path, env)
    data = _read_yaml(file)
    _rebase_paths(data, file.absolute().parent)
    _apply_env(data, env)
    return validate_config(data)


def validate_config(data: Mapping[str, object]) -> LlorchConfig:
    """Validate parsed config data; raise :class:`ConfigError` with every problem."""
    try:
        return LlorchConfig.model_validate(data)
    except ValidationError as exc:
        errors = rules.format_errors(exc, LlorchConfig)
        if not any(e["type"] == rules.CROSS_POOL_ERROR for e in exc.errors()):
            # The root validator did not run; check the pools that did validate on their own.
            errors += _partial_cross_pool_errors(data)
        raise ConfigError(errors) from None  # the cause would print input values, secrets included


def config_schema_json() -> str:
    """The JSON Schema of :class:`LlorchConfig`: sorted keys, 2-space indent, trailing newline."""
    return json.dumps(LlorchConfig.model_json_schema(), sort_keys=True, indent=2) + "\n"


def _partial_cross_pool_errors(data: Mapping[str, object]) -> list[str]:
    """Cross-pool rules over the pools whose identity keys validate, even when their other keys do not."""
    raw_pools = data.get("pools")
    if not isinstance(raw_pools, list):
        return []
    pools: list[tuple[int, PoolIdentity]] = []
    for i, raw in enumerate(raw_pools):
        try:
            pools.append((i, _LaxPoolIdentity.model_validate(raw)))
        except ValidationError:
            continue
    profiles: set[str] | None = None
    with contextlib.suppress(ValidationError):  # None: skip the profile rule, its own errors are reported
        raw_profiles = data.get("sampler_profiles", {"v1": GREEDY_V1})
        profiles = set(_PROFILES.validate_python(raw_profiles, strict=True))
    return [f"{rules.format_loc(loc)}: {msg}" for loc, msg in rules.cross_pool_problems(pools, profiles)]


class _LaxPoolIdentity(PoolIdentity):
    model_config = ConfigDict(extra="ignore")


_PROFILES: Final = TypeAdapter(SamplerProfiles)


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate mapping keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[object, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str | int | float | bool):
                continue  # unhashable keys are refused by the base constructor
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(file: Path) -> dict[str, object]:
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([f"{file}: file not found"]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{file}: cannot read: {exc.__class__.__name__}"]) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError([f"{file}: invalid YAML{where}: {exc.problem}"]) from None
    except yaml.YAMLError:
        raise ConfigError([f"{file}: invalid YAML"]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{file}: expected a mapping at the top level, got {rules.type_name(data)}"])
    return data


def _rebase_paths(data: dict[str, object], base: Path) -> None:
    """Make the file's relative paths relative to ``base``; wrong types are left to validation."""

    def rebase(section: object, key: str, only_with_slash: bool = False) -> None:
        if not isinstance(section, dict):
            return
        value = section.get(key)
        if not isinstance(value, str) or not value or value.startswith("~") or os.path.isabs(value):
            return
        if not only_with_slash or "/" in value:
            section[key] = os.path.normpath(base / value)

    def items(section: object, key: str) -> list[object]:
        value = section.get(key) if isinstance(section, dict) else None
        return value if isinstance(value, list) else []

    rebase(data, "state_dir")
    rebase(data.get("artifacts"), "dir")
    rebase(data.get("telemetry"), "log_file")
    rebase(data.get("grpc"), "internal_token_file")
    grpc = data.get("grpc")
    for key in ("cert_file", "key_file", "ca_file"):
        rebase(grpc.get("tls") if isinstance(grpc, dict) else None, key)
    for key in ("password_file", "tls_ca_file"):
        rebase(data.get("redis"), key)
    for token in items(data.get("api"), "tokens"):
        rebase(token, "token_file")
    for model in items(data.get("catalog"), "models"):
        rebase(model, "path")
    for pool in items(data, "pools"):
        rebase(pool, "engine_bin", only_with_slash=True)  # a bare name is looked up on PATH


def _apply_env(data: dict[str, object], env: Mapping[str, str]) -> None:
    for var, (*parents, key) in ENV_OVERRIDES.items():
        value = env.get(var)
        if not value:
            continue
        if var == "LLORCH_STATE_DIR" and not value.startswith("~"):
            value = os.path.abspath(value)  # relative to the caller's cwd, as shells expect
        elif var == "LLORCH_LOG_LEVEL":
            value = value.lower()
        section: object = data
        for name in parents:  # a section of the wrong type is left alone and reported by validation
            section = section.setdefault(name, {}) if isinstance(section, dict) else None
        if isinstance(section, dict):
            section[key] = value
