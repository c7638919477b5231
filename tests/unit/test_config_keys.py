"""No inert config (issue 15): every key the config accepts has an effect, and a test proves it.

``PROOF`` maps each key path to the test that sets the key to a value of its own choosing and observes
what changes. Key paths are dotted YAML paths; list items add no index (``pools.slots``) and map values
add ``*`` (``sampler_profiles.*.top_k``). The walk below reads the pydantic models, so a new key fails
``test_every_key_has_a_row`` until it comes with its proof.

A few rows point at a unit test of the function the key feeds (marked "unit"), where the wiring from the
config to that function is one line. ``log_prompts`` is the one key refused at load (only ``false`` is
accepted), with a test for the message.
"""

# ruff: noqa: E501  (the table's rows are pytest node ids, which read best unbroken)

from __future__ import annotations

import ast
import types
import typing
from functools import cache
from pathlib import Path
from typing import Final

import pytest
from pydantic import BaseModel

from llorch.config import LlorchConfig

ROOT: Final = Path(__file__).resolve().parents[2]
EFFECTS: Final = "tests/unit/test_config_effects.py"
STACK_EFFECTS: Final = "tests/integration/test_config_effects_stack.py::"
STACK: Final = STACK_EFFECTS + "test_prefix_probe_auth_log_and_heartbeat_keys_take_effect"
CATALOG: Final = EFFECTS + "::test_configured_catalog_fields_reach_the_catalog"
TOKENS: Final = EFFECTS + "::test_api_tokens_come_from_their_env_var_or_file_under_their_name"
INTERNAL_TOKEN: Final = EFFECTS + "::test_internal_token_file_or_state_dir_is_where_the_internal_token_is"


