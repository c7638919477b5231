"""The config rules of on-demand residency (issue 13), each accepted and refused with its message:
an on-demand pool names its devices and takes no `preload: false`; `idle_unload_s` and `pinned` are
refused on an `always` pool (they would be ignored); the pools of one replica set agree on `residency`.
"""

from __future__ import annotations

from typing import Any

import pytest

from llorch.config import ConfigError, LlorchConfig, validate_config


def _config(*pools: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"version": 1, "pools": list(pools), **top}


def _pool(pool_id: str = "p", **keys: Any) -> dict[str, Any]:
    return {"id": pool_id, "engine": "mock", "model": "m", **keys}


def _errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        validate_config(data)
    return info.value.errors


def test_an_on_demand_pool_with_its_devices_takes_the_defaults() -> None:
    cfg = validate_config(
        _config(_pool("gpu", residency="on-demand", devices=[0, 1]), _pool("cpu", model="c", devices="cpu"))
    )
    on_demand, always = cfg.pools
    assert on_demand.on_demand and on_demand.residency == "on-demand"
    assert on_demand.effective_idle_unload_s == 300 and on_demand.pinned is None
    assert not always.on_demand and always.residency == "always"
    assert (cfg.residency.max_swap_wait_ms, cfg.residency.min_residency_s) == (30_000, 10)
    assert cfg.residency.cpu_memory_mib is None


def test_an_on_demand_pool_takes_its_idle_unload_and_pin() -> None:
    pool = validate_config(
        _config(_pool(residency="on-demand", devices="cpu", idle_unload_s=42, pinned=True, preload=True))
    ).pools[0]
    assert (pool.effective_idle_unload_s, pool.pinned) == (42, True)


@pytest.mark.parametrize("devices", [None, "auto"])
def test_an_on_demand_pool_must_name_its_devices(devices: str | None) -> None:
    pool = _pool(residency="on-demand") if devices is None else _pool(residency="on-demand", devices=devices)
    assert _errors(_config(pool)) == [
        "pools[0].devices: an on-demand pool names its devices (a list of GPU indices or 'cpu', not "
        "'auto'): the scheduler swaps it in and out of them"
    ]


def test_an_always_pool_may_still_be_placed_automatically() -> None:
    assert validate_config(_config(_pool())).pools[0].devices == "auto"


def test_an_on_demand_pool_refuses_preload_false() -> None:
    assert _errors(_config(_pool(residency="on-demand", devices=[0], preload=False))) == [
        "pools[0].preload: an on-demand pool is loaded by the scheduler; preload does not apply"
    ]
    assert validate_config(_config(_pool(preload=False))).pools[0].preload is False  # always: as before


@pytest.mark.parametrize(("key", "value"), [("idle_unload_s", 60), ("pinned", True), ("pinned", False)])
def test_idle_unload_and_pinned_are_refused_on_an_always_pool(key: str, value: Any) -> None:
    assert _errors(_config(_pool(**{key: value}))) == [f"pools[0].{key}: only for residency: on-demand"]
    explicit = _pool(residency="always", **{key: value})
    assert _errors(_config(explicit)) == [f"pools[0].{key}: only for residency: on-demand"]


def test_the_residency_keys_are_typed() -> None:
    errors = _errors(_config(_pool(residency="sometimes", idle_unload_s=0), _pool("q", pinned="yes")))
    assert "pools[0].residency: must be one of 'always' or 'on-demand'" in errors
    assert "pools[0].idle_unload_s: must be >= 1" in errors
    assert "pools[1].pinned: expected bool, got string" in errors
    assert _errors(_config(_pool(), residency={"cpu_memory_mib": 0, "max_swap_wait_ms": -1})) == [
        "residency.max_swap_wait_ms: must be >= 0",
        "residency.cpu_memory_mib: must be >= 1",
    ]


def test_the_pools_of_one_replica_set_agree_on_residency() -> None:
    first = _pool("a", residency="on-demand", devices=[0])
    second = _pool("b", devices=[1])  # the same (engine, model, ctx, profile): one replica set
    message = (
        "pools[1].residency: 'always' differs from pools[0] ('on-demand'); pools with the same "
        "(engine, model, ctx, sampler_profile_version) form one replica set and must agree"
    )
    assert _errors(_config(first, second)) == [message]
    # Another model (or ctx) is another set: each decides for itself.
    validate_config(_config(first, _pool("b", model="other", devices=[1])))
    validate_config(_config(first, _pool("b", ctx=8192, devices=[1])))
    validate_config(_config(first, _pool("b", residency="on-demand", devices=[1])))


def test_residency_disagreement_is_reported_beside_other_problems() -> None:
    """The cross-pool rule still runs when another key of a pool does not validate."""
    errors = _errors(
        _config(_pool("a", residency="on-demand", devices=[0]), _pool("b", devices=[1], slots="many"))
    )
    assert "pools[1].slots: expected int, got string" in errors
    assert any(e.startswith("pools[1].residency: 'always' differs from pools[0]") for e in errors), errors


def test_the_schema_describes_the_residency_keys() -> None:
    schema = LlorchConfig.model_json_schema()
    pool = schema["$defs"]["PoolConfig"]["properties"]
    assert pool["residency"]["enum"] == ["always", "on-demand"] and pool["residency"]["default"] == "always"
    assert {"idle_unload_s", "pinned"} <= set(pool)
    assert set(schema["$defs"]["ResidencyConfig"]["properties"]) == {
        "max_swap_wait_ms",
        "min_residency_s",
        "cpu_memory_mib",
    }
