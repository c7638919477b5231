"""``llorch tasks``: the recent tasks, newest first, from ``GET /v1/tasks`` (never their prompts)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Final

from rich.table import Table
from rich.text import Text

from . import ops, terminal
from .api import JsonObject
from .terminal import ago, integer, text

STATE_STYLES: Final = {"succeeded": "green", "running": "cyan", "queued": "yellow", "canceled": "dim"}


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tasks = sub.add_parser("tasks", help="recent tasks, newest first")
    tasks.add_argument("--limit", type=int, default=None, help="how many (the gateway's default: 20)")
    tasks.add_argument("--json", action="store_true", help="print the API's JSON")
    ops.add_target_options(tasks)
    tasks.set_defaults(run=tasks_cmd, prog="llorch tasks")


def tasks_cmd(args: argparse.Namespace) -> int:
    query = {"limit": str(args.limit)} if args.limit is not None else None
    api = ops.api_of(args)
    if args.json:
        print(json.dumps(api.obj("GET", "/v1/tasks", query=query), indent=2))
        return 0
    tasks = api.objects("/v1/tasks", key="tasks", query=query)
    terminal.console().print(tasks_table(tasks, int(time.time() * 1000)))
    return 0


def tasks_table(tasks: list[JsonObject], now_ms: int) -> Table:
    """One row a task; the created column is relative to ``now_ms``."""
    table = terminal.table(None, ["TASK", "MODEL", "STATE", "PRIORITY", "CREATED", "TOKENS", "CODE"])
    for task in tasks:
        state = terminal.plain(task.get("state"))
        code = task.get("code")
        table.add_row(
            text(task.get("task_id")),
            text(task.get("model")),
            Text(state, style="red" if code else STATE_STYLES.get(state, "")),
            text(task.get("priority")),
            Text(ago(task.get("created_ms"), now_ms)),
            Text(str(integer(task.get("tokens_out")))),
            Text(terminal.plain(code), style="red" if code else ""),
        )
    return table