PROOF: Final[dict[str, str]] = {
    "version": "tests/unit/test_config.py::test_version_must_be_the_int_1",
    "scheduler.dispatch_attempts": "tests/unit/test_scheduler_parts.py::test_dispatch_attempts_bounds_the_refusals_before_replica_exhausted",  # unit
    "sse.queued_metrics_interval_ms": "tests/unit/test_config_effects.py::test_the_queue_watch_scans_every_queued_metrics_interval",  # unit
    "sampler_profiles.*.temperature": "tests/integration/test_pool_timeouts_effects.py::test_the_pools_sampler_profile_reaches_the_engine",
    "sampler_profiles.*.top_k": "tests/integration/test_pool_timeouts_effects.py::test_the_pools_sampler_profile_reaches_the_engine",
    "sampler_profiles.*.top_p": "tests/integration/test_pool_timeouts_effects.py::test_the_pools_sampler_profile_reaches_the_engine",
    "sampler_profiles.*.min_p": "tests/integration/test_pool_timeouts_effects.py::test_the_pools_sampler_profile_reaches_the_engine",
    "sampler_profiles.*.repeat_penalty": "tests/integration/test_pool_timeouts_effects.py::test_the_pools_sampler_profile_reaches_the_engine",
    "pools.sampler_profile_version": "tests/integration/test_pool_timeouts_effects.py::test_the_pools_sampler_profile_reaches_the_engine",
    "pools.restart.initial_backoff_ms": "tests/unit/test_replica_errors.py::test_the_restart_keys_set_the_backoff_and_the_breaker_window",  # unit
    "pools.restart.max_backoff_ms": "tests/unit/test_replica_errors.py::test_the_restart_keys_set_the_backoff_and_the_breaker_window",  # unit
    "pools.restart.breaker_window_s": "tests/unit/test_replica_errors.py::test_the_restart_keys_set_the_backoff_and_the_breaker_window",  # unit
    "pools.residency": "tests/integration/test_residency.py::test_on_demand_pools_load_evict_and_unload_as_specified",
    "pools.idle_unload_s": "tests/integration/test_residency.py::test_on_demand_pools_load_evict_and_unload_as_specified",
    "pools.pinned": "tests/integration/test_residency.py::test_on_demand_pools_load_evict_and_unload_as_specified",
    "residency.max_swap_wait_ms": "tests/unit/test_loader.py::test_max_swap_wait_ms_decides_when_a_waiting_model_forces_a_swap",  # unit
    "residency.min_residency_s": "tests/unit/test_loader.py::test_min_residency_s_keeps_a_fresh_load",  # unit
    "residency.cpu_memory_mib": "tests/integration/test_poolmgr_residency.py::test_a_load_that_does_not_fit_backs_off_until_an_unload_makes_room",
    "pools.preload": "tests/integration/test_pool_timeouts_effects.py::test_preload_and_the_pool_timeouts_take_effect",
    "pools.timeouts.wall_ms": "tests/integration/test_pool_timeouts_effects.py::test_preload_and_the_pool_timeouts_take_effect",
    "pools.timeouts.start_ms": "tests/integration/test_pool_timeouts_effects.py::test_preload_and_the_pool_timeouts_take_effect",
    "pools.timeouts.selftest_ms": "tests/integration/test_pool_timeouts_effects.py::test_preload_and_the_pool_timeouts_take_effect",
    "pools.engine_env": "tests/unit/test_launch.py::test_engine_env_reaches_the_engine_with_the_device_mask",
    "grpc.tls.cert_file": "tests/integration/test_grpc_tls.py::test_a_tls_server_refuses_plaintext_and_unknown_clients",
    "grpc.tls.key_file": "tests/integration/test_grpc_tls.py::test_a_certificate_without_its_key_is_refused",
    "grpc.tls.ca_file": "tests/integration/test_grpc_tls.py::test_a_tls_server_refuses_plaintext_and_unknown_clients",
    "grpc.tls.require_client_cert": "tests/integration/test_grpc_tls.py::test_a_tls_server_refuses_plaintext_and_unknown_clients",
    "redis.username": "tests/integration/test_redis_auth.py::test_an_acl_user_logs_in_with_its_own_password",
    "redis.password_file": "tests/integration/test_redis_auth.py::test_the_stack_works_with_the_password_from_a_file",
    "redis.tls_ca_file": "tests/integration/test_redis_auth.py::test_rediss_checks_the_server_against_the_ca_file",
    "policy.default": "tests/unit/test_policy.py::test_deny_rules_win_over_allow_rules_and_the_default",
    "policy.deny_private_networks": "tests/unit/test_policy.py::test_only_an_allow_rule_naming_the_host_opens_its_private_addresses",
    "policy.rules.id": "tests/unit/test_policy.py::test_deny_rules_win_over_allow_rules_and_the_default",
    "policy.rules.action": "tests/unit/test_policy.py::test_deny_rules_win_over_allow_rules_and_the_default",
    "policy.rules.hosts": "tests/unit/test_policy.py::test_rules_match_on_scheme_method_port_and_host_case_insensitively",
    "policy.rules.schemes": "tests/unit/test_policy.py::test_rules_match_on_scheme_method_port_and_host_case_insensitively",
    "policy.rules.methods": "tests/unit/test_policy.py::test_rules_match_on_scheme_method_port_and_host_case_insensitively",
    "policy.rules.ports": "tests/unit/test_policy.py::test_rules_match_on_scheme_method_port_and_host_case_insensitively",
    "policy.rules.max_bytes": "tests/unit/test_policy.py::test_rule_limits_override_the_policys",
    "policy.rules.timeout_ms": "tests/unit/test_policy.py::test_rule_limits_override_the_policys",
    "policy.plugins": "tests/unit/test_policy.py::test_load_plugins_loads_only_the_named_ones_in_config_order",
    "policy.plugin_timeout_ms": "tests/unit/test_policy.py::test_a_failing_or_slow_plugin_is_a_deny",
    "policy.max_bytes": "tests/unit/test_policy.py::test_rule_limits_override_the_policys",
    "policy.timeout_ms": "tests/unit/test_policy_http_fetch.py::test_the_rules_timeout_bounds_the_call",
    "policy.max_redirects": "tests/unit/test_policy_http_fetch.py::test_redirects_are_followed_within_the_bound",
    "api.public_base_url": "tests/integration/test_artifacts.py::test_round_trip_dedup_lineage_filters_and_restart",
    "artifacts.dir": "tests/unit/test_artifacts_store.py::test_config_keys_reach_the_gateway_store",
    "artifacts.retention_days": "tests/unit/test_artifacts_store.py::test_config_keys_reach_the_gateway_store",
    "artifacts.max_bytes": "tests/integration/test_artifacts.py::test_limits_bad_input_and_auth",
    "telemetry.otlp_endpoint": "tests/integration/test_tracing.py::test_a_task_is_one_trace_across_the_three_services",
    "state_dir": INTERNAL_TOKEN,
    # api
    "api.bind": STACK,  # binds 127.0.0.2, where the test connects
    "api.max_body_bytes": "tests/integration/test_bad_input.py::test_chunked_body_over_the_limit_is_413",
    "api.probes_require_auth": STACK,
    "api.keepalive_timeout_s": "tests/integration/test_edge.py::test_slow_clients_are_cut_off",
    "api.body_timeout_s": "tests/integration/test_edge.py::test_slow_clients_are_cut_off",
    "api.workers": "tests/integration/test_gateway_workers.py::test_two_workers_serve_any_stream_sum_their_metrics_and_stop_together",
    "api.tokens.name": TOKENS,
    "api.tokens.token_env": TOKENS,
    "api.tokens.token_file": TOKENS,
    "api.tokens.rps": "tests/integration/test_faults.py::test_api_token_rps_throttle",
    "api.tokens.tokens_per_min": "tests/integration/test_faults.py::test_api_token_tokens_per_min",
    # grpc
    "grpc.scheduler": "tests/integration/test_remote_poolmgr.py::test_a_pool_manager_on_another_host_serves_its_pools",
    "grpc.pool_manager_base_port": EFFECTS + "::test_base_ports_place_each_pool_manager",
    "grpc.metrics_base_port": "tests/integration/test_remote_poolmgr.py::test_the_scheduler_binds_its_listen_address",
    "grpc.internal_token_file": INTERNAL_TOKEN,
    # redis
    "redis.url": "tests/integration/test_redis_cluster.py::test_admission_stream_cancel_and_sessions_on_a_cluster",
    "redis.cluster": "tests/integration/test_redis_cluster.py::test_admission_stream_cancel_and_sessions_on_a_cluster",
    "redis.key_prefix": STACK,
    # scheduler
    "scheduler.default_max_tokens": EFFECTS + "::test_default_max_tokens_fills_a_task_that_names_none",
    "scheduler.default_deadline_ms": EFFECTS + "::test_default_deadline_ms_fills_a_task_that_names_none",
    "scheduler.max_deadline_ms": EFFECTS + "::test_max_deadline_ms_refuses_a_longer_deadline",
    "scheduler.ewma_alpha": EFFECTS + "::test_ewma_alpha_weights_each_observation",
    "scheduler.prior_ms_per_token": EFFECTS + "::test_prior_ms_per_token_scales_the_predicted_start",
    "scheduler.backoff_min_ms": EFFECTS + "::test_backoff_min_ms_raises_the_advertised_backoff",
    "scheduler.backoff_max_ms": EFFECTS + "::test_backoff_max_ms_caps_the_advertised_backoff",
    # queue, sessions, sse
    "queue.soft_watermark": EFFECTS + "::test_soft_watermark_is_where_the_backoff_starts",
    "queue.max_batch_wait_ms": "tests/integration/test_admission.py::test_an_aged_batch_task_goes_before_a_newer_interactive_one",
    "sessions.ttl_ms": "tests/integration/test_sessions.py::test_expired_session_is_404_and_its_id_starts_fresh",
    "sessions.max_turns": "tests/integration/test_sessions.py::test_turns_are_limited_and_a_session_keeps_its_model",
    "sessions.budgets.tokens": EFFECTS + "::test_session_budgets_are_the_defaults_of_a_new_session",
    "sessions.budgets.time_ms": EFFECTS + "::test_session_budgets_are_the_defaults_of_a_new_session",
    "sessions.budgets.cost": EFFECTS + "::test_session_budgets_are_the_defaults_of_a_new_session",
    "sse.heartbeat_s": STACK,  # the Stack's 1 s against the default 15 s
    "sse.retention_s": EFFECTS + "::test_retention_s_sets_how_long_a_task_is_kept",
    # pools[]
    "pools.id": "tests/integration/test_bad_input.py::test_known_pool_health_is_200",
    "pools.engine": "tests/unit/test_launch.py::test_make_adapter_picks_the_engine_adapter",
    "pools.model": "tests/unit/test_scheduler_parts.py::test_an_unknown_model_names_the_served_ones",
    "pools.ctx": "tests/unit/test_launch.py::test_llama_server_command_line",
    "pools.replicas": "tests/integration/test_pool_lifecycle.py::test_a_second_reset_before_any_token_ends_the_task",
    "pools.queue.capacity": "tests/integration/test_admission.py::test_full_queue_under_reject_answers_429_admission_reject",
    "pools.queue.full_policy": "tests/integration/test_admission.py::test_drop_lru_evicts_the_oldest_batch_task_and_never_an_interactive_one",
    # allow_cpu only lets a pool run on the CPU: its effect is which configs load.
    "pools.allow_cpu": "tests/unit/test_config.py::test_rule_violation_is_reported",
    "pools.devices": "tests/integration/test_pool_lifecycle.py::test_one_pool_manager_per_device_and_auto_placement",
    "pools.host": "tests/integration/test_remote_poolmgr.py::test_pools_are_selected_by_host",
    "pools.slots": "tests/unit/test_launch.py::test_llama_server_command_line",
    "pools.max_tokens_limit": STACK,
    "pools.workloads": "tests/integration/test_openai_api.py::test_chat_completions_models_and_embeddings_with_the_sdk",
    "pools.tensor_split": EFFECTS + "::test_tensor_split_is_passed_to_llama_server",
    "pools.cost_per_1k_tokens": "tests/integration/test_sessions.py::test_budget_is_reserved_refunded_exactly_and_exhaustion_is_403_before_enqueue",
    "pools.admission.batch.queue_capacity": "tests/integration/test_admission.py::test_class_cap_refuses_the_class_while_the_queue_has_room",
    "pools.admission.batch.rate_limit_rps": "tests/integration/test_admission.py::test_per_class_rate_limit_refuses_a_batch_burst_only",
    "pools.admission.interactive.queue_capacity": EFFECTS
    + "::test_interactive_class_limits_refuse_interactive_tasks_only",
    "pools.admission.interactive.rate_limit_rps": EFFECTS
    + "::test_interactive_class_limits_refuse_interactive_tasks_only",
    "pools.timeouts.idle_ms": "tests/integration/test_faults.py::test_hung_engine_hits_the_idle_watchdog",
    "pools.restart.breaker_failures": "tests/integration/test_pool_lifecycle.py::test_crash_loop_opens_the_circuit_without_a_restart_storm",
    "pools.vram.factor": "tests/unit/test_gpu.py::test_vram_need_grows_with_the_factor",  # unit
    "pools.vram.kv_reserve_mib": "tests/integration/test_pool_lifecycle.py::test_insufficient_simulated_vram_fails_fast_naming_the_device",
    "pools.vram.headroom_mib": "tests/unit/test_gpu.py::test_a_device_passes_iff_its_share_fits",  # unit
    "pools.ram_factor": "tests/unit/test_gpu.py::test_check_ram",  # unit
    "pools.engine_bin": STACK,
    "pools.engine_args": "tests/integration/test_faults.py::test_hung_engine_hits_the_idle_watchdog",
    "pools.adapter": "tests/unit/test_launch.py::test_triton_adapter_takes_the_pool_options_and_metrics_port",
    # catalog
    "catalog.trust_policy.mode": "tests/integration/test_catalog.py::test_strict_trust_and_signatures",
    "catalog.trust_policy.allowed_registries": "tests/unit/test_trust.py::test_registry_allowed_and_not",  # unit
    "catalog.trust_policy.require_signature": "tests/unit/test_trust.py::test_strict_requirements_can_be_relaxed",
    "catalog.trust_policy.require_sbom": "tests/unit/test_trust.py::test_strict_requirements_can_be_relaxed",
    "catalog.trust_policy.ca_roots": "tests/integration/test_catalog.py::test_strict_trust_and_signatures",
    "catalog.models.id": CATALOG,
    "catalog.models.path": CATALOG,
    "catalog.models.digest": CATALOG,
    "catalog.models.source_url": CATALOG,
    "catalog.models.tags": CATALOG,
    "catalog.models.state": CATALOG,
    "catalog.models.signatures.signer": CATALOG,
    "catalog.models.signatures.algo": CATALOG,
    "catalog.models.signatures.sig": CATALOG,
    "catalog.models.signatures.timestamp_ms": CATALOG,
    "catalog.models.sbom.uri": CATALOG,
    "catalog.models.sbom.digest": CATALOG,
    "catalog.models.trust_policy.mode": "tests/integration/test_catalog.py::test_strict_trust_and_signatures",
    "catalog.models.trust_policy.allowed_registries": "tests/unit/test_trust.py::test_policy_for_takes_the_fields_the_entry_sets",
    "catalog.models.trust_policy.require_signature": "tests/unit/test_trust.py::test_policy_for_takes_the_fields_the_entry_sets",
    "catalog.models.trust_policy.require_sbom": "tests/unit/test_trust.py::test_policy_for_takes_the_fields_the_entry_sets",
    "catalog.models.trust_policy.ca_roots": "tests/unit/test_trust.py::test_policy_for_takes_the_fields_the_entry_sets",
    # telemetry
    "telemetry.log_level": STACK,
    "telemetry.log_file": STACK,
    "telemetry.log_prompts": EFFECTS + "::test_log_prompts_true_is_refused_with_a_clear_message",
    "telemetry.gpu_provider": "tests/unit/test_gpu.py::test_fake_inventory_follows_the_config",
    "telemetry.fake_gpus.index": "tests/unit/test_gpu.py::test_fake_inventory_follows_the_config",
    "telemetry.fake_gpus.name": "tests/unit/test_gpu.py::test_fake_inventory_follows_the_config",
    "telemetry.fake_gpus.total_mib": "tests/unit/test_gpu.py::test_fake_inventory_follows_the_config",
    "telemetry.fake_gpus.free_mib": "tests/unit/test_gpu.py::test_fake_inventory_follows_the_config",
}


