"""Every SSE event a test reads is checked against the published contract, contracts/events.schema.json
(a plain JSON Schema validator, independent of the pydantic models it was generated from)."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "contracts" / "events.schema.json"


@cache
def _validators() -> dict[str, Draft202012Validator]:
    schema = json.loads(SCHEMA_PATH.read_text())
    return {
        name: Draft202012Validator({"$defs": schema["$defs"], **sub})
        for name, sub in schema["events"].items()
    }


def check_event(name: str, data: Any) -> None:
    """Raise AssertionError naming the event when it is not in the contract."""
    validator = _validators().get(name)
    assert validator is not None, f"event {name!r} is not in the contract"
    errors = sorted(validator.iter_errors(data), key=str)
    assert not errors, f"{name} event breaks the contract: {errors[0].message}; payload {data!r}"
