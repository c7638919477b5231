"""A minimal client of the public HTTP API (SPEC §2, §3, §6), for the release gates.

Only what the gates need: submit a task, read its SSE stream into frames, list replica sets and pools,
scrape ``/metrics`` and sum a family, post an artifact. JSON payloads stay plain ``dict[str, object]``;
the ``get_*`` helpers read typed fields from them and raise :class:`ProtocolError` when a field is
missing or has the wrong type, so a gate fails with the field's name instead of a ``KeyError``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType

import aiohttp

JsonObject = dict[str, object]

TERMINAL_EVENTS = frozenset({"end", "error"})
KNOWN_EVENTS = frozenset({"started", "metrics", "token", "end", "error"})


class GateError(Exception):
    """A gate cannot go on: the stack, the API or the data is not what the gate needs."""


class ProtocolError(GateError):
    """A response or frame does not have the shape SPEC §2/§3 promise."""


class ApiError(GateError):
    """An HTTP call answered an unexpected status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} answered {status}: {body[:500]}")
        self.method = method
        self.path = path
        self.status = status
        self.body = body


# ---- typed access to JSON ------------------------------------------------------------------------


def get_str(obj: Mapping[str, object], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise ProtocolError(f"field {key!r} should be a string, got {value!r}")
    return value


def get_int(obj: Mapping[str, object], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"field {key!r} should be an integer, got {value!r}")
    return value


def get_list(obj: Mapping[str, object], key: str) -> list[object]:
    value = obj.get(key)
    if not isinstance(value, list):
        raise ProtocolError(f"field {key!r} should be a list, got {value!r}")
    return value


def as_object(value: object, what: str) -> JsonObject:
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise ProtocolError(f"{what} should be a JSON object, got {value!r}")
    return value


def as_objects(value: object, what: str) -> list[JsonObject]:
    if not isinstance(value, list):
        raise ProtocolError(f"{what} should be a JSON list, got {value!r}")
    return [as_object(item, f"{what}[{i}]") for i, item in enumerate(value)]


# ---- SSE frames ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One SSE frame: ``id:`` (seq), ``event:``, ``data:`` (a JSON object), and when it arrived
    (``time.monotonic()`` in this process)."""

    seq: int
    event: str
    data: JsonObject
    arrived_s: float


def parse_frame(fields: Mapping[str, str], arrived_s: float) -> Frame:
    """Build a frame from its ``id``/``event``/``data`` fields (SPEC §3 framing: all three present)."""
    missing = [name for name in ("id", "event", "data") if name not in fields]
    if missing:
        raise ProtocolError(f"SSE frame without {', '.join(missing)}: {dict(fields)!r}")
    try:
        seq = int(fields["id"])
        data = json.loads(fields["data"])
    except ValueError as exc:
        raise ProtocolError(f"SSE frame with a bad id or data: {dict(fields)!r}") from exc
    return Frame(seq, fields["event"], as_object(data, f"data of {fields['event']!r}"), arrived_s)


async def read_frames(lines: aiohttp.StreamReader) -> list[Frame]:
    """Read SSE frames until the terminal frame or the end of the body; ``:`` comments are heartbeats."""
    frames: list[Frame] = []
    fields: dict[str, str] = {}
    async for raw in lines:
        line = raw.decode("utf-8").rstrip("\r\n")
        if line.startswith(":"):
            continue
        if line:
            name, _, value = line.partition(":")
            if name in fields:
                raise ProtocolError(f"SSE field {name!r} twice in one frame")
            fields[name] = value.removeprefix(" ")
            continue
        if fields:
            frames.append(parse_frame(fields, time.monotonic()))
            fields = {}
            if frames[-1].event in TERMINAL_EVENTS:
                break
    return frames


def dispatch_frame(frames: Sequence[Frame]) -> Frame | None:
    """The dispatch ``metrics`` frame (``phase: "dispatch"``), which names the replica."""
    return next((f for f in frames if f.event == "metrics" and f.data.get("phase") == "dispatch"), None)


def event_order_problems(frames: Sequence[Frame]) -> list[str]:
    """What in ``frames`` breaks the event order of SPEC §3; empty when the stream is well formed.

    Checked: seq counts 0, 1, 2, …; ``started`` exactly once and first; queued ``metrics`` only before
    the dispatch ``metrics``; at most one dispatch ``metrics``, and exactly one before any token or an
    ``end``; tokens numbered ``i`` = 0, 1, 2, …; a decode ``metrics`` after the first token (or, with no
    tokens, before ``end``); exactly one terminal event, last; ``end.tokens_out`` = the tokens sent.
    """
    if not frames:
        return ["the stream had no frames"]
    problems: list[str] = []
    seqs = [f.seq for f in frames]
    if seqs != list(range(len(frames))):
        problems.append(f"seq should count 0..{len(frames) - 1}, got {seqs}")
    names = [f.event for f in frames]
    if names[0] != "started" or names.count("started") != 1:
        problems.append(f"`started` must come exactly once and first: {names}")
    unknown = sorted(set(names) - KNOWN_EVENTS)
    if unknown:
        problems.append(f"unknown events {unknown}")
    terminals = [i for i, name in enumerate(names) if name in TERMINAL_EVENTS]
    if terminals != [len(frames) - 1]:
        problems.append(f"exactly one terminal event, last, expected: {names}")
    phases = [(i, f.data.get("phase")) for i, f in enumerate(frames) if f.event == "metrics"]
    dispatches = [i for i, phase in phases if phase == "dispatch"]
    tokens = [i for i, name in enumerate(names) if name == "token"]
    if len(dispatches) > 1:
        problems.append(f"{len(dispatches)} dispatch `metrics` frames, expected one")
    if (tokens or names[-1] == "end") and not dispatches:
        problems.append("tokens or `end` without a dispatch `metrics` frame")
    first_payload = tokens[0] if tokens else len(frames) - 1
    if dispatches and dispatches[0] > first_payload:
        problems.append("the dispatch `metrics` frame came after the first token")
    if any(phase == "queued" and dispatches and i > dispatches[0] for i, phase in phases):
        problems.append("a queued `metrics` frame after dispatch")
    if any(phase not in ("queued", "dispatch", "decode") for _, phase in phases):
        problems.append(f"a `metrics` frame with an unknown phase: {[p for _, p in phases]}")
    indices = [frames[i].data.get("i") for i in tokens]
    if indices != list(range(len(tokens))):
        problems.append(f"token `i` should count 0..{len(tokens) - 1}, got {indices}")
    decodes = [i for i, phase in phases if phase == "decode"]
    if tokens and not any(i > tokens[0] for i in decodes):
        problems.append("no decode `metrics` frame after the first token")
    if not tokens and names[-1] == "end" and not decodes:
        problems.append("no decode `metrics` frame before an `end` with no tokens")
    if names[-1] == "end" and frames[-1].data.get("tokens_out") != len(tokens):
        problems.append(
            f"end.tokens_out = {frames[-1].data.get('tokens_out')!r}, but {len(tokens)} tokens came"
        )
    return problems


# ---- Prometheus text -----------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"\s*,?')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


def parse_metrics(text: str) -> list[Sample]:
    """Parse the Prometheus text format (0.0.4): one :class:`Sample` per sample line."""
    samples: list[Sample] = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = _SAMPLE.match(line.strip())
        if match is None:
            raise ProtocolError(f"not a Prometheus sample line: {line!r}")
        name, body, value = match.groups()
        labels: dict[str, str] = {}
        pos = 0
        while body and pos < len(body):
            label = _LABEL.match(body, pos)
            if label is None:
                raise ProtocolError(f"bad labels in {line!r}")
            labels[label.group(1)] = re.sub(r"\\[\\\"n]", lambda m: _UNESCAPE[m.group(0)], label.group(2))
            pos = label.end()
        samples.append(Sample(name, labels, float(value)))
    return samples


LabelMatch = Mapping[str, str | Collection[str]]


def matching(samples: Sequence[Sample], name: str, labels: LabelMatch | None = None) -> list[Sample]:
    """The samples called ``name`` whose labels match: a string must be equal, a collection must
    contain the label's value."""
    wanted = labels or {}

    def ok(sample: Sample) -> bool:
        for key, want in wanted.items():
            have = sample.labels.get(key)
            if have is None or (have != want if isinstance(want, str) else have not in want):
                return False
        return True

    return [s for s in samples if s.name == name and ok(s)]


def sum_family(samples: Sequence[Sample], name: str, labels: LabelMatch | None = None) -> float:
    """The sum of the matching samples of ``name`` (0.0 when none match)."""
    return sum(s.value for s in matching(samples, name, labels))


# ---- waiting on conditions -----------------------------------------------------------------------


async def poll_until(
    predicate: Callable[[], Awaitable[bool]], timeout_s: float, what: str, interval_s: float = 0.1
) -> None:
    """Evaluate ``predicate`` until it is true; raise :class:`GateError` naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not await predicate():
        if time.monotonic() >= deadline:
            raise GateError(f"timed out after {timeout_s:g} s waiting for {what}")
        await asyncio.sleep(interval_s)


# ---- the client ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Submitted:
    """The answer to ``POST /v1/tasks``; ``sent_s`` is ``time.monotonic()`` just before the request."""

    status: int
    body: JsonObject
    sent_s: float

    @property
    def task_id(self) -> str:
        return get_str(self.body, "task_id")


class ApiClient:
    """The public API of one stack. An async context manager; ``aclose()`` is idempotent."""

    def __init__(self, base_url: str, token: str, request_timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=request_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ApiClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers=self._headers)
        return self._session

    async def get_json(self, path: str, ok: Collection[int] = (200,)) -> object:
        async with self.session.get(self.base_url + path) as resp:
            text = await resp.text()
            if resp.status not in ok:
                raise ApiError("GET", path, resp.status, text)
            try:
                return json.loads(text)
            except ValueError as exc:
                raise ProtocolError(f"GET {path} did not answer JSON: {text[:200]!r}") from exc

    async def post_json(self, path: str, body: Mapping[str, object]) -> tuple[int, JsonObject]:
        """POST ``body``; returns the status and the JSON object answered (``{}`` when not JSON)."""
        async with self.session.post(self.base_url + path, json=body) as resp:
            text = await resp.text()
        try:
            answer = json.loads(text) if text else {}
        except ValueError:
            answer = {}
        return resp.status, answer if isinstance(answer, dict) else {"answer": answer}

    async def readyz(self) -> int:
        """The status of ``GET /readyz`` (0 when nothing answers)."""
        try:
            async with self.session.get(self.base_url + "/readyz") as resp:
                return resp.status
        except (aiohttp.ClientError, TimeoutError):
            return 0

    async def submit(self, body: Mapping[str, object]) -> Submitted:
        sent_s = time.monotonic()
        status, answer = await self.post_json("/v1/tasks", body)
        return Submitted(status, answer, sent_s)

    async def stream(self, task_id: str, timeout_s: float = 300.0) -> list[Frame]:
        """All frames of a task, from ``started`` to the terminal frame (replayed and then live)."""
        path = f"/v1/tasks/{task_id}/stream"
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with self.session.get(self.base_url + path, timeout=timeout) as resp:
            if resp.status != 200:
                raise ApiError("GET", path, resp.status, await resp.text())
            return await read_frames(resp.content)

    async def replicasets(self) -> list[JsonObject]:
        """``GET /v1/replicasets`` (SPEC §2.3)."""
        return as_objects(await self.get_json("/v1/replicasets"), "GET /v1/replicasets")

    async def pools(self) -> list[JsonObject]:
        """``GET /v1/pools``: PoolHealth for every pool (SPEC §2.3)."""
        return as_objects(await self.get_json("/v1/pools"), "GET /v1/pools")

    async def metrics(self) -> list[Sample]:
        path = "/metrics"
        async with self.session.get(self.base_url + path) as resp:
            text = await resp.text()
            if resp.status != 200:
                raise ApiError("GET", path, resp.status, text)
        return parse_metrics(text)

    async def post_artifact(
        self,
        kind: str,
        content: Mapping[str, object],
        tags: Sequence[str] = (),
        metadata: Mapping[str, object] | None = None,
    ) -> tuple[int, JsonObject]:
        """``POST /v1/artifacts``; the caller decides what a status other than 201/200 means."""
        body: dict[str, object] = {"kind": kind, "content": content, "tags": list(tags)}
        if metadata is not None:
            body["metadata"] = metadata
        return await self.post_json("/v1/artifacts", body)

    async def get_artifact(self, artifact_id: str) -> JsonObject:
        """``GET /v1/artifacts/{id}``: the Artifact (ArtifactRef, ``content`` and ``metadata``)."""
        path = f"/v1/artifacts/{artifact_id}"
        return as_object(await self.get_json(path), f"GET {path}")
