"""``llorch status``: the stack at a glance — pools, GPUs with their VRAM, the queue of each replica set,
running tasks and recent errors — from ``GET /v1/status``.

Live (the default) it follows ``GET /v1/status/stream`` and redraws on a terminal until Ctrl-C; a
gateway without the stream route is polled instead. Elsewhere (a pipe, a log) each snapshot that differs
from the one before is printed once. ``--once`` prints one snapshot, ``--json`` the JSON of one.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Final

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from . import ops, terminal
from .api import Api, ApiError, JsonObject
from .terminal import ago, duration, integer, objects, text, usage_bar

STATUS_PATH: Final = "/v1/status"
STREAM_PATH: Final = "/v1/status/stream"
POLL_S: Final = 1.0
"""The polling period when the gateway has no stream route (the stream sends about once a second)."""


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser("status", help="pools, GPUs, queues and running tasks; live until Ctrl-C")
    status.add_argument("--once", action="store_true", help="print one snapshot and exit")
    status.add_argument("--json", action="store_true", help="print the JSON of one snapshot and exit")
    ops.add_target_options(status)
    status.set_defaults(run=status_cmd, prog="llorch status")


def status_cmd(args: argparse.Namespace) -> int:
    api = ops.api_of(args)
    if args.json:
        print(json.dumps(api.obj("GET", STATUS_PATH), indent=2))
        return 0
    out = terminal.console()
    if args.once:
        out.print(render(api.obj("GET", STATUS_PATH)))
        return 0
    try:
        follow(snapshots(api), out)
    except KeyboardInterrupt:
        return 0  # the way a live view is left
    raise ApiError("STREAM_ENDED", f"the gateway at {api.target.url} ended the status stream")


def snapshots(api: Api, sleep: Callable[[float], None] = time.sleep) -> Iterator[JsonObject]:
    """The stream's snapshots; from a gateway without the stream route, ``GET /v1/status`` polled."""
    try:
        for frame in api.stream(STREAM_PATH):
            if frame.event == "status":
                yield _snapshot(frame.data)
        return
    except ApiError as exc:
        if exc.status != 404:
            raise
    while True:
        yield api.obj("GET", STATUS_PATH)
        sleep(POLL_S)


def _snapshot(data: str) -> JsonObject:
    try:
        found = json.loads(data)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise ApiError("BAD_ANSWER", "a status frame did not hold a JSON object")
    return found


def follow(snapshots: Iterator[JsonObject], out: Console) -> None:
    """Show each snapshot: redrawn in place on a terminal, else printed when it changed."""
    if out.is_terminal:
        with Live(console=out, auto_refresh=False) as view:
            for snapshot in snapshots:
                view.update(render(snapshot), refresh=True)
        return
    shown: JsonObject | None = None
    for snapshot in snapshots:
        content = {k: v for k, v in snapshot.items() if k != "generated_at_ms"}
        if content != shown:
            out.print(render(snapshot))
            out.print()
            shown = content


