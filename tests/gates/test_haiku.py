"""The Haiku end-to-end gate (SPEC §9): a real llama-server behind the whole stack, public HTTP API only.

Runs only with ``REQUIRE_REAL_LLAMA=1`` (``make haiku`` / ``scripts/gate-haiku.sh`` start a stack and set
it); otherwise skipped. Inputs: ``LLORCH_BASE_URL`` (default ``http://127.0.0.1:8080``) and
``LLORCH_API_TOKEN``. It imports nothing from ``llorch``; :mod:`gates.client` is a plain HTTP client.

Steps, each within one 30 s budget per attempt: (1) ``GET /v1/replicasets`` lists a Ready ``llamacpp``
set whose ``engine_version`` does not start with ``mock`` — else the gate FAILS; (2) sum
``tokens_out_total`` over that set's pools; (3) build the prompt from the current minute in words
(Europe/Amsterdam) and an 8-character ``[a-z0-9]`` code made now; (4) ``POST /v1/tasks`` with the set's
model, ``max_tokens: 64``, a random seed and ``deadline_ms: 30000``; (5) read the stream. Pass: 202; the
§3 event order; ``end`` with ``tokens_out`` ≥ 1; a ``tokens_out_total`` delta ≥ ``end.tokens_out`` (the
pool manager counts right after writing ``end``, so the scrape is repeated until it shows, within the
budget); ``engine``/``engine_version`` labels visible. If the minute changed during an attempt, the
gate tries once more.

CPU: a set whose devices are all ``cpu`` counts only with ``LLORCH_ALLOW_CPU_GATE=1`` and is reported
as ``cpu-fallback``. Output: the text is printed and stored as a ``trace`` artifact (tags ``haiku-gate``
and the mode, metadata with the task id) through ``POST /v1/artifacts``, then read back with
``GET /v1/artifacts/{id}``: a POST other than 201/200, or a document that differs from what was posted,
fails the gate. A copy goes to ``$LLORCH_GATE_OUT/haiku.txt`` (default ``./gate-out/``). The text is
never compared with anything else.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import string
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from gates.client import (
    ApiClient,
    ApiError,
    Frame,
    GateError,
    JsonObject,
    dispatch_frame,
    event_order_problems,
    get_int,
    get_list,
    get_str,
    matching,
    poll_until,
    sum_family,
)

AMSTERDAM = ZoneInfo("Europe/Amsterdam")
BUDGET_S = 30.0
MAX_TOKENS = 64
DEADLINE_MS = 30000
CODE_ALPHABET = string.ascii_lowercase + string.digits
# Filled in at run time only; nothing outside tests/ may contain this text (test_anticheat.py).
# The SPEC §9 sentence, then a line break: /v1/tasks is a raw completion, and SmolLM2-135M-Instruct
# answers the bare sentence with end-of-sequence as its first token in most runs (15 of 16 measured,
# tokens_out 0); after a line break it writes text (12 of 12).
PROMPT = 'Write a haiku about GPUs that uses the words "{words}" and ends with the code {code}.\n'

_UNITS = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
    "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
)  # fmt: skip
_TENS = {2: "twenty", 3: "thirty", 4: "forty", 5: "fifty"}


def minute_in_words(minute: int) -> str:
    """0..59 in English words, hyphenated like ``twenty-seven``; 0 is ``zero``."""
    if not 0 <= minute <= 59:
        raise ValueError(f"not a minute: {minute}")
    if minute < 20:
        return _UNITS[minute]
    tens, units = divmod(minute, 10)
    return _TENS[tens] + (f"-{_UNITS[units]}" if units else "")


def amsterdam_minute() -> int:
    return datetime.now(AMSTERDAM).minute


def fresh_code() -> str:
    """8 random characters from ``[a-z0-9]``, made at run time."""
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(8))


# ---- always run: the helpers the gate relies on --------------------------------------------------


@pytest.mark.parametrize(
    ("minute", "words"),
    [(0, "zero"), (7, "seven"), (13, "thirteen"), (20, "twenty"), (27, "twenty-seven"), (59, "fifty-nine")],
)
def test_minute_in_words(minute: int, words: str) -> None:
    assert minute_in_words(minute) == words


def test_every_minute_has_distinct_well_formed_words() -> None:
    words = [minute_in_words(m) for m in range(60)]
    assert len(set(words)) == 60
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)?", w) for w in words)
    with pytest.raises(ValueError):
        minute_in_words(60)


def test_codes_are_fresh_and_well_formed() -> None:
    codes = {fresh_code() for _ in range(50)}
    assert len(codes) == 50
    assert all(re.fullmatch(r"[a-z0-9]{8}", c) for c in codes)


# ---- the gate ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    set_id: str
    model_ref: str
    engine_version: str
    pool_ids: tuple[str, ...]
    cpu: bool


@dataclass(frozen=True)
class Outcome:
    target: Target
    minute_changed: bool
    prompt: str
    task_id: str
    frames: list[Frame]
    elapsed_s: float

    @property
    def text(self) -> str:
        return "".join(get_str(f.data, "t") for f in self.frames if f.event == "token")


def _pool_ids(replica_set: JsonObject) -> tuple[str, ...]:
    ids = []
    for pool in get_list(replica_set, "pools"):
        ids.append(str(pool.get("pool_id", pool.get("id"))) if isinstance(pool, dict) else str(pool))
    return tuple(ids)


def _is_ready(replica_set: JsonObject) -> bool:
    ready = replica_set.get("ready")
    if isinstance(ready, bool):
        return ready
    slots = replica_set.get("slots_total")
    return isinstance(slots, int) and slots > 0  # a gateway without `ready`: Ready replicas have slots


async def _devices(client: ApiClient, replica_set: JsonObject) -> list[str]:
    devices = replica_set.get("devices")
    if isinstance(devices, list) and devices:
        return [str(d) for d in devices]
    members = set(_pool_ids(replica_set))  # a gateway without `devices` on sets: ask the pools
    found: list[str] = []
    for pool in await client.pools():
        if pool.get("pool_id") in members:
            value = pool.get("devices")
            found += [str(d) for d in value] if isinstance(value, list) else [str(value)]
    return found


async def find_target(client: ApiClient) -> Target:
    """SPEC §9 step 1: a Ready llamacpp set that is not the mock; fails (never skips) without one."""
    missing: ApiError | None = None
    try:
        sets = await client.replicasets()
    except ApiError as exc:
        missing = exc
    if missing is not None:
        pytest.fail(
            f"GET /v1/replicasets answered {missing.status}: the gate needs it to find a Ready llamacpp set "
            f"(SPEC §2.3, §9 step 1). Body: {missing.body[:300]}",
            pytrace=False,
        )
    candidates = [
        s
        for s in sets
        if s.get("engine") == "llamacpp"
        and isinstance(s.get("engine_version"), str)
        and not get_str(s, "engine_version").startswith("mock")
        and _is_ready(s)
    ]
    if not candidates:
        seen = [(s.get("id"), s.get("engine"), s.get("engine_version"), s.get("ready")) for s in sets]
        pytest.fail(
            "no Ready llamacpp replica set with a real (non-mock) engine_version; "
            f"GET /v1/replicasets listed (id, engine, engine_version, ready): {seen}",
            pytrace=False,
        )
    targets = []
    for s in candidates:
        devices = await _devices(client, s)
        cpu = bool(devices) and all(d == "cpu" for d in devices)
        version = get_str(s, "engine_version")
        targets.append(Target(get_str(s, "id"), get_str(s, "model_id"), version, _pool_ids(s), cpu))
    targets.sort(key=lambda t: t.cpu)  # a GPU set first, when there is one
    target = targets[0]
    if target.cpu and os.environ.get("LLORCH_ALLOW_CPU_GATE") != "1":
        pytest.fail(
            f"the only Ready llamacpp set ({target.set_id}) runs on the CPU; a CPU run counts only with "
            "LLORCH_ALLOW_CPU_GATE=1 (make haiku sets it) and is reported as cpu-fallback",
            pytrace=False,
        )
    return target


async def tokens_out_total(client: ApiClient, target: Target) -> float:
    """SPEC §9 step 2: ``tokens_out_total`` summed over the set's replicas (its pools, its version)."""
    labels = {"engine": "llamacpp", "engine_version": target.engine_version, "pool_id": target.pool_ids}
    return sum_family(await client.metrics(), "tokens_out_total", labels)


