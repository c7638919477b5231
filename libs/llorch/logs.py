"""JSON Lines logging (SPEC §5.11): one object per line with ts, level, service, event, msg.

Callers log a short message and pass structured fields through ``extra``::

    log.info("task admitted", extra={"event": "admission_accepted", "task_id": tid, "queue_position": 0})

Only the SPEC's field names pass through, so headers, tokens and prompts cannot leak by accident.
The correlation id of the request being served rides a context variable.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from llorch.tracing import current_trace_id

correlation_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "correlation_id", default=None
)

FIELDS: Final = (
    "task_id",
    "session_id",
    "client",
    "engine",
    "engine_version",
    "pool_id",
    "replica_id",
    "model_id",
    "model_digest",
    "quant",
    "ctx",
    "kv_warmth",
    "queue_position",
    "predicted_start_ms",
    "queue_time_ms",
    "tokens_in",
    "tokens_out",
    "decode_time_ms",
    "sampler_profile_version",
    "tensor_split",
    "seed",
    "determinism",
    "code",
    "state",
    "pid",
    "port",
    "url",
    "address",
    "reason",
    "exit_code",
    "what",
    "down_ms",
    "child",
    "tasks",
    "unwritten",
    "attempt",
    "delay_ms",
    "path",
    "route",
    "status",
    "manager_id",
    "error",
    "first_token_ms",
    "decision_id",
    "tool",
    "method",
    "url_redacted",
    "decision",
    "rule",
    "plugin",
    "bytes_in",
    "bytes_out",
    "latency_ms",
)


_ORDER: Final = {name: n for n, name in enumerate(FIELDS)}
_ENCODER: Final = json.JSONEncoder(default=str, ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service
        self._cached = (-1, "")  # (epoch second, its text): one tuple, so threads never mix them

    def _ts(self, created: float) -> str:
        """ISO 8601 UTC with milliseconds; the part up to the second is built once per second (the
        cost of a line matters: the scheduler logs one per admission)."""
        second = int(created)
        micros = round((created - second) * 1_000_000)  # as datetime rounds it, then cut to ms
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        cached_second, stamp = self._cached
        if second != cached_second:
            stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._cached = (second, stamp)
        return f"{stamp}.{micros // 1000:03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": self._ts(record.created),
            "level": record.levelname.lower(),
            "service": self.service,
            "event": getattr(record, "event", record.name),
            "msg": record.getMessage(),
        }
        cid = correlation_id_var.get()
        if cid is not None:
            line["correlation_id"] = cid
        trace_id = current_trace_id()  # the span being served, where tracing is on
        if trace_id is not None:
            line["trace_id"] = trace_id
        attrs = record.__dict__
        # Only the SPEC's names pass, in FIELDS' order; the record's few attributes are looked up,
        # not all of FIELDS.
        extra = [name for name in attrs if name in _ORDER]
        extra.sort(key=_ORDER.__getitem__)
        for name in extra:
            line[name] = attrs[name]
        if "task_id" in line:
            line["job_id"] = line["task_id"]
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return _ENCODER.encode(line)


def setup_logging(service: str, level: str = "info", log_file: Path | None = None) -> None:
    """Configure the root logger for one service process (composition roots only)."""
    formatter = JsonFormatter(service)
    # The Python logging HOWTO's "Optimization": a line names none of its caller's frame, thread or
    # process, so the record skips collecting them (the scheduler logs two lines per task).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file))
    root = logging.getLogger()
    root.handlers.clear()
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "grpc"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
