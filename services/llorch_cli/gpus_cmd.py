"""``llorch gpus``: the GPU inventory the pool managers would see, as JSON (no stack needed); with
``--ledger``, the running stack's VRAM ledger from ``GET /v1/gpus`` (issue 13): a table per device with
its residents, their state and their memory (``--json``: the API's JSON)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Final

from rich.console import Group, RenderableType
from rich.text import Text

from llorch.config import ConfigError, TelemetryConfig, load_config
from llorch.gpu import open_probe

from . import ops, terminal
from .api import JsonObject
from .terminal import ago, gib, integer, objects, text, usage_bar

DEFAULT_STATE_DIR = Path("~/.local/state/llorch")
LEDGER_PATH: Final = "/v1/gpus"
STATE_STYLES: Final = {
    "busy": "cyan",
    "ready": "green",
    "idle": "green",
    "loading": "yellow",
    "draining": "yellow",
    "unloading": "yellow",
    "unloaded": "dim",
    "failed": "red",
}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    gpus_parser = sub.add_parser(
        "gpus",
        help="print the GPU inventory the configured probe sees, as JSON; "
        "--ledger: the running stack's VRAM ledger",
        description="Without --ledger: the GPU inventory the probe of --config's telemetry.gpu_provider "
        "sees (NVML without --config), as JSON; no stack needed. With --ledger: the running stack's "
        "VRAM ledger (GET /v1/gpus), a table per device with its residents; --json prints the API's JSON.",
    )
    gpus_parser.add_argument(
        "--ledger",
        action="store_true",
        help="ask the running stack (GET /v1/gpus): each device's residents and used, reserved, free bytes",
    )
    gpus_parser.add_argument("--json", action="store_true", help="with --ledger: print the API's JSON")
    ops.add_target_options(gpus_parser)
    gpus_parser.set_defaults(run=gpus_cmd, prog="llorch gpus")


def gpus_cmd(args: argparse.Namespace) -> int:
    if args.ledger:
        return ledger_cmd(args)
    if args.url is not None or args.token_file is not None or args.json:
        print("llorch gpus: --url, --token-file and --json go with --ledger", file=sys.stderr)
        return 2
    return gpus(Path(args.config) if args.config else None)


def gpus(cfg_path: Path | None) -> int:
    """Print ``{kind, reason, devices}`` for the config's ``telemetry.gpu_provider`` (NVML without a
    config): 0 when printed (also when there are no GPUs: ``reason`` says why), 2 on an invalid config."""
    if cfg_path is None:
        telemetry, state_dir = TelemetryConfig(), DEFAULT_STATE_DIR.expanduser()
    else:
        try:
            cfg = load_config(cfg_path)
        except ConfigError as exc:
            for error in exc.errors:
                print(error, file=sys.stderr)
            return 2
        telemetry, state_dir = cfg.telemetry, cfg.state_dir
    probe = open_probe(telemetry, state_dir)
    try:
        inventory = {
            "kind": probe.kind,
            "reason": probe.reason,
            "devices": [asdict(dev) for dev in probe.devices()],
        }
    finally:
        probe.close()
    print(json.dumps(inventory, indent=2))
    return 0


def ledger_cmd(args: argparse.Namespace) -> int:
    """``--ledger``: the stack's ledger, as tables or (``--json``) as the API answered it."""
    found = ops.api_of(args).obj("GET", LEDGER_PATH)
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    terminal.console().print(render_ledger(found, int(time.time() * 1000)))
    return 0


def render_ledger(ledger: JsonObject, now_ms: int) -> RenderableType:
    """A header line and a table per device; idle spans and load times are relative to ``now_ms``."""
    devices = objects(ledger.get("devices"))
    swap = Text(
        f"swap: a resident model's queued work goes first for up to "
        f"{terminal.duration(integer(ledger.get('max_swap_wait_ms')))}; a loaded model stays at least "
        f"{terminal.duration(integer(ledger.get('min_residency_ms')))}",
        style="dim",
    )
    if not devices:
        return Group(swap, Text("no devices in the ledger", style="dim"))
    parts: list[RenderableType] = [swap]
    for device in devices:
        parts += ["", device_view(device, now_ms)]
    return Group(*parts)


def device_view(device: JsonObject, now_ms: int) -> RenderableType:
    """One device: its memory (a bar of the used bytes, then reserved and free) and its residents."""
    label = terminal.plain(device.get("device"), "?")
    name = terminal.plain(device.get("name"), label)
    title = Text(f"Device {label}" if name == label else f"Device {label} · {name}", style="bold")
    memory = usage_bar(integer(device.get("used_bytes")), integer(device.get("total_bytes")))
    memory.append(
        f" used · {gib(integer(device.get('reserved_bytes')))} GiB reserved"
        f" · {gib(integer(device.get('free_bytes')))} GiB free"
    )
    residents = objects(device.get("residents"))
    if not residents:
        return Group(title, memory, Text("  no residents", style="dim"))
    table = terminal.table(
        None,
        ["POOL", "MODEL", "STATE", "RESIDENCY", "PINNED", "USED", "NEED", "RUNNING", "IDLE FOR", "LOADED"],
    )
    for resident in residents:
        state = terminal.plain(resident.get("state"))
        table.add_row(
            text(resident.get("pool_id")),
            text(resident.get("model")),
            Text(state, style=STATE_STYLES.get(state, "")),
            text(resident.get("residency")),
            Text("yes" if resident.get("pinned") is True else "no"),
            Text(_gib_or_dash(resident.get("used_bytes"))),
            Text(_gib_or_dash(resident.get("need_bytes"))),
            Text(str(integer(resident.get("running")))),
            Text(_idle_for(resident.get("idle_since_ms"), now_ms)),
            Text(ago(resident.get("loaded_at_ms"), now_ms)),
        )
    return Group(title, memory, table)


def _idle_for(since_ms: object, now_ms: int) -> str:
    since = integer(since_ms)
    return terminal.duration(now_ms - since) if since else "-"


def _gib_or_dash(value: object) -> str:
    n_bytes = integer(value)
    return f"{gib(n_bytes)} GiB" if n_bytes else "-"
