"""The mock engine's knobs (SPEC §8 "Mock engine"): launch flags and their runtime twins.

Every knob is a launch flag and, except the launch-only ones, a key accepted by ``POST /mock/control``
(``-`` and ``_`` are interchangeable there). llama-server's own flags that the pool manager passes are
accepted too, so a pool can launch the mock with a llama-server command line.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Final

MOCK_VERSION: Final = "0.1.0"
FAIL_CODES: Final = ("500", "503", "oom")
PRELOAD_FAILS: Final = ("exit", "oom", "health")
LAUNCH_ONLY: Final = frozenset({"host", "port", "model", "embedding"})


@dataclass(slots=True)
class Knobs:
    port: int
    host: str = "127.0.0.1"
    model: str | None = None
    alias: str | None = None
    ctx: int = 4096
    parallel: int = 1
    token_delay_ms: float = 5.0
    first_token_delay_ms: float = 0.0
    fail_after_tokens: int | None = None
    fail_code: str = "500"
    crash_after_tokens: int | None = None
    crash_exit_code: int = 134
    hang_after_tokens: int | None = None
    start_delay_ms: float = 0.0
    preload_fail: str | None = None
    vram_used_bytes: int = 0
    vram_total_bytes: int = 0
    gpu_util: float = 0.0
    eos_after: int | None = None
    version: str = MOCK_VERSION
    embedding: bool = False
    """``--embedding``/``--embeddings``: serve ``/v1/embeddings`` (else 501, like llama-server)."""
    embedding_dim: int = 64
    chat_usage: bool = True
    """False: chat answers carry no ``usage`` (nor the usage chunk), to test a client's own count."""
    log_requests: bool = False
    """``--log-requests``: log each completion's sampling settings (never its prompt) on stderr, so a
    test can see what the pool manager sent."""

    @property
    def build_info(self) -> str:
        """``mock-<version>``; a version that already starts with ``mock`` is used as given."""
        return self.version if self.version.startswith("mock") else f"mock-{self.version}"

    @property
    def n_ctx_slot(self) -> int:
        """llama-server splits ``-c`` evenly across slots (no unified KV when ``--parallel`` is given)."""
        return max(1, self.ctx // self.parallel)

    def as_json(self) -> dict[str, object]:
        return asdict(self)


class ControlError(ValueError):
    """A ``POST /mock/control`` body that names an unknown key or carries a bad value."""


def _non_negative_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ControlError("expected a non-negative integer")
    return value


def _positive_int(value: object) -> int:
    number = _non_negative_int(value)
    if number == 0:
        raise ControlError("expected a positive integer")
    return number


def _non_negative_float(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ControlError("expected a non-negative number")
    return float(value)


def _any_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ControlError("expected an integer")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ControlError("expected true or false")
    return value


def _string(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ControlError("expected a non-empty string")
    return value


def _fail_code(value: object) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if text not in FAIL_CODES:
        raise ControlError(f"expected one of {', '.join(FAIL_CODES)}")
    return str(text)


def _preload_fail(value: object) -> str:
    # "exit" only means something while loading; at runtime a crash knob is the tool.
    if value != "health":
        raise ControlError("only 'health' (or null) can be set at runtime")
    return "health"


_Converter = Callable[[object], object]

# key → (converter, nullable)
_CONTROL: Final[dict[str, tuple[_Converter, bool]]] = {
    "alias": (_string, True),
    "ctx": (_positive_int, False),
    "parallel": (_positive_int, False),
    "token_delay_ms": (_non_negative_float, False),
    "first_token_delay_ms": (_non_negative_float, False),
    "fail_after_tokens": (_non_negative_int, True),
    "fail_code": (_fail_code, False),
    "crash_after_tokens": (_non_negative_int, True),
    "crash_exit_code": (_any_int, False),
    "hang_after_tokens": (_non_negative_int, True),
    "start_delay_ms": (_non_negative_float, False),
    "preload_fail": (_preload_fail, True),
    "vram_used_bytes": (_non_negative_int, False),
    "vram_total_bytes": (_non_negative_int, False),
    "gpu_util": (_non_negative_float, False),
    "eos_after": (_non_negative_int, True),
    "version": (_string, False),
    "embedding_dim": (_positive_int, False),
    "chat_usage": (_boolean, False),
}


def validate_control(body: Mapping[str, object]) -> dict[str, object]:
    """Check a control body as a whole and return ``{knob: value}``; nothing is applied on error."""
    changes: dict[str, object] = {}
    for raw_key, value in body.items():
        key = raw_key.replace("-", "_")
        if key in LAUNCH_ONLY:
            raise ControlError(f"{raw_key}: launch-only knob")
        spec = _CONTROL.get(key)
        if spec is None:
            raise ControlError(f"{raw_key}: unknown knob")
        convert, nullable = spec
        if value is None:
            if not nullable:
                raise ControlError(f"{raw_key}: cannot be null")
            changes[key] = None
            continue
        try:
            changes[key] = convert(value)
        except ControlError as exc:
            raise ControlError(f"{raw_key}: {exc}") from None
    return changes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llorch-mock-engine", description="A llama-server look-alike for tests.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="required")
    p.add_argument("-m", "--model", default=None)
    p.add_argument("-a", "--alias", default=None)
    p.add_argument("-c", "--ctx", "--ctx-size", dest="ctx", type=int, default=4096)
    p.add_argument("-np", "--parallel", type=int, default=1)
    p.add_argument("--token-delay-ms", type=float, default=5.0)
    p.add_argument("--first-token-delay-ms", type=float, default=0.0)
    p.add_argument("--fail-after-tokens", type=int, default=None)
    p.add_argument("--fail-code", choices=FAIL_CODES, default="500")
    p.add_argument("--crash-after-tokens", type=int, default=None)
    p.add_argument("--crash-exit-code", type=int, default=134)
    p.add_argument("--hang-after-tokens", type=int, default=None)
    p.add_argument("--start-delay-ms", type=float, default=0.0)
    p.add_argument("--preload-fail", choices=PRELOAD_FAILS, default=None)
    p.add_argument("--vram-used-bytes", type=int, default=0)
    p.add_argument("--vram-total-bytes", type=int, default=0)
    p.add_argument("--gpu-util", type=float, default=0.0)
    p.add_argument("--eos-after", type=int, default=None)
    p.add_argument("--embedding", "--embeddings", action="store_true")
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--no-chat-usage", dest="chat_usage", action="store_false")
    p.add_argument("--log-requests", action="store_true")
    # With a value it overrides build_info; bare `--version` prints it and exits, like llama-server.
    p.add_argument("--version", nargs="?", const="", default=MOCK_VERSION)
    # llama-server flags the pool manager may pass; accepted and ignored.
    p.add_argument("-t", "--threads", type=int, default=None)
    p.add_argument("-ngl", "--n-gpu-layers", "--gpu-layers", dest="n_gpu_layers", default=None)
    p.add_argument("-ts", "--tensor-split", dest="tensor_split", default=None)
    p.add_argument("-s", "--seed", dest="seed", type=int, default=None)
    p.add_argument("--metrics", action="store_true")
    p.add_argument("--no-webui", action="store_true")
    p.add_argument("--no-cont-batching", "-nocb", action="store_true")
    p.add_argument("--cont-batching", "-cb", action="store_true")
    p.add_argument("--slot-save-path", default=None)
    p.add_argument("--jinja", action="store_true")  # the mock always renders its built-in ChatML
    return p


def parse_args(argv: Sequence[str] | None = None) -> Knobs | str:
    """Parse the command line; returns the ``--version`` line instead when asked only for it."""
    parser = _parser()
    ns = parser.parse_args(argv)
    if ns.version == "":
        return f"version: {Knobs(port=0).build_info} (build mock, commit unknown)"
    if ns.port is None:
        parser.error("--port is required")
    knobs = Knobs(
        port=ns.port,
        host=ns.host,
        model=ns.model,
        alias=ns.alias,
        ctx=ns.ctx,
        parallel=ns.parallel,
        token_delay_ms=ns.token_delay_ms,
        first_token_delay_ms=ns.first_token_delay_ms,
        fail_after_tokens=ns.fail_after_tokens,
        fail_code=ns.fail_code,
        crash_after_tokens=ns.crash_after_tokens,
        crash_exit_code=ns.crash_exit_code,
        hang_after_tokens=ns.hang_after_tokens,
        start_delay_ms=ns.start_delay_ms,
        preload_fail=ns.preload_fail,
        vram_used_bytes=ns.vram_used_bytes,
        vram_total_bytes=ns.vram_total_bytes,
        gpu_util=ns.gpu_util,
        eos_after=ns.eos_after,
        version=ns.version,
        embedding=ns.embedding,
        embedding_dim=ns.embedding_dim,
        chat_usage=ns.chat_usage,
        log_requests=ns.log_requests,
    )
    if knobs.parallel < 1 or knobs.ctx < 1 or knobs.embedding_dim < 1:
        parser.error("--parallel, --ctx and --embedding-dim must be positive")
    return knobs
