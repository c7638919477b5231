"""py-spy profiles of the stack's processes under a benchmark's load (``python -m bench.run --profile``).

While a labelled window is open, ``py-spy record --nonblocking --format raw`` samples each named process
(idle threads are not sampled); on close py-spy is stopped with SIGINT, which makes it write its folded
stacks. The Markdown report gives, per process and window, the top frames by own samples (where the
CPU is spent) and by inclusive samples (which callers it is spent under).

``--nonblocking`` never pauses the target, but the sampler itself takes CPU: profile in a run of its
own, not in the run whose figures are reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .cpu import Role, process_table

TOP = 15
RATE_HZ = 100
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(path: str) -> str:
    """A frame's file relative to the repository or site-packages, to keep the tables narrow."""
    for marker in ("site-packages/", "/services/", "/libs/", "/bench/", "/tests/"):
        if marker in path:
            kept = path.split(marker, 1)[1]
            return kept if marker == "site-packages/" else marker.strip("/") + "/" + kept
    return path.rsplit("/", 1)[-1] if path.startswith("/") else path


def frame_name(frame: str) -> str:
    """``func (file:line)`` → ``func (short file)``: samples of one function on different lines add up."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    return f"{match['func']} ({_short(match['file'])})"


@dataclass(slots=True)
class Folded:
    """Folded stacks (py-spy's ``--format raw``): samples by own frame and by inclusive frame."""

    samples: int = 0
    own: Counter[str] = field(default_factory=Counter)
    inclusive: Counter[str] = field(default_factory=Counter)

    @classmethod
    def parse(cls, lines: Iterable[str]) -> Folded:
        out = cls()
        for line in lines:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            frames = [frame_name(f) for f in stack.split(";") if f.strip()]
            if not frames:
                continue
            out.samples += n
            out.own[frames[-1]] += n
            for name in set(frames):  # recursion counts a sample once
                out.inclusive[name] += n
        return out

    def merge(self, other: Folded) -> None:
        self.samples += other.samples
        self.own.update(other.own)
        self.inclusive.update(other.inclusive)

    def table(self, top: int = TOP) -> str:
        if not self.samples:
            return "(no samples: the process was idle or could not be read)"
        rows = [
            "| # | own % | frame (own samples) | incl. % | frame (inclusive samples) |",
            "|---|---|---|---|---|",
        ]
        own = self.own.most_common(top)
        incl = self.inclusive.most_common(top)
        for i in range(max(len(own), len(incl))):
            o = own[i] if i < len(own) else ("", 0)
            c = incl[i] if i < len(incl) else ("", 0)
            rows.append(
                f"| {i + 1} | {100 * o[1] / self.samples:.1f} | `{o[0]}` | "
                f"{100 * c[1] / self.samples:.1f} | `{c[0]}` |"
            )
        return "\n".join(rows)


def _py_spy() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")
    return str(beside) if beside.exists() else shutil.which("py-spy")


@dataclass(slots=True)
class Section:
    label: str
    process: str
    pid: int
    folded: Folded
    note: str = ""


class Profiles:
    """Profiles taken during a run, written as one Markdown file."""

    def __init__(self, out: Path, workdir: Path, processes: tuple[str, ...]) -> None:
        self.out = out
        self.workdir = workdir
        self.processes = processes  # role names to sample
        self.sections: list[Section] = []
        self.binary = _py_spy()

    @contextlib.asynccontextmanager
    async def window(self, label: str, roles: Iterable[Role]) -> AsyncIterator[None]:
        """Sample every process of the wanted roles while the body runs."""
        if self.binary is None:
            self.sections.append(Section(label, "-", 0, Folded(), "py-spy not found (pip install py-spy)"))
            yield
            return
        table = process_table()
        targets = [(r.name, pid) for r in roles if r.name in self.processes for pid in r.pids(table)]
        self.workdir.mkdir(parents=True, exist_ok=True)
        running: list[tuple[str, int, Path, subprocess.Popen[bytes]]] = []
        for name, pid in targets:
            raw = self.workdir / (re.sub(r"\W+", "-", f"{label}-{name}-{pid}") + ".txt")
            running.append((name, pid, raw, self._start(self.binary, pid, raw)))
        await self._attached([raw.with_suffix(".log") for _, _, raw, _ in running])
        try:
            yield
        finally:
            for _, _, _, proc in running:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            for name, pid, raw, proc in running:
                try:
                    await asyncio.to_thread(proc.wait, 30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                note = "" if raw.exists() else f"py-spy wrote nothing (exit {proc.returncode})"
                lines = raw.read_text().splitlines() if raw.exists() else []
                self._add(Section(label, name, pid, Folded.parse(lines), note))

    @staticmethod
    def _start(binary: str, pid: int, raw: Path) -> subprocess.Popen[bytes]:
        """``py-spy record`` of ``pid`` into ``raw``, its own output beside it (``.log``)."""
        argv = [binary, "record", "--nonblocking", "--format", "raw", "-r", str(RATE_HZ)]
        argv += ["-o", str(raw), "--pid", str(pid)]
        with raw.with_suffix(".log").open("wb") as log:
            return subprocess.Popen(argv, stdout=log, stderr=log)

    @staticmethod
    async def _attached(logs: list[Path], timeout_s: float = 10.0) -> None:
        """Wait (bounded) until every py-spy says it is sampling, so the window's start is covered."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while asyncio.get_running_loop().time() < deadline:
            texts = [log.read_text(errors="replace") if log.exists() else "" for log in logs]
            if all("Sampling process" in t or "Error" in t for t in texts):
                return
            await asyncio.sleep(0.05)

    def _add(self, section: Section) -> None:
        """Windows with the same label (the rounds of one case) add up per process."""
        for s in self.sections:
            if (s.label, s.process, s.pid) == (section.label, section.process, section.pid):
                s.folded.merge(section.folded)
                s.note = s.note or section.note
                return
        self.sections.append(section)

    def markdown(self, title: str) -> str:
        parts = [
            f"# {title}",
            "",
            f"py-spy {RATE_HZ} Hz, `--nonblocking`, idle threads not sampled. Own = the sample's innermost "
            "frame (where the CPU went); inclusive = the frame is anywhere on the stack. Frames are "
            "merged across lines of one function.",
        ]
        for s in self.sections:
            parts += ["", f"## {s.label}: {s.process} (pid {s.pid}, {s.folded.samples} samples)", ""]
            parts.append(s.note or s.folded.table())
        return "\n".join(parts) + "\n"

    def write(self, title: str) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(self.markdown(title))


ACTIVE: Profiles | None = None  # set by ``bench.run --profile``; the benchmarks open windows on it


@contextlib.asynccontextmanager
async def window(label: str, roles: Iterable[Role]) -> AsyncIterator[None]:
    """A profiling window when ``--profile`` is on, else nothing."""
    if ACTIVE is None:
        yield
        return
    async with ACTIVE.window(label, roles):
        yield
