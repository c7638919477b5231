"""``llorch submit MODEL PROMPT``: admit a task (``POST /v1/tasks``) and follow its stream (SPEC §3).

While the task waits, its queue position and predicted start show on stderr; then its tokens go to
stdout as they come, exactly as the engine sent them (ended by one newline when they do not end in
one); then a summary line goes to stderr. A terminal ``error`` event is reported like any API error
(``CODE: message``, exit 1). Ctrl-C cancels the task (``POST /v1/tasks/{id}/cancel``) and exits 130.

The task id is chosen here, so a Ctrl-C even while the admission is in flight knows what to cancel.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from dataclasses import dataclass, field
from typing import Final, TextIO

from rich.console import Console
from rich.status import Status

from . import ops, terminal
from .api import Api, ApiError, JsonObject, quoted
from .sse import SseFrame
from .terminal import duration, integer

PRIORITIES: Final = ("interactive", "batch")
CANCEL_TIMEOUT_S: Final = 5.0
INTERRUPTED: Final = 130


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    submit = sub.add_parser("submit", help="run a prompt: queue position, then tokens as they come")
    submit.add_argument("model", help="the model_ref: a catalog id or a sha256: digest")
    submit.add_argument("prompt")
    submit.add_argument("--max-tokens", type=_positive, default=None)
    submit.add_argument("--seed", type=_non_negative, default=None)
    submit.add_argument("--priority", choices=PRIORITIES, default=None)
    submit.add_argument("--session", default=None, metavar="ID", help="the session_id (created on first use)")
    ops.add_target_options(submit)
    submit.set_defaults(run=submit_cmd, prog="llorch submit")


def _positive(value: str) -> int:
    return _at_least(value, 1)


def _non_negative(value: str) -> int:
    return _at_least(value, 0)


def _at_least(value: str, least: int) -> int:
    """An argparse type: an integer of at least ``least`` (the API checks the upper bounds)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an integer") from None
    if number < least:
        raise argparse.ArgumentTypeError(f"{value}: give {least} or more")
    return number


def task_body(args: argparse.Namespace, task_id: str) -> JsonObject:
    """The TaskRequest: only what was given, so the set's defaults apply to the rest."""
    body: JsonObject = {"task_id": task_id, "model_ref": args.model, "prompt": args.prompt}
    optional: JsonObject = {
        "max_tokens": args.max_tokens,
        "seed": args.seed,
        "priority": args.priority,
        "session_id": args.session,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    return body


def submit_cmd(args: argparse.Namespace) -> int:
    api = ops.api_of(args)
    task_id = str(uuid.uuid4())
    waiting = Waiting(terminal.console(stderr=True))
    run = Run(task_id, sys.stdout)
    try:
        admitted = api.obj("POST", "/v1/tasks", task_body(args, task_id))
        waiting.show(queued_text(admitted))
        for frame in api.stream(f"/v1/tasks/{quoted(task_id)}/stream"):
            if run.take(frame, waiting):
                break
        else:
            raise ApiError("STREAM_ENDED", f"the stream of task {task_id} ended before its end event")
    except KeyboardInterrupt:
        waiting.stop()
        run.close_line()
        print(f"llorch submit: {cancel(api, task_id)}", file=sys.stderr)
        return INTERRUPTED
    finally:
        waiting.stop()
    print(summary_text(task_id, run.end), file=sys.stderr)
    return 0


def cancel(api: Api, task_id: str) -> str:
    """Cancel the task; what happened, as a line."""
    try:
        api.call("POST", f"/v1/tasks/{quoted(task_id)}/cancel", timeout_s=CANCEL_TIMEOUT_S)
    except ApiError as exc:
        if exc.status == 404:  # interrupted before the admission reached the scheduler
            return f"interrupted; task {task_id} was not admitted"
        return f"interrupted; could not cancel task {task_id}: {exc}"
    return f"interrupted; canceled task {task_id}"


@dataclass
class Run:
    """The task's frames as they come: tokens to ``out``, waiting lines to the display."""

    task_id: str
    out: TextIO
    end: JsonObject = field(default_factory=dict)
    _ends_line: bool = field(default=True, init=False)

    def take(self, frame: SseFrame, waiting: Waiting) -> bool:
        """Handle one frame; True after the terminal one. A terminal ``error`` raises :class:`ApiError`."""
        payload = _payload(frame)
        if frame.event == "token":
            waiting.stop()
            piece = str(payload.get("t", ""))
            if piece:
                self.out.write(piece)
                self.out.flush()  # a pipe would otherwise hold the tokens back
                self._ends_line = piece.endswith("\n")
        elif frame.event in ("started", "metrics"):
            shown = waiting_text(payload)
            if shown is not None:
                waiting.show(shown)
        elif frame.event == "end":
            self.close_line()
            self.end = payload
            return True
        elif frame.event == "error":
            self.close_line()
            raise ApiError(
                terminal.plain(payload.get("code"), "ERROR"),
                terminal.plain(payload.get("message"), ""),
                body={k: v for k, v in payload.items() if k != "retriable"},
            )
        return False  # an event this client does not know (SPEC §3: clients ignore them)

    def close_line(self) -> None:
        if not self._ends_line:
            self.out.write("\n")
            self.out.flush()
            self._ends_line = True


def _payload(frame: SseFrame) -> JsonObject:
    try:
        found = json.loads(frame.data)
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise ApiError("BAD_ANSWER", f"a {frame.event} event did not hold a JSON object")
    return found


def queued_text(payload: JsonObject) -> str:
    """``queued: 3 ahead, predicted start in 1.2 s`` from an admission, ``started`` or queued metrics."""
    ahead = integer(payload.get("queue_position"))
    start = integer(payload.get("predicted_start_ms"))
    where = "next in line" if ahead == 0 else f"{ahead} ahead"
    return f"queued: {where}, predicted start in {duration(start)}"


def waiting_text(payload: JsonObject) -> str | None:
    """The waiting line a ``started`` or ``metrics`` payload gives; None for a decode metrics."""
    phase = payload.get("phase")
    if phase is None or phase == "queued":
        return queued_text(payload)
    if phase == "dispatch":
        return f"running on {_where(payload)} (queued {duration(integer(payload.get('queue_time_ms')))})"
    return None


def _where(payload: JsonObject) -> str:
    return f"{terminal.plain(payload.get('pool_id'), '?')}/{terminal.plain(payload.get('replica_id'), '?')}"


def summary_text(task_id: str, end: JsonObject) -> str:
    """The closing line: tokens, time to first token (from admission), finish reason, where it ran."""
    return (
        f"task {task_id}: {integer(end.get('tokens_out'))} tokens, "
        f"first token after {duration(integer(end.get('first_token_ms')))}, "
        f"finish {terminal.plain(end.get('finish_reason'), '?')} on {_where(end)}"
    )


class Waiting:
    """The waiting line on stderr: a spinner updated in place on a terminal, else a line per change."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._status: Status | None = None
        self._shown: str | None = None
        self._done = False

    def show(self, line: str) -> None:
        if self._done or line == self._shown:
            return
        self._shown = line
        if not self.console.is_terminal:
            self.console.print(line, markup=False)
        elif self._status is None:
            self._status = self.console.status(line)
            self._status.start()
        else:
            self._status.update(line)

    def stop(self) -> None:
        """Clear the line for good (the tokens follow); idempotent."""
        self._done = True
        if self._status is not None:
            self._status.stop()
            self._status = None