async def attempt(client: ApiClient) -> Outcome:
    """One run of steps 1-5 and the checks; raises ``AssertionError`` on a failed criterion."""
    started = time.monotonic()
    target = await find_target(client)
    before = await tokens_out_total(client, target)
    minute = amsterdam_minute()
    prompt = PROMPT.format(words=minute_in_words(minute), code=fresh_code())
    body = {
        "model_ref": target.model_ref,
        "prompt": prompt,
        "max_tokens": MAX_TOKENS,
        "seed": secrets.randbelow(2**31),
        "deadline_ms": DEADLINE_MS,
    }
    submitted = await client.submit(body)
    assert submitted.status == 202, f"POST /v1/tasks answered {submitted.status}: {submitted.body}"
    frames = await client.stream(submitted.task_id, timeout_s=BUDGET_S)
    outcome = Outcome(target, amsterdam_minute() != minute, prompt, submitted.task_id, frames, 0.0)
    if outcome.minute_changed:
        return outcome

    problems = event_order_problems(frames)
    assert not problems, f"the stream breaks SPEC §3: {problems}; frames: {[f.event for f in frames]}"
    end = frames[-1]
    assert end.event == "end", f"the stream ended with {end.event}: {end.data}"
    tokens_out = get_int(end.data, "tokens_out")
    assert tokens_out >= 1, f"end.tokens_out = {tokens_out}"
    dispatch = dispatch_frame(frames)
    assert dispatch is not None
    assert dispatch.data.get("engine") == "llamacpp", dispatch.data
    assert dispatch.data.get("engine_version") == target.engine_version, dispatch.data
    assert dispatch.data.get("pool_id") in target.pool_ids, dispatch.data

    async def counted() -> bool:
        return await tokens_out_total(client, target) - before >= tokens_out

    try:
        await poll_until(counted, BUDGET_S, f"a tokens_out_total delta >= end.tokens_out ({tokens_out})")
    except GateError as exc:
        delta = await tokens_out_total(client, target) - before
        pytest.fail(f"{exc}; the delta is {delta:g}", pytrace=False)
    labelled = matching(
        await client.metrics(),
        "tokens_out_total",
        {"engine": "llamacpp", "engine_version": target.engine_version, "pool_id": target.pool_ids},
    )
    assert labelled, (
        f"no tokens_out_total sample with engine=llamacpp, engine_version={target.engine_version}"
    )
    return Outcome(target, False, prompt, submitted.task_id, frames, time.monotonic() - started)


