"""The scheduler's side of ``AdmitStream``: every call gets exactly one result with its own number,
answers come out as they are decided (not in arrival order), and each kind of failure becomes the
typed envelope the gateway turns back into the same error."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from redis.exceptions import ConnectionError as RedisConnectionError

from llorch.errors import Code, OrchestratorError
from llorch.logs import correlation_id_var
from llorch.rpc import from_envelope
from llorch.v1 import scheduler_pb2
from llorch_scheduler import admit_stream

HANG_GUARD_S = 30.0


def _call(number: int, model: str, cid: str = "") -> scheduler_pb2.AdmitCall:
    context = {"x-correlation-id": cid} if cid else {}
    request = scheduler_pb2.AdmitRequest(model_ref=model)
    return scheduler_pb2.AdmitCall(call=number, request=request, context=context)


async def _messages(*batches: list[scheduler_pb2.AdmitCall]) -> AsyncIterator[scheduler_pb2.AdmitCalls]:
    for calls in batches:
        yield scheduler_pb2.AdmitCalls(calls=calls)


async def _results(*batches: list[scheduler_pb2.AdmitCall]) -> dict[int, scheduler_pb2.AdmitResult]:
    release = asyncio.Event()

    async def admit(
        request: scheduler_pb2.AdmitRequest, context: list[tuple[str, str]]
    ) -> scheduler_pb2.AdmitResponse:
        model = request.model_ref
        if model == "slow":
            await release.wait()  # decided only after every other call
        if model == "refused":
            raise OrchestratorError(Code.INVALID_PARAMS, "no such model", field="model_ref")
        if model == "redis-away":
            raise RedisConnectionError("connection refused")
        if model == "defect":
            raise KeyError("a bug")
        return scheduler_pb2.AdmitResponse(task_id=f"t-{model}", session_id=correlation_id_var.get() or "")

    out: dict[int, scheduler_pb2.AdmitResult] = {}
    async with asyncio.timeout(HANG_GUARD_S):  # answering in arrival order would wait forever
        async for message in admit_stream.serve(_messages(*batches), admit):
            for result in message.results:
                assert result.call not in out, result
                out[result.call] = result
            if len(out) == sum(len(b) for b in batches) - 1:
                release.set()
    return out


async def test_each_call_gets_its_own_result_even_when_a_slow_one_is_decided_last() -> None:
    results = await _results([_call(1, "slow"), _call(2, "a", "cid-2")], [_call(3, "b", "cid-3")])
    assert sorted(results) == [1, 2, 3]
    assert results[1].reply.task_id == "t-slow"
    assert (results[2].reply.task_id, results[2].reply.session_id) == ("t-a", "cid-2")
    assert (results[3].reply.task_id, results[3].reply.session_id) == ("t-b", "cid-3")
    assert not any(r.error_json for r in results.values())


async def test_failures_travel_as_typed_envelopes() -> None:
    results = await _results(
        [_call(7, "refused"), _call(8, "redis-away"), _call(9, "defect"), _call(10, "ok")]
    )
    refused = from_envelope(results[7].error_json)
    assert (refused.code, refused.message) == (Code.INVALID_PARAMS, "no such model")
    assert json.loads(results[7].error_json)["field"] == "model_ref"
    away = from_envelope(results[8].error_json)
    assert away.code is Code.POOL_UNREADY and away.retriable and "Redis" in away.message
    defect = from_envelope(results[9].error_json)
    assert defect.code is Code.INTERNAL and "a bug" not in defect.message
    assert results[10].reply.task_id == "t-ok" and not results[10].error_json
    assert not results[7].HasField("reply")
