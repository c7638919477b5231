"""What the rich views of the client commands (`llorch status`, `submit`, `tasks`) share: a console that
stays readable in a pipe, typed reads of the API's JSON, and small cells (ages, byte counts, bars).

Every value from the API is rendered as :class:`rich.text.Text`, never as markup, so a model id or an
error message with brackets prints as it is.
"""

from __future__ import annotations

import sys
from typing import Final

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .api import JsonObject

PIPE_WIDTH: Final = 200
"""Columns of a console that is not a terminal: wide enough that ids are never cut in a pipe or log."""
BAR_CELLS: Final = 20
FULL: Final = "█"
EMPTY: Final = "░"


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr): a terminal's width and colours, else plain and wide."""
    found = Console(file=sys.stderr if stderr else sys.stdout, highlight=False)
    if not found.is_terminal:
        found.width = PIPE_WIDTH
    return found


def text(value: object, empty: str = "-") -> Text:
    """A cell: the value as plain text, ``empty`` for null, "" or []."""
    return Text(plain(value, empty))


def plain(value: object, empty: str = "-") -> str:
    if value is None or value in ("", []):
        return empty
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return str(value)


def integer(value: object) -> int:
    """An int field, 0 when absent or not an int (bools are not ints here)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def objects(value: object) -> list[JsonObject]:
    """The objects of a JSON list; anything else is an empty list."""
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def obj(value: object) -> JsonObject:
    return value if isinstance(value, dict) else {}


def duration(ms: int) -> str:
    """A short, human span: ``850 ms``, ``12.3 s``, ``4 min 05 s``, ``2 h 03 min``."""
    ms = max(0, ms)
    if ms < 1000:
        return f"{ms} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    seconds = ms // 1000
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def ago(at_ms: object, now_ms: int) -> str:
    """How long before ``now_ms`` a timestamp was (``-`` for none)."""
    if not isinstance(at_ms, int) or isinstance(at_ms, bool) or at_ms <= 0:
        return "-"
    return f"{duration(now_ms - at_ms)} ago"


def gib(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f}"


def usage_bar(used: int, total: int, cells: int = BAR_CELLS) -> Text:
    """``█████░░░ 3.1/8.0 GiB``: green below 70 %, yellow below 90 %, red above; ``-`` without a total."""
    if total <= 0:
        return Text("-")
    ratio = min(1.0, max(0.0, used / total))
    filled = round(ratio * cells)
    style = "green" if ratio < 0.7 else "yellow" if ratio < 0.9 else "red"
    bar = Text()
    bar.append(FULL * filled, style=style)
    bar.append(EMPTY * (cells - filled), style="dim")
    bar.append(f" {gib(used)}/{gib(total)} GiB")
    return bar


def table(title: str | None, headers: list[str]) -> Table:
    """A compact table with a left-aligned title; only its last column wraps (ids are never cut)."""
    found = Table(
        title=title, title_justify="left", title_style="bold", header_style="bold", box=None, pad_edge=False
    )
    for i, header in enumerate(headers):
        found.add_column(header, no_wrap=i < len(headers) - 1)
    return found