async def store(client: ApiClient, outcome: Outcome, mode: str) -> str:
    """Store the text as a ``trace`` artifact and read it back (the gate fails when either does not
    work), with a copy in ``$LLORCH_GATE_OUT/haiku.txt``; says where."""
    end = outcome.frames[-1].data
    content: JsonObject = {
        "gate": "haiku",
        "mode": mode,
        "at": datetime.now(AMSTERDAM).isoformat(timespec="seconds"),
        "task_id": outcome.task_id,
        "replica_set_id": outcome.target.set_id,
        "model_ref": outcome.target.model_ref,
        "engine": "llamacpp",
        "engine_version": outcome.target.engine_version,
        "replica_id": end.get("replica_id"),
        "prompt": outcome.prompt,
        "text": outcome.text,
        "tokens_out": end.get("tokens_out"),
        "finish_reason": end.get("finish_reason"),
    }
    path = write_out(content)  # a local copy as well, for a person reading the run
    metadata: JsonObject = {"gate": "haiku", "task_id": outcome.task_id, "mode": mode}
    status, answer = await client.post_artifact("trace", content, ["haiku-gate", mode], metadata)
    assert status in (200, 201), f"POST /v1/artifacts answered {status}: {answer}"
    artifact_id = get_str(answer, "id")
    stored = await client.get_artifact(artifact_id)
    tags = stored.get("tags")
    problems = [
        name
        for name, ok in (
            ("id", stored.get("id") == artifact_id),
            ("kind", stored.get("kind") == "trace"),
            ("content", stored.get("content") == content),
            ("metadata", stored.get("metadata") == metadata),
            ("tags", isinstance(tags, list) and {"haiku-gate", mode} <= set(tags)),
            ("url", get_str(stored, "url").endswith(f"/v1/artifacts/{artifact_id}")),
        )
        if not ok
    ]
    assert not problems, f"GET /v1/artifacts/{artifact_id} does not match what was posted: {problems}"
    return f"stored as trace artifact {artifact_id} ({get_str(stored, 'url')}) and read back; copy in {path}"


def write_out(content: JsonObject) -> Path:
    """``$LLORCH_GATE_OUT/haiku.txt`` (default ``gate-out/``, which git ignores): fields, then the text."""
    out = Path(os.environ.get("LLORCH_GATE_OUT") or "gate-out")
    out.mkdir(parents=True, exist_ok=True)
    path = out / "haiku.txt"
    lines = [
        f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in content.items() if key != "text"
    ]
    path.write_text("\n".join([*lines, "", str(content["text"]), ""]), encoding="utf-8")
    return path


@pytest.mark.skipif(
    os.environ.get("REQUIRE_REAL_LLAMA") != "1",
    reason="the Haiku gate runs only with REQUIRE_REAL_LLAMA=1 (make haiku / scripts/gate-haiku.sh)",
)
async def test_haiku_gate() -> None:
    base_url = os.environ.get("LLORCH_BASE_URL") or "http://127.0.0.1:8080"
    token = os.environ.get("LLORCH_API_TOKEN", "")
    if not token:
        pytest.fail("LLORCH_API_TOKEN is not set (scripts/gate-haiku.sh reads it from the state dir)")
    async with ApiClient(base_url, token, request_timeout_s=BUDGET_S) as client:
        outcome: Outcome | None = None
        for n in (1, 2):
            try:
                async with asyncio.timeout(BUDGET_S):
                    outcome = await attempt(client)
            except TimeoutError:
                pytest.fail(f"attempt {n} did not finish within {BUDGET_S:g} s (SPEC §9)", pytrace=False)
            if not outcome.minute_changed:
                break
            print(f"haiku gate: the minute changed during attempt {n}; trying again")
        assert outcome is not None
        assert not outcome.minute_changed, "the minute changed during both attempts"
        mode = "cpu-fallback" if outcome.target.cpu else "gpu"
        end = outcome.frames[-1].data
        print(
            f"\nhaiku gate: PASS ({mode}) in {outcome.elapsed_s:.1f} s: set {outcome.target.set_id}, "
            f"llamacpp {outcome.target.engine_version}, replica {end.get('replica_id')}, "
            f"{end.get('tokens_out')} tokens ({end.get('finish_reason')})\n---\n{outcome.text}\n---"
        )
        print(f"haiku gate: {await store(client, outcome, mode)}")
