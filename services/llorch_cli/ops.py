"""What the operator commands (`llorch models`, `llorch pools`, `llorch down`) share: the options that
say where the gateway is, and one place that turns failures into one line on stderr and an exit code
(1 for an API or local failure, 2 for an invalid config, 130 for Ctrl-C), never a traceback."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from llorch.config import ConfigError

from .api import Api, ApiError, CliError, resolve_target

Command = Callable[[argparse.Namespace], int]

_CONTEXT_SKIP = frozenset({"code", "message", "retriable", "correlation_id"})


def add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="YAML config (default $LLORCH_CONFIG or ~/.config/llorch/config.yaml)"
    )
    parser.add_argument(
        "--url", default=None, help="the gateway, e.g. http://127.0.0.1:8080 (default: api.bind)"
    )
    parser.add_argument(
        "--token-file",
        default=None,
        help="a file holding the API token (default: api.tokens, $LLORCH_API_TOKEN, <state_dir>/api.token)",
    )


def seconds(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text} s: give more than 0 and at most 3600 seconds")
    return value


def api_of(args: argparse.Namespace, timeout_s: float | None = None) -> Api:
    target = resolve_target(args.config, args.url, args.token_file)
    return Api(target) if timeout_s is None else Api(target, timeout_s)


def error_lines(prog: str, exc: CliError) -> list[str]:
    """``<prog>: CODE: message``, then the envelope's list-valued context (e.g. verification errors)."""
    lines = [f"{prog}: {exc}"]
    if isinstance(exc, ApiError):
        for key, value in exc.body.items():
            if key in _CONTEXT_SKIP:
                continue
            if isinstance(value, list):
                lines.extend(f"  {key}: {item}" for item in value)
            elif isinstance(value, dict):
                if "code" in value:  # a nested error such as last_error
                    lines.append(f"  {key}: {value.get('code')}: {value.get('message', '')}")
            elif value is not None:
                lines.append(f"  {key}: {value}")
    return lines


def run(prog: str, command: Command, args: argparse.Namespace) -> int:
    try:
        return command(args)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return 2
    except CliError as exc:
        print("\n".join(error_lines(prog, exc)), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        return 130
