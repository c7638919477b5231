"""Rules and messages behind :mod:`llorch.config` (SPEC §7).

Each check returns *problems* ``(loc, message)`` instead of raising on the first one, so that every
problem in a file is reported together. :func:`raise_problems` turns them into a pydantic
``ValidationError`` (pydantic prefixes the locations of errors raised inside a model validator with the
model's own location), and :func:`format_errors` turns validation errors into ``<path>: <message>`` lines.
Messages never quote a value from the file, except names such as ids, flags and keys, so that secrets
cannot leak through them.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import re
import types
import typing
from collections.abc import Collection, Iterable, Mapping
from typing import TYPE_CHECKING, Final, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails, InitErrorDetails, PydanticCustomError

if TYPE_CHECKING:
    from llorch.config import PoolIdentity

Loc = tuple[str | int, ...]
Problem = tuple[Loc, str]

RULE_ERROR: Final = "config_rule"
CROSS_POOL_ERROR: Final = "config_cross_pool_rule"

# Metric label budgets (SPEC §6): engine 4 (one value kept for `none`), pool_id 256, replica_id 1024.
MAX_ENGINE_KINDS: Final = 3
MAX_POOLS_AND_SETS: Final = 256
MAX_REPLICAS: Final = 1024

_LLAMA_MANAGED: Final = frozenset(
    {"-m", "--model", "--host", "--port", "-c", "--ctx-size", "--parallel", "-np", "-ngl", "--n-gpu-layers"}
    | {"--gpu-layers", "--device", "-dev", "-ts", "--tensor-split"}
)
MANAGED_FLAGS: Final[Mapping[str, frozenset[str]]] = {
    "llamacpp": _LLAMA_MANAGED,
    "mock": _LLAMA_MANAGED,
    "vllm": frozenset(
        {"--model", "--host", "--port", "--max-model-len", "--max-num-seqs", "--tensor-parallel-size", "-tp"}
        | {"--device"}
    ),
    "tgi": frozenset(
        {
            "--model-id",
            "--hostname",
            "--port",
            "--max-total-tokens",
            "--max-concurrent-requests",
            "--num-shard",
        }
    ),
    "triton": frozenset(
        {"--model-repository", "--model-store", "--http-port", "--grpc-port", "--metrics-port"}
    ),
}
_SECRET_ENV: Final = re.compile(r"TOKEN|KEY|SECRET|PASSWORD", re.IGNORECASE)
_MANAGED_ENV: Final = frozenset({"CUDA_VISIBLE_DEVICES"})
TRITON_ADAPTER_KEYS: Final = ("model_name", "input", "output", "max_tokens_input", "trtllm_version")
_HOST_PORT: Final = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):([0-9]{1,5})$")
LOCAL_HOST: Final = "local"
"""``pools[].host`` of the pools on the machine that runs ``llorch up`` (or a pool manager without --host)."""
_DNS_LABEL: Final = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
POOL_HOST_PATTERN: Final = rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$"
POOL_HOST_MAX_LENGTH: Final = 253  # a DNS name, e.g. a Kubernetes node name
_BIND_HOST_NAME: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_PLAIN_KEY: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


def raise_problems(title: str, problems: list[Problem], error_type: str = RULE_ERROR) -> None:
    """Raise all ``problems`` as one ``ValidationError``; return quietly when there are none."""
    if not problems:
        return
    details = [
        InitErrorDetails(
            type=PydanticCustomError(error_type, "{message}", {"message": msg}), loc=loc, input=None
        )
        for loc, msg in problems
    ]
    raise ValidationError.from_exception_data(title, details)


def unknown_key_message(key: object, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(str(key), list(known), n=1)
    return f"unknown key (did you mean '{close[0]}'?)" if close else "unknown key"


# ---- single-value checks used as pydantic validators --------------------------------------------------


def check_host_port(value: str) -> str:
    match = _HOST_PORT.fullmatch(value)
    if match is None or not 1 <= int(match.group(2)) <= 65535:
        raise ValueError("expected host:port, e.g. 127.0.0.1:8080 (IPv6 as [::1]:8080), port 1..65535")
    return value


def check_pool_host(value: str) -> str:
    """``local`` or the name of the host whose pool manager serves the pool (``--host NAME``)."""
    if len(value) > POOL_HOST_MAX_LENGTH or re.fullmatch(POOL_HOST_PATTERN, value) is None:
        raise ValueError(
            "expected 'local' or a host name: lowercase letters, digits and '-', in dot-separated labels of "
            "at most 63 characters (e.g. a Kubernetes node name)"
        )
    return value


def check_bind_host(value: str) -> str:
    """A host without a port, to bind or to be dialled at: an IP address (IPv6 bare or in brackets) or
    a host name. Returned without brackets."""
    host = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    if _BIND_HOST_NAME.fullmatch(host) is None:
        raise ValueError("expected an IP address or a host name, without a port (e.g. 0.0.0.0 or gpu-box-2)")
    return host


def parse_devices(value: object) -> list[int] | Literal["cpu", "auto"]:
    if value == "cpu" and isinstance(value, str):
        return "cpu"
    if value == "auto" and isinstance(value, str):
        return "auto"
    if not isinstance(value, list):
        raise ValueError(f"expected a list of GPU indices, 'cpu' or 'auto', got {type_name(value)}")
    if not value:
        raise ValueError("must list at least one GPU index (or be 'cpu' or 'auto')")
    if not all(type(v) is int and v >= 0 for v in value):
        raise ValueError("GPU indices must be ints >= 0")
    if len(set(value)) != len(value):
        raise ValueError("GPU indices must be distinct")
    return list(value)


def check_redis_url(value: str | None) -> str | None:
    if value is None:
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("expected a redis://, rediss:// or unix:// URL")
    if parts.password or "password" in parse_qs(parts.query):
        # The value is never echoed: it holds a secret.
        raise ValueError("must not contain a password; set LLORCH_REDIS_PASSWORD instead")
    return value


# ---- per-pool rules -----------------------------------------------------------------------------------


def pool_field_problems(field: str, value: object, earlier: Mapping[str, object]) -> list[Problem]:
    """Rules on one ``pools[]`` key that may read keys validated before it (``earlier``).

    Locations are relative to ``field``. A rule whose inputs did not validate is skipped, so that one
    bad key does not hide the other problems of the pool.
    """
    engine = earlier.get("engine")
    if field in _RESIDENCY_KEYS:
        residency_problems = _residency_problems(field, value, earlier.get("residency"))
        if residency_problems:
            return residency_problems
    if (
        field == "devices"
        and value == "cpu"
        and engine not in (None, "mock")
        and earlier.get("allow_cpu") is False
    ):
        return [((), "'cpu' needs allow_cpu: true (GPU pools never fall back to the CPU)")]
    if field == "max_tokens_limit":
        ctx = earlier.get("ctx")
        if isinstance(value, int) and isinstance(ctx, int) and value > ctx:
            return [((), f"must be <= ctx ({ctx})")]
    if field == "workloads" and isinstance(value, list):
        if len(set(value)) != len(value):
            return [((), "must not repeat a workload")]
        if "completion" in value and len(value) > 1:
            return [((), "completion cannot be combined with embedding or rerank in one pool")]
    if field == "admission":
        return _admission_problems(value, earlier.get("queue"))
    if field == "tensor_split" and isinstance(value, list) and isinstance(engine, str):
        return _tensor_split_problems(value, engine, earlier.get("devices"))
    if field == "engine_args" and isinstance(value, list) and isinstance(engine, str):
        return _engine_args_problems(value, engine)
    if field == "engine_env" and isinstance(value, dict):
        return _engine_env_problems(value)
    if field == "adapter" and isinstance(value, dict) and isinstance(engine, str):
        return _adapter_problems(value, engine)
    return []


_RESIDENCY_KEYS: Final = frozenset({"devices", "preload", "idle_unload_s", "pinned"})
ON_DEMAND_DEVICES: Final = (
    "an on-demand pool names its devices (a list of GPU indices or 'cpu', not 'auto'): the scheduler "
    "swaps it in and out of them"
)
ON_DEMAND_PRELOAD: Final = "an on-demand pool is loaded by the scheduler; preload does not apply"
ON_DEMAND_ONLY: Final = "only for residency: on-demand"


def _residency_problems(field: str, value: object, residency: object) -> list[Problem]:
    """Issue 13's rules on the keys that depend on ``residency`` (skipped when it did not validate).
    A key that an ``always`` pool would ignore is refused rather than left inert."""
    if residency == "on-demand":
        if field == "devices" and value == "auto":
            return [((), ON_DEMAND_DEVICES)]
        if field == "preload" and value is False:
            return [((), ON_DEMAND_PRELOAD)]
    elif residency == "always" and field in ("idle_unload_s", "pinned") and value is not None:
        return [((), ON_DEMAND_ONLY)]
    return []


def _admission_problems(admission: object, queue: object) -> list[Problem]:
    capacity = getattr(queue, "capacity", None)
    problems: list[Problem] = []
    for cls in ("interactive", "batch"):
        cap = getattr(getattr(admission, cls, None), "queue_capacity", None)
        if isinstance(cap, int) and isinstance(capacity, int) and cap > capacity:
            problems.append(((cls, "queue_capacity"), f"must be <= queue.capacity ({capacity})"))
    return problems


def _tensor_split_problems(split: list[float], engine: str, devices: object) -> list[Problem]:
    if engine != "llamacpp":
        return [((), f"only engine llamacpp supports tensor_split, not {engine}")]
    if devices is None:
        return []  # devices did not validate; that is reported on its own
    if not isinstance(devices, list) or len(devices) < 2:
        return [((), "needs devices to list at least 2 GPU indices")]
    if len(split) != len(devices):
        return [((), f"has {len(split)} values but devices lists {len(devices)} GPUs")]
    return []


def _engine_args_problems(args: list[str], engine: str) -> list[Problem]:
    managed = MANAGED_FLAGS.get(engine, frozenset())
    problems: list[Problem] = []
    for i, arg in enumerate(args):
        flag = arg.split("=", 1)[0]
        if flag in managed:
            problems.append(((i,), f"'{flag}' is managed by llorch; set the pool's keys instead"))
    return problems


def _engine_env_problems(env: dict[str, str]) -> list[Problem]:
    problems: list[Problem] = []
    for key in env:
        if _SECRET_ENV.search(key):
            msg = "looks like a secret (*TOKEN*/*KEY*/*SECRET*/*PASSWORD*); pass secrets by env or file"
            problems.append(((key,), msg))
        elif key.upper() in _MANAGED_ENV:
            problems.append(((key,), "is managed by llorch; set devices instead"))
    return problems


def _adapter_problems(adapter: dict[str, str], engine: str) -> list[Problem]:
    if engine != "triton":
        return [((key,), f"engine {engine} accepts no adapter options in v1") for key in adapter]
    problems: list[Problem] = [
        ((key,), unknown_key_message(key, TRITON_ADAPTER_KEYS))
        for key in adapter
        if key not in TRITON_ADAPTER_KEYS
    ]
    if "model_name" not in adapter:
        problems.append((("model_name",), "required for engine triton"))
    return problems


# ---- rules across pools -------------------------------------------------------------------------------


def cross_pool_problems(
    pools: Iterable[tuple[int, PoolIdentity]], profiles: Collection[str] | None
) -> list[Problem]:
    """Rules across ``pools[]``; ``pools`` are (index in the file, pool) so partial lists keep their paths.

    The replica-set rule uses a static approximation of SPEC §1's set key: pools with equal
    ``(engine, model, ctx, sampler_profile_version)`` are taken to be one set. Catalog ids stand in for
    model digests, and ``engine_version`` is only known once the engines run, so pools that would differ
    only there are merged here. ``full_policy`` and ``residency`` must agree within each approximated set,
    and the number of approximated sets counts towards the pool_id budget.
    ``profiles`` is None when ``sampler_profiles`` itself did not validate.
    """
    indexed = list(pools)
    problems: list[Problem] = []
    first_by_id: dict[str, int] = {}
    first_by_set: dict[tuple[str, str, int, str], tuple[int, str]] = {}
    first_residency_by_set: dict[tuple[str, str, int, str], tuple[int, str]] = {}
    for i, pool in indexed:
        if pool.id in first_by_id:
            problems.append(
                (
                    ("pools", i, "id"),
                    f"duplicate pool id '{pool.id}' (first at pools[{first_by_id[pool.id]}])",
                )
            )
        else:
            first_by_id[pool.id] = i
        if profiles is not None and pool.sampler_profile_version not in profiles:
            known = ", ".join(sorted(profiles)) or "none"
            msg = f"unknown sampler profile '{pool.sampler_profile_version}' (sampler_profiles has: {known})"
            problems.append((("pools", i, "sampler_profile_version"), msg))
        key = (pool.engine, pool.model, pool.ctx, pool.sampler_profile_version)
        first = first_by_set.setdefault(key, (i, pool.queue.full_policy))
        if first[1] != pool.queue.full_policy:
            msg = _disagrees(pool.queue.full_policy, *first)
            problems.append((("pools", i, "queue", "full_policy"), msg))
        # A replica set is loaded and unloaded as one model (issue 13): half of it on demand means nothing.
        first_residency = first_residency_by_set.setdefault(key, (i, pool.residency))
        if first_residency[1] != pool.residency:
            problems.append((("pools", i, "residency"), _disagrees(pool.residency, *first_residency)))
    engines = sorted({pool.engine for _, pool in indexed})
    if len(engines) > MAX_ENGINE_KINDS:
        msg = (
            f"uses {len(engines)} engine kinds ({', '.join(engines)}); at most {MAX_ENGINE_KINDS} are allowed"
        )
        problems.append((("pools",), msg))
    if len(indexed) + len(first_by_set) > MAX_POOLS_AND_SETS:
        sets = len(first_by_set)
        msg = f"{len(indexed)} pools + {sets} replica sets exceed the limit of {MAX_POOLS_AND_SETS}"
        problems.append((("pools",), msg))
    replicas = sum(pool.replicas for _, pool in indexed)
    if replicas > MAX_REPLICAS:
        problems.append((("pools",), f"{replicas} replicas in total exceed the limit of {MAX_REPLICAS}"))
    return problems


def _disagrees(value: str, first_index: int, first_value: str) -> str:
    return (
        f"'{value}' differs from pools[{first_index}] ('{first_value}'); pools with the same "
        "(engine, model, ctx, sampler_profile_version) form one replica set and must agree"
    )


def duplicate_problems(
    values: Iterable[str], what: str, prefix: Loc, field: str | None = None
) -> list[Problem]:
    """One problem per repeated item of ``values``, at ``(*prefix, i, field)``."""
    seen: dict[str, int] = {}
    problems: list[Problem] = []
    for i, value in enumerate(values):
        if value in seen:
            loc = (*prefix, i) if field is None else (*prefix, i, field)
            problems.append((loc, f"duplicate {what} '{value}' (first at [{seen[value]}])"))
        else:
            seen[value] = i
    return problems


# ---- formatting ---------------------------------------------------------------------------------------

_EXPECTED: Final[Mapping[str, str]] = {
    "int_type": "int",
    "int_parsing": "int",
    "int_from_float": "int",
    "float_type": "number",
    "float_parsing": "number",
    "string_type": "string",
    "bool_type": "bool",
    "list_type": "list",
    "dict_type": "mapping",
    "model_type": "mapping",
    "model_attributes_type": "mapping",
    "path_type": "path (string)",
}
_BOUNDS: Final[Mapping[str, tuple[str, str]]] = {
    "greater_than": (">", "gt"),
    "greater_than_equal": (">=", "ge"),
    "less_than": ("<", "lt"),
    "less_than_equal": ("<=", "le"),
}


def type_name(value: object) -> str:
    names = {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "mapping"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def format_errors(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    """``<path>: <message>`` for each error in ``exc``, paths like ``pools[1].queue.capacity``."""
    lines: list[str] = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        if loc and loc[-1] == "[key]":
            lines.append(f"{format_loc(loc[:-1])}: invalid key: {_message(err, root)}")
        else:
            lines.append(f"{format_loc(loc)}: {_message(err, root)}")
    return lines


def format_loc(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f'["{part}"]'
    return out or "(top level)"


def _message(err: ErrorDetails, root: type[BaseModel]) -> str:
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "extra_forbidden":
        model = _model_at(root, tuple(err["loc"])[:-1])
        return unknown_key_message(err["loc"][-1], model.model_fields if model else ())
    if kind == "missing":
        return "required key is missing"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {type_name(err['input'])}"
    if kind in _BOUNDS:
        op, name = _BOUNDS[kind]
        return f"must be {op} {ctx[name]}"
    if kind == "literal_error":
        expected = str(ctx["expected"])
        return f"must be one of {expected}" if " or " in expected else f"must be {expected}"
    if kind == "string_pattern_mismatch":
        return f"must match {ctx['pattern']}"
    if kind in ("too_short", "string_too_short"):
        return f"must have at least {ctx['min_length']} {'item' if kind == 'too_short' else 'character'}(s)"
    if kind in ("too_long", "string_too_long"):
        return f"must have at most {ctx['max_length']} {'item' if kind == 'too_long' else 'character'}(s)"
    if kind in ("value_error", "assertion_error"):
        return str(ctx["error"])
    return err["msg"]


def _model_at(root: type[BaseModel], loc: Loc) -> type[BaseModel] | None:
    """The model class that validates the mapping at ``loc``, or None when it is not a model."""
    tp: object = root
    for part in loc:
        tp = _unwrap(tp)
        args = typing.get_args(tp)
        if (
            isinstance(tp, type)
            and issubclass(tp, BaseModel)
            and isinstance(part, str)
            and part in tp.model_fields
        ):
            tp = tp.model_fields[part].annotation
        elif typing.get_origin(tp) is list and isinstance(part, int):
            tp = args[0]
        elif typing.get_origin(tp) is dict and isinstance(part, str):
            tp = args[1]
        else:
            return None
    tp = _unwrap(tp)
    return tp if isinstance(tp, type) and issubclass(tp, BaseModel) else None


def _unwrap(tp: object) -> object:
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp
