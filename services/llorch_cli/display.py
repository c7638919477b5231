"""Plain-text output of the operator commands: aligned tables, a block redrawn in place while something
progresses, and a spinner. On a terminal the block and the spinner redraw; elsewhere (a pipe, a log)
each change is printed once, so logs stay short and readable."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final, TextIO, TypeVar

T = TypeVar("T")

SPIN_FRAMES: Final = "|/-\\"
SPIN_S: Final = 0.1


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, two spaces apart; the last column is not padded."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=False)]
    lines = []
    for row in (headers, *rows):
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


class LiveBlock:
    """A block of lines shown while an operation runs: redrawn in place on a terminal, else printed
    again only when it changed."""

    def __init__(self, out: TextIO | None = None) -> None:
        self.out = out or sys.stdout
        self.tty = self.out.isatty()
        self._shown: str | None = None
        self._lines = 0

    def show(self, text: str) -> None:
        if text == self._shown:
            return
        if self.tty and self._lines:
            self.out.write(f"\x1b[{self._lines}F\x1b[J")  # back to the block's first line, clear below
        self.out.write(text + "\n")
        self.out.flush()
        self._shown = text
        self._lines = text.count("\n") + 1


def spin(label: str, work: Callable[[], T], out: TextIO | None = None) -> T:
    """Run ``work`` in a thread while a spinner shows ``label`` and the elapsed seconds; its result or
    exception comes back here."""
    out = out or sys.stdout
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(work())
        except BaseException as exc:  # handed to the caller's thread, which re-raises it
            error.append(exc)

    thread = threading.Thread(target=run, name="llorch-cli-request", daemon=True)
    started = time.monotonic()
    thread.start()
    if out.isatty():
        for frame in itertools.cycle(SPIN_FRAMES):
            thread.join(SPIN_S)
            if not thread.is_alive():
                break
            out.write(f"\r{frame} {label} ({time.monotonic() - started:.0f} s)")
            out.flush()
        out.write("\r\x1b[K")
    else:
        print(f"{label} ...", file=out, flush=True)
        thread.join()
    if error:
        raise error[0]
    return result[0]
