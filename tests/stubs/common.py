"""What the engine stubs share: fault knobs, deterministic words, counters, ``/stub/*`` routes, serving.

Every knob is a launch flag (``--stub-<name>``, so it never collides with a real engine flag) and a key
of ``POST /stub/control`` (the same name with ``_``). ``GET /stub/control`` returns the knobs,
``GET /stub/stats`` returns ``{requests_total, aborted_total, active}`` where ``aborted_total`` counts
generation requests whose client went away before the answer was complete, and ``GET
/stub/last-request`` returns the last generation request body as received.

Output is deterministic: token k of a completion is ``" " + VOCAB[b_k]`` with ``b`` the bytes of
``sha256(f"{prompt}|{seed}|{block}")`` (:func:`completion_text` is what a client should see).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Final

from aiohttp import web

log = logging.getLogger("stub")

# 64 words, so that every byte of a digest picks one uniformly.
VOCAB: Final[tuple[str, ...]] = (
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "indigo",
    "violet",
    "black",
    "white",
    "grey",
    "north",
    "south",
    "east",
    "west",
    "spring",
    "summer",
    "autumn",
    "winter",
    "river",
    "mountain",
    "forest",
    "desert",
    "ocean",
    "island",
    "valley",
    "meadow",
    "copper",
    "silver",
    "gold",
    "iron",
    "stone",
    "glass",
    "paper",
    "cloth",
    "lamp",
    "bridge",
    "tower",
    "garden",
)
FAIL_KINDS: Final = ("error", "oom")
_SHUTDOWN_TIMEOUT_S: Final = 0.5


def words(prompt: str, seed: int) -> Iterator[str]:
    """The endless, deterministic token stream for one (prompt, seed)."""
    block = 0
    while True:
        for byte in hashlib.sha256(f"{prompt}|{seed}|{block}".encode()).digest():
            yield " " + VOCAB[byte % len(VOCAB)]
        block += 1


def completion_text(prompt: str, seed: int, n_tokens: int) -> str:
    stream = words(prompt, seed)
    return "".join(next(stream) for _ in range(n_tokens))


def prompt_tokens(prompt: str) -> int:
    """The stubs' prompt length: one token per 4 UTF-8 bytes, at least one."""
    return max(1, -(-len(prompt.encode()) // 4))


@dataclass(slots=True)
class Knobs:
    token_delay_ms: float = 1.0
    fail_after_tokens: int | None = None
    fail_kind: str = "error"
    crash_after_tokens: int | None = None
    crash_exit_code: int = 134
    start_delay_ms: float = 0.0
    eos_after: int | None = None
    version: str = "0.0.0"


def _non_negative_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError("expected a non-negative integer")
    return value


def _non_negative_number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError("expected a non-negative number")
    return float(value)


def _any_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("expected an integer")
    return value


def _fail_kind(value: object) -> str:
    if value not in FAIL_KINDS:
        raise ValueError(f"expected one of {', '.join(FAIL_KINDS)}")
    return str(value)


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    return value


# knob → (converter, nullable)
_CONTROL: Final[dict[str, tuple[Callable[[object], object], bool]]] = {
    "token_delay_ms": (_non_negative_number, False),
    "fail_after_tokens": (_non_negative_int, True),
    "fail_kind": (_fail_kind, False),
    "crash_after_tokens": (_non_negative_int, True),
    "crash_exit_code": (_any_int, False),
    "start_delay_ms": (_non_negative_number, False),
    "eos_after": (_non_negative_int, True),
    "version": (_text, False),
}


def validate_control(body: Mapping[str, object]) -> dict[str, object]:
    """Check a ``/stub/control`` body as a whole; nothing is applied when one key is wrong."""
    changes: dict[str, object] = {}
    for raw_key, value in body.items():
        key = raw_key.replace("-", "_")
        if key not in _CONTROL:
            raise ValueError(f"{raw_key}: unknown knob")
        convert, nullable = _CONTROL[key]
        if value is None and not nullable:
            raise ValueError(f"{raw_key}: cannot be null")
        try:
            changes[key] = None if value is None else convert(value)
        except ValueError as exc:
            raise ValueError(f"{raw_key}: {exc}") from None
    return changes


def add_knob_flags(parser: argparse.ArgumentParser, version: str) -> None:
    group = parser.add_argument_group("stub knobs (also POST /stub/control)")
    group.add_argument("--stub-token-delay-ms", type=float, default=1.0)
    group.add_argument("--stub-fail-after-tokens", type=int, default=None)
    group.add_argument("--stub-fail-kind", choices=FAIL_KINDS, default="error")
    group.add_argument("--stub-crash-after-tokens", type=int, default=None)
    group.add_argument("--stub-crash-exit-code", type=int, default=134)
    group.add_argument("--stub-start-delay-ms", type=float, default=0.0)
    group.add_argument("--stub-eos-after", type=int, default=None)
    group.add_argument("--stub-version", default=version)


def knobs_from(ns: argparse.Namespace) -> Knobs:
    return Knobs(
        token_delay_ms=ns.stub_token_delay_ms,
        fail_after_tokens=ns.stub_fail_after_tokens,
        fail_kind=ns.stub_fail_kind,
        crash_after_tokens=ns.stub_crash_after_tokens,
        crash_exit_code=ns.stub_crash_exit_code,
        start_delay_ms=ns.stub_start_delay_ms,
        eos_after=ns.stub_eos_after,
        version=ns.stub_version,
    )


def parse_flags(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse, accepting (and logging) flags of the real engine that the stub does not model."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ns, ignored = parser.parse_known_args(argv)
    if ignored:
        log.info("ignoring engine flags the stub does not model: %s", " ".join(ignored))
    return ns


class Fault(Exception):
    """The ``fail_after_tokens`` knob fired; each stub renders it in its engine's error shape."""

    def __init__(self, kind: str, after: int) -> None:
        if kind == "oom":
            message = f"CUDA out of memory. Tried to allocate 2.00 GiB (stub fault after {after} tokens)"
        else:
            message = f"stub fault after {after} tokens"
        super().__init__(message)
        self.message = message
        self.after = after


Emit = Callable[[str, bool], Awaitable[None]]


class StubState:
    """Knobs, the loading window and the counters; one per stub process, built in its ``main``."""

    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self.requests_total = 0
        self.aborted_total = 0
        self.active = 0
        self.last_request: object = None
        self._loading_until = time.monotonic() + knobs.start_delay_ms / 1000

    def loading(self) -> bool:
        return time.monotonic() < self._loading_until

    def apply(self, changes: Mapping[str, object]) -> None:
        for key, value in changes.items():
            setattr(self.knobs, key, value)
        if "start_delay_ms" in changes:
            self._loading_until = time.monotonic() + self.knobs.start_delay_ms / 1000

    def stats(self) -> dict[str, int]:
        return {
            "requests_total": self.requests_total,
            "aborted_total": self.aborted_total,
            "active": self.active,
        }

    @contextlib.asynccontextmanager
    async def track(self, body: object) -> AsyncIterator[None]:
        """Count one generation request; a client that leaves (cancel, reset) counts as aborted.

        A reset seen while writing is swallowed here: the handler then returns what it has.
        """
        self.requests_total += 1
        self.active += 1
        self.last_request = body
        try:
            yield
        except asyncio.CancelledError:
            self.aborted_total += 1
            raise
        except ConnectionResetError:
            self.aborted_total += 1
        finally:
            self.active -= 1

    async def produce(
        self, prompt: str, seed: int, limit: int, emit: Emit, ignore_eos: bool = False
    ) -> tuple[int, bool]:
        """Emit up to ``limit`` words as ``emit(word, last)``, ``last`` true for the one that reaches the
        limit; returns (count, stopped at EOS). Raises :class:`Fault`; a crash knob ends the process
        (``os._exit``) mid-stream."""
        stream = words(prompt, seed)
        count = 0
        while count < limit:
            knobs = self.knobs
            if not ignore_eos and knobs.eos_after is not None and count >= knobs.eos_after:
                return count, True
            if knobs.fail_after_tokens is not None and count >= knobs.fail_after_tokens:
                raise Fault(knobs.fail_kind, count)
            if knobs.crash_after_tokens is not None and count >= knobs.crash_after_tokens:
                log.error("crashing after %d tokens (crash_after_tokens)", count)
                os._exit(knobs.crash_exit_code)
            await asyncio.sleep(knobs.token_delay_ms / 1000)
            count += 1
            await emit(next(stream), count == limit)
        return count, False


STATE: Final = web.AppKey("stub_state", StubState)


async def _control_get(request: web.Request) -> web.Response:
    return json_response(asdict(request.app[STATE].knobs))


async def _control_post(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        body = json.loads(await request.read() or b"{}")
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object of knobs")
        changes = validate_control(body)
    except ValueError as exc:
        return json_response({"error": str(exc)}, status=400)
    state.apply(changes)
    return json_response(asdict(state.knobs))


async def _stats(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].stats())


async def _last_request(request: web.Request) -> web.Response:
    return json_response(request.app[STATE].last_request)


def new_app(
    state: StubState, middlewares: Iterable[Callable[..., Awaitable[web.StreamResponse]]] = ()
) -> web.Application:
    """An application with the ``/stub/*`` routes; the engine's own routes are added by the caller."""
    app = web.Application(middlewares=list(middlewares), client_max_size=64 * 1024 * 1024)
    app[STATE] = state
    app.router.add_get("/stub/control", _control_get)
    app.router.add_post("/stub/control", _control_post)
    app.router.add_get("/stub/stats", _stats)
    app.router.add_get("/stub/last-request", _last_request)
    return app


async def json_body(request: web.Request) -> dict[str, object] | None:
    """The request's JSON object, or None when it is not one."""
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def int_field(body: Mapping[str, object], key: str, default: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise ValueError(f"'{key}' must be an integer")
    return int(value)


def sse_stream(content_type: str = "text/event-stream") -> web.StreamResponse:
    return web.StreamResponse(headers={"Content-Type": content_type, "Cache-Control": "no-cache"})


Sample = tuple[Mapping[str, str], float]
Family = tuple[str, str, str, Iterable[Sample]]
"""``(name, type, help, samples)`` of one metric family."""


def prometheus_text(families: Iterable[Family]) -> str:
    """Prometheus text format from ``(name, type, help, [(labels, value)])``, names written as given."""
    lines: list[str] = []
    for name, kind, help_text, samples in families:
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            rendered = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{rendered}}} {value!r}" if rendered else f"{name} {value!r}")
    return "\n".join(lines) + "\n"


async def serve(sites: Sequence[tuple[web.Application, str, int]]) -> None:
    """Listen on every ``(app, host, port)`` until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runners: list[web.AppRunner] = []
    try:
        for app, host, port in sites:
            runner = web.AppRunner(
                app, handler_cancellation=True, access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT_S
            )
            await runner.setup()
            runners.append(runner)
            await web.TCPSite(runner, host, port, reuse_address=True).start()
            log.info("listening on http://%s:%d", host, port)
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def run(sites: Sequence[tuple[web.Application, str, int]]) -> None:
    asyncio.run(serve(sites))


def compact_json(payload: object) -> str:
    """JSON without spaces, as the engines' serializers (serde, pydantic) write it."""
    return json.dumps(payload, separators=(",", ":"))


def json_response(body: object, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=compact_json)
