"""The error tree matches contracts/error-codes.json (SPEC §4) code for code."""

from __future__ import annotations

import json
from pathlib import Path

from llorch.errors import HTTP_STATUS, RETRIABLE, Code, OrchestratorError

CONTRACT = Path(__file__).resolve().parents[2] / "contracts" / "error-codes.json"


def test_codes_statuses_and_retriability_match_the_contract() -> None:
    rows = json.loads(CONTRACT.read_text())
    assert {row["code"] for row in rows} == {code.value for code in Code}
    for row in rows:
        code = Code(row["code"])
        assert HTTP_STATUS[code] == row["http_status"], code
        assert (code in RETRIABLE) == row["retriable"], code


def test_envelope_carries_code_message_retriable_and_context() -> None:
    exc = OrchestratorError(Code.ADMISSION_REJECT, "full", policy_label="reject", retry_after_ms=300)
    assert exc.envelope() == {
        "code": "ADMISSION_REJECT",
        "message": "full",
        "retriable": True,
        "policy_label": "reject",
        "retry_after_ms": 300,
    }
    assert exc.http_status == 429
