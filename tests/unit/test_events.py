"""The event contract: constructors produce what the published schema accepts, the schema file is the
one the models generate, and payloads outside the contract are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llorch import events
from llorch.errors import Code, OrchestratorError
from tests.support.events_schema import SCHEMA_PATH, check_event


def test_schema_file_is_generated_from_the_models() -> None:
    assert json.loads(Path(SCHEMA_PATH).read_text()) == events.json_schema(), (
        "contracts/events.schema.json is stale: regenerate it from llorch.events.json_schema()"
    )


def _samples() -> list[tuple[str, str]]:
    exc = OrchestratorError(Code.QUEUE_FULL_DROP_LRU, "evicted", policy_label="drop-lru", retry_after_ms=5)
    return [
        ("started", events.started("t1", 0, 120, 0.5, "batch")),
        ("metrics", events.queued(3, 900, 4, 1.0)),
        (
            "metrics",
            events.dispatch(
                pool_id="p",
                replica_id="r0",
                engine="mock",
                engine_version="1",
                kv_warmth=True,
                queue_time_ms=4,
                seed=7,
                determinism="strict",
                sampler_profile_version="v1",
            ),
        ),
        (
            "metrics",
            events.decode(queue_depth=0, on_time_probability=1.0, kv_warmth=False, tokens_out_so_far=1),
        ),
        (
            "metrics",
            events.decode(
                queue_depth=2,
                on_time_probability=0.25,
                kv_warmth=True,
                tokens_out_so_far=9,
                budgets={"tokens_budget_remaining": 10, "cost_budget_remaining": 0.5},
            ),
        ),
        ("token", events.token('a "quoted" \\ piece\n\u00e9\U0001f600', 3)),
        (
            "end",
            events.end(
                tokens_out=2,
                decode_ms=9,
                tokens_in=4,
                queue_time_ms=1,
                first_token_ms=5,
                finish_reason="length",
                pool_id="p",
                replica_id="r0",
            ),
        ),
        ("error", events.error(exc, engine="mock")),
        ("error", events.error(OrchestratorError(Code.WORKER_RESET, "x"), 3, pool_id="p", replica_id="")),
    ]


@pytest.mark.parametrize(("name", "data"), _samples())
def test_every_constructor_meets_the_schema_and_the_models(name: str, data: str) -> None:
    check_event(name, json.loads(data))
    events.validate(name, data)


def test_budgets_are_top_level_in_decode_metrics() -> None:
    data = json.loads(
        events.decode(
            queue_depth=0,
            on_time_probability=1.0,
            kv_warmth=False,
            tokens_out_so_far=0,
            budgets={"tokens_budget_remaining": 5, "time_budget_remaining_ms": 100},
        )
    )
    assert data["tokens_budget_remaining"] == 5 and data["time_budget_remaining_ms"] == 100
    assert "budget" not in data and "cost_budget_remaining" not in data


def test_error_payload_comes_from_the_error_tree() -> None:
    data = json.loads(events.error(OrchestratorError(Code.CANCELED, "bye"), 2, engine="mock", pool_id=None))
    assert data == {
        "code": "CANCELED",
        "message": "bye",
        "retriable": False,
        "tokens_out": 2,
        "engine": "mock",
    }
    assert json.loads(events.error(OrchestratorError(Code.WORKER_RESET, "r")))["retriable"] is True


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("metrics", {"phase": "decode", "queue_depth": 0}),  # fields missing
        ("metrics", {"phase": "warp", "queue_depth": 0}),  # no such phase
        (
            "metrics",
            {
                "phase": "decode",
                "queue_depth": 0,
                "on_time_probability": 1,
                "kv_warmth": True,
                "tokens_out_so_far": 0,
                "budget": {"tokens_budget_remaining": 1},  # nested budgets: the old defect
            },
        ),
        ("token", {"t": "x", "i": "0"}),  # wrong type
        ("error", {"code": "NOPE", "message": "m", "retriable": True, "tokens_out": 0}),
        ("finished", {}),  # no such event
    ],
)
def test_payloads_outside_the_contract_are_refused(name: str, data: dict[str, object]) -> None:
    with pytest.raises(AssertionError):
        check_event(name, data)
    with pytest.raises(ValueError):
        events.validate(name, data)


@given(st.text(), st.integers(min_value=0, max_value=2**31))
def test_token_fast_path_equals_plain_json(text: str, i: int) -> None:
    assert json.loads(events.token(text, i)) == {"t": text, "i": i}
