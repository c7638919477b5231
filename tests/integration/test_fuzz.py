"""schemathesis against a live stack: every documented operation, valid and invalid inputs, no 5xx and
no response that breaks the document (status code, content type, body schema).

The two long-lived streams (``GET /v1/tasks/{task_id}/stream``, ``GET /v1/status/stream``) are left out:
a stateless fuzzer would hold each open until its timeout; their error paths (bad ids, bad
Last-Event-ID, unknown task) are covered by test_stream.py and test_bad_input.py. Random models never
reach an engine, so :data:`LIVE` adds explicit examples that do (JSON and streamed answers alike).
A failure this finds is fixed in the gateway and kept as an explicit regression test in
test_fuzz_regressions.py. ``LLORCH_FUZZ_EXAMPLES`` raises the count for a deeper run.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup

from llorch_gateway.openapi import build_document
from tests.support.stack import mock_pool

EXAMPLES = int(os.environ.get("LLORCH_FUZZ_EXAMPLES", "8"))
"""Examples per operation and mode (positive, negative): bounded so the run fits ``make test``."""
SKIPPED = frozenset({("GET", "/v1/tasks/{task_id}/stream"), ("GET", "/v1/status/stream")})
TEXT = [{"type": "text", "text": "hi"}]
INPUT = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]
LIVE: dict[str, list[dict[str, Any]]] = {
    "/v1/tasks": [{"model_ref": "mock-tiny", "prompt": "hi", "max_tokens": 3}],
    "/v1/chat/completions": [
        {"model": "mock-tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        {
            "model": "mock-tiny",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 3,
            "stream": True,
        },
    ],
    "/v1/completions": [
        {"model": "mock-tiny", "prompt": "hi", "max_tokens": 3},
        {"model": "mock-tiny", "prompt": "hi", "max_tokens": 3, "stream": True},
    ],
    "/v1/messages": [
        {"model": "mock-tiny", "max_tokens": 3, "messages": [{"role": "user", "content": TEXT}]},
        {
            "model": "mock-tiny",
            "max_tokens": 3,
            "messages": [{"role": "user", "content": TEXT}],
            "stream": True,
        },
    ],
    "/v1/messages/count_tokens": [{"model": "mock-tiny", "messages": [{"role": "user", "content": TEXT}]}],
    "/v1/responses": [
        {"model": "mock-tiny", "input": INPUT, "max_output_tokens": 3},
        {"model": "mock-tiny", "input": INPUT, "max_output_tokens": 3, "stream": True},
    ],
}
"""Explicit examples that reach the mock engine (random models never do): the success bodies and
streams of the data plane are checked too."""
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@dataclass
class Report:
    examples: int = 0
    operations: int = 0
    failures: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    live_ok: int = 0


def fuzz(base_url: str, headers: dict[str, str], report: Report) -> None:
    """Run every operation's positive and negative examples; record failures (first per operation)."""
    schema = schemathesis.openapi.from_dict(_with_live_examples(build_document()))
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            if (operation.method.upper(), operation.path) in SKIPPED:
                continue
            report.operations += 1
            for explicit in operation.get_strategies_from_examples():
                _run(explicit, base_url, headers, session, report, explicit=True)
            _run(operation.as_strategy(), base_url, headers, session, report)
            if operation.path_parameters or operation.query or operation.body:
                # Invalid inputs exist only where there are inputs.
                negative = operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)
                _run(negative, base_url, headers, session, report)


def _with_live_examples(doc: dict[str, Any]) -> dict[str, Any]:
    for path, bodies in LIVE.items():
        content = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        content["examples"] = {f"live{i}": {"value": body} for i, body in enumerate(bodies)}
    return doc


def _run(
    strategy: Any,
    base_url: str,
    headers: dict[str, str],
    session: requests.Session,
    report: Report,
    explicit: bool = False,
) -> None:
    seen: list[str] = []  # one failure per operation and mode is enough to act on

    @settings(
        max_examples=1 if explicit else EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,  # the same examples every run: a failure reproduces
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def check(case: schemathesis.Case) -> None:
        report.examples += 1
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=30)
        report.statuses[response.status_code] += 1
        report.live_ok += explicit and response.status_code < 300
        try:
            case.validate_response(response, checks=CHECKS)
        except (FailureGroup, AssertionError) as exc:  # several failed checks, or one
            if not seen:
                seen.append(case.operation.label)
                report.failures.append(
                    f"{case.operation.label}: {exc}\n  reproduce: {case.as_curl_command()}"
                )

    run: Callable[[], None] = check
    run()


async def test_schemathesis_finds_no_failures(stack_factory: Any, capsys: pytest.CaptureFixture[str]) -> None:
    # No token delay: a fuzzed completion that reaches the engine answers at once.
    stack = stack_factory(pools=[mock_pool(args=["--token-delay-ms", "0"])])
    await stack.start()
    report = Report()
    await asyncio.to_thread(fuzz, stack.url, stack.headers, report)
    statuses = dict(sorted(report.statuses.items()))
    with capsys.disabled():  # the count shows in every run, not only a failing one
        print(
            f"schemathesis {schemathesis.SCHEMATHESIS_VERSION} (hypothesis {hypothesis.__version__}): "
            f"{report.examples} examples over {report.operations} operations, "
            f"{len(report.failures)} failures; statuses {statuses}"
        )
    assert report.operations >= 30 and report.examples >= report.operations * 2
    # The token got the examples past auth: most reached the handlers and their validation.
    assert report.statuses[401] + report.statuses[403] < report.examples // 10, report.statuses
    assert report.live_ok == sum(len(bodies) for bodies in LIVE.values()), "a live example failed"
    assert report.failures == [], "\n\n".join(report.failures)