def render(snapshot: JsonObject) -> Group:
    """One snapshot as a header and a table per section; times are relative to its ``generated_at_ms``."""
    now_ms = integer(snapshot.get("generated_at_ms"))
    at = datetime.fromtimestamp(now_ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if now_ms else "?"
    header = Text(f"llama-orch {terminal.plain(snapshot.get('version'), '?')}", style="bold")
    header.append(f"  ·  {at}", style="dim")
    parts: list[RenderableType] = [header]
    for section in (pools_table, gpus_table, queues_table, running_table, errors_table):
        parts += ["", section(snapshot, now_ms)]
    return Group(*parts)


def _or_none(table: Table, rows: int, what: str) -> RenderableType:
    """The table, or its title and a line saying there is nothing (rather than a bare header)."""
    if rows:
        return table
    return Group(Text(str(table.title), style="bold"), Text(f"  no {what}", style="dim"))


def pools_table(snapshot: JsonObject, now_ms: int) -> RenderableType:
    pools = objects(snapshot.get("pools"))
    table = terminal.table(
        "Pools", ["POOL", "STATE", "MODEL", "ENGINE", "REPLICAS", "SLOTS FREE", "RUNNING", "LAST ERROR"]
    )
    for pool in pools:
        replicas = objects(pool.get("replicas"))
        ready = sum(1 for r in replicas if r.get("state") == "Ready")
        metrics = terminal.obj(pool.get("metrics"))
        error = terminal.obj(pool.get("last_error"))
        table.add_row(
            text(pool.get("pool_id")),
            Text(terminal.plain(pool.get("state")), style=_state_style(pool.get("state"))),
            text(pool.get("model_ref")),
            text(pool.get("engine")),
            Text(f"{ready}/{len(replicas)}"),
            Text(f"{integer(metrics.get('slots_free'))}/{integer(metrics.get('slots_total'))}"),
            Text(str(integer(metrics.get("tasks_running")))),
            Text(f"{error.get('code')}: {error.get('message')}", style="red") if error else Text("-"),
        )
    return _or_none(table, len(pools), "pools")


def _state_style(state: object) -> str:
    if state == "Ready":
        return "green"
    if state in ("Draining", "Drained", "Reloading", "Preloading", "Starting"):
        return "yellow"
    return "red"


def gpus_table(snapshot: JsonObject, now_ms: int) -> RenderableType:
    gpus = objects(snapshot.get("gpus"))
    table = terminal.table("GPUs", ["DEVICE", "NAME", "VRAM", "UTIL", "POOLS"])
    for gpu in gpus:
        utilization = gpu.get("utilization")
        table.add_row(
            text(gpu.get("device")),
            text(gpu.get("name")),
            usage_bar(integer(gpu.get("vram_used_bytes")), integer(gpu.get("vram_total_bytes"))),
            Text(f"{utilization * 100:.0f} %" if isinstance(utilization, int | float) else "-"),
            text(gpu.get("pools")),
        )
    return _or_none(table, len(gpus), "GPUs")


def queues_table(snapshot: JsonObject, now_ms: int) -> RenderableType:
    sets = objects(snapshot.get("replica_sets"))
    table = terminal.table(
        "Queues", ["REPLICA SET", "MODEL", "POOLS", "INTERACTIVE", "BATCH", "CAPACITY", "SLOTS FREE", "LOAD"]
    )
    for rs in sets:
        depth = terminal.obj(rs.get("queue_depth"))
        load = rs.get("load")
        table.add_row(
            text(rs.get("id")),
            text(rs.get("model_id")),
            text(rs.get("pools")),
            Text(str(integer(depth.get("interactive")))),
            Text(str(integer(depth.get("batch")))),
            Text(str(integer(rs.get("queue_capacity")))),
            Text(f"{integer(rs.get('slots_free'))}/{integer(rs.get('slots_total'))}"),
            Text(f"{load * 100:.0f} %" if isinstance(load, int | float) else "-"),
        )
    return _or_none(table, len(sets), "replica sets")


def running_table(snapshot: JsonObject, now_ms: int) -> RenderableType:
    running = objects(snapshot.get("running"))
    table = terminal.table("Running", ["TASK", "MODEL", "POOL", "REPLICA", "PRIORITY", "TOKENS", "FOR"])
    for task in running:
        started = integer(task.get("started_ms"))
        table.add_row(
            text(task.get("task_id")),
            text(task.get("model")),
            text(task.get("pool_id")),
            text(task.get("replica_id")),
            text(task.get("priority")),
            Text(str(integer(task.get("tokens_out")))),
            Text(duration(now_ms - started) if started and now_ms else "-"),
        )
    return _or_none(table, len(running), "running tasks")


def errors_table(snapshot: JsonObject, now_ms: int) -> RenderableType:
    errors = objects(snapshot.get("recent_errors"))
    table = terminal.table("Recent errors", ["WHEN", "TASK", "CODE", "MESSAGE"])
    for error in errors:
        table.add_row(
            Text(ago(error.get("at_ms"), now_ms)),
            text(error.get("task_id")),
            Text(terminal.plain(error.get("code")), style="red"),
            text(error.get("message")),
        )
    return _or_none(table, len(errors), "recent errors")