def _models_in(annotation: object) -> list[tuple[type[BaseModel], str]]:
    """The models an annotation holds, each with the path segment it adds (``.*`` for map values)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, "")]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _models_in(args[0])
    if origin is dict:
        return [(model, ".*" + seg) for model, seg in _models_in(args[1])]
    if origin in (list, typing.Union, types.UnionType):
        return [found for arg in args for found in _models_in(arg)]
    return []


def _key_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths: list[str] = []
    for name, field in model.model_fields.items():
        nested = _models_in(field.annotation)
        if not nested:
            paths.append(prefix + name)
        for sub, segment in nested:
            paths += _key_paths(sub, f"{prefix}{name}{segment}.")
    return paths


KEYS: Final = sorted(set(_key_paths(LlorchConfig)))


@cache
def _test_functions(file: str) -> frozenset[str]:
    tree = ast.parse((ROOT / file).read_text(encoding="utf-8"))
    return frozenset(
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith("test_")
    )


def test_the_walk_finds_nested_list_and_map_keys() -> None:
    # A walk that stopped at the top level would make the completeness check below vacuous.
    for key in (
        "sse.heartbeat_s",
        "pools.vram.factor",
        "sampler_profiles.*.top_k",
        "catalog.models.sbom.uri",
    ):
        assert key in KEYS
    assert "pools" not in KEYS and "catalog.models" not in KEYS  # sections are not leaves


def test_every_key_has_a_row() -> None:
    missing = [k for k in KEYS if k not in PROOF]
    assert not missing, f"config keys without a proof of their effect (add a row to PROOF): {missing}"


def test_every_row_names_a_key_that_exists() -> None:
    stale = sorted(PROOF.keys() - set(KEYS))
    assert not stale, f"rows for keys the config no longer has: {stale}"


@pytest.mark.parametrize("key", sorted(PROOF))
def test_the_named_test_exists(key: str) -> None:
    file, _, name = PROOF[key].partition("::")
    assert (ROOT / file).is_file(), f"{key}: no file {file}"
    assert name in _test_functions(file), f"{key}: {file} has no test {name}"
