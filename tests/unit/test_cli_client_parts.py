"""The pieces of the client commands (`llorch status|submit|tasks`): SSE parsing, the rich views as
plain text, the waiting and summary lines, finding the gateway and token without a config, and the
commands end to end against a canned gateway in this process."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from llorch.config import ConfigError
from llorch_cli.api import Api, ApiError, CliError, Target, resolve_target
from llorch_cli.main import main
from llorch_cli.sse import SseFrame, sse_frames
from llorch_cli.status_cmd import render, snapshots
from llorch_cli.submit_cmd import Run, Waiting, queued_text, summary_text, waiting_text
from llorch_cli.tasks_cmd import tasks_table
from llorch_cli.terminal import ago, duration, usage_bar
from tests.support.canned_gateway import Canned, as_json, canned_gateway, sse

TOKEN = "unit-client-token"
NOW_MS = 1_760_000_000_000
SNAPSHOT: dict[str, object] = {
    "version": "0.1.0",
    "generated_at_ms": NOW_MS,
    "pools": [
        {
            "pool_id": "gpu-a",
            "state": "Ready",
            "model_ref": "[bold]m",  # markup in data must print as it is
            "engine": "llamacpp",
            "replicas": [
                {"replica_id": "r0", "state": "Ready", "slots_total": 2, "slots_free": 1},
                {"replica_id": "r1", "state": "Starting", "slots_total": 2, "slots_free": 2},
            ],
            "metrics": {"slots_total": 2, "slots_free": 1, "tasks_running": 1},
            "last_error": None,
        },
        {
            "pool_id": "cpu-b",
            "state": "Backoff",
            "model_ref": "m2",
            "engine": "mock",
            "replicas": [],
            "metrics": {},
            "last_error": {"code": "WORKER_RESET", "message": "engine exited", "at_ms": 1},
        },
    ],
    "gpus": [
        {
            "device": "0",
            "name": "Test GPU",
            "vram_total_bytes": 8 * 2**30,
            "vram_used_bytes": 6 * 2**30,
            "utilization": 0.42,
            "pools": ["gpu-a"],
        }
    ],
    "replica_sets": [
        {
            "id": "rs-1",
            "model_id": "[bold]m",
            "pools": ["gpu-a"],
            "queue_depth": {"interactive": 3, "batch": 7},
            "queue_capacity": 16,
            "slots_total": 2,
            "slots_free": 1,
            "load": 0.5,
        }
    ],
    "running": [
        {
            "task_id": "t-run",
            "model": "[bold]m",
            "pool_id": "gpu-a",
            "replica_id": "r0",
            "priority": "batch",
            "tokens_out": 12,
            "started_ms": NOW_MS - 4500,
        }
    ],
    "recent_errors": [
        {"task_id": "t-err", "code": "DECODE_TIMEOUT", "message": "idle for 30 s", "at_ms": NOW_MS - 65_000}
    ],
}


def plain(renderable: object) -> str:
    out = Console(file=io.StringIO(), width=200, color_system=None)
    out.print(renderable)
    assert isinstance(out.file, io.StringIO)
    return out.file.getvalue()


def rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


# ---- SSE ------------------------------------------------------------------------------------------------


def test_sse_frames_follow_the_parsing_rules() -> None:
    stream = [
        b": hb\n",
        b"id: 0\n",
        b"event: started\n",
        b'data: {"a": 1}\n',
        b"\n",
        b"\r\n",  # an empty line between frames dispatches nothing
        b"event:token\r\n",  # no space after the colon, CRLF endings
        b"data:line one\r\n",
        b"data: line two\r\n",
        b"retry: 5\r\n",  # an unknown field is ignored
        b"\r\n",
        b"data: no event name\n",
        b"\n",
        b"event: cut\n",
        b"data: never ended",
    ]
    assert list(sse_frames(stream)) == [
        SseFrame("started", '{"a": 1}', "0"),
        SseFrame("token", "line one\nline two", "0"),  # the last id stands until a new one
        SseFrame("message", "no event name", "0"),
    ]


# ---- status ---------------------------------------------------------------------------------------------


def test_the_status_view_shows_every_section_as_plain_text() -> None:
    text = plain(render(SNAPSHOT))
    lines = rows(text)
    assert lines[0][:2] == ["llama-orch", "0.1.0"]
    assert ["gpu-a", "Ready", "[bold]m", "llamacpp", "1/2", "1/2", "1", "-"] in lines
    assert ["cpu-b", "Backoff", "m2", "mock", "0/0", "0/0", "0", "WORKER_RESET:", "engine", "exited"] in lines
    assert ["0", "Test", "GPU", "███████████████░░░░░", "6.0/8.0", "GiB", "42", "%", "gpu-a"] in lines
    assert ["rs-1", "[bold]m", "gpu-a", "3", "7", "16", "1/2", "50", "%"] in lines
    assert ["t-run", "[bold]m", "gpu-a", "r0", "batch", "12", "4.5", "s"] in lines
    assert ["1", "min", "05", "s", "ago", "t-err", "DECODE_TIMEOUT", "idle", "for", "30", "s"] in lines
    for title in ("Pools", "GPUs", "Queues", "Running", "Recent errors"):
        assert title in [line.strip() for line in text.splitlines()]


def test_an_empty_status_says_so_per_section() -> None:
    text = plain(render({"version": "0.1.0", "generated_at_ms": NOW_MS}))
    for line in ("no pools", "no GPUs", "no replica sets", "no running tasks", "no recent errors"):
        assert f"  {line}" in text.splitlines()


def test_usage_bar_fills_by_ratio_and_colours_by_pressure() -> None:
    half = usage_bar(4 * 2**30, 8 * 2**30, cells=10)
    assert half.plain == "█████░░░░░ 4.0/8.0 GiB"
    assert half.spans[0].style == "green"
    assert usage_bar(75, 100, cells=4).spans[0].style == "yellow"
    assert usage_bar(95, 100, cells=4).spans[0].style == "red"
    assert usage_bar(200, 100, cells=4).plain.startswith("████ ")  # over-reported use is capped
    assert usage_bar(1, 0).plain == "-"


def test_durations_and_ages_read_naturally() -> None:
    assert [duration(ms) for ms in (-5, 850, 12_345, 245_000, 7_380_000)] == [
        "0 ms",
        "850 ms",
        "12.3 s",
        "4 min 05 s",
        "2 h 03 min",
    ]
    assert ago(NOW_MS - 2000, NOW_MS) == "2.0 s ago"
    assert ago(None, NOW_MS) == ago(0, NOW_MS) == ago(True, NOW_MS) == "-"


# ---- submit ---------------------------------------------------------------------------------------------


def test_the_waiting_lines_follow_the_stream_phases() -> None:
    assert queued_text({"queue_position": 0, "predicted_start_ms": 0}) == (
        "queued: next in line, predicted start in 0 ms"
    )
    started = {"task_id": "t", "queue_position": 3, "predicted_start_ms": 1200, "priority": "batch"}
    assert waiting_text(started) == "queued: 3 ahead, predicted start in 1.2 s"
    queued = {"phase": "queued", "queue_position": 1, "predicted_start_ms": 400, "queue_depth": 2}
    assert waiting_text(queued) == "queued: 1 ahead, predicted start in 400 ms"
    dispatch = {"phase": "dispatch", "pool_id": "p", "replica_id": "r0", "queue_time_ms": 1500}
    assert waiting_text(dispatch) == "running on p/r0 (queued 1.5 s)"
    assert waiting_text({"phase": "decode", "tokens_out_so_far": 3}) is None


def test_the_summary_names_tokens_first_token_finish_and_place() -> None:
    end = {
        "tokens_out": 16,
        "first_token_ms": 85,
        "finish_reason": "length",
        "pool_id": "mock-a",
        "replica_id": "r0",
    }
    assert summary_text("t-1", end) == (
        "task t-1: 16 tokens, first token after 85 ms, finish length on mock-a/r0"
    )


def frame(event: str, **payload: object) -> SseFrame:
    return SseFrame(event, json.dumps(payload))


def test_a_run_writes_tokens_and_ends_the_line_once() -> None:
    out, err = io.StringIO(), io.StringIO()
    waiting = Waiting(Console(file=err, width=200))
    run = Run("t", out)
    assert not run.take(frame("started", queue_position=2, predicted_start_ms=2000), waiting)
    assert not run.take(frame("metrics", phase="queued", queue_position=2, predicted_start_ms=2000), waiting)
    assert not run.take(
        frame("metrics", phase="dispatch", pool_id="p", replica_id="r", queue_time_ms=3), waiting
    )
    for i, piece in enumerate([" hello", " world", ""]):
        assert not run.take(frame("token", t=piece, i=i), waiting)
    assert not run.take(frame("metrics", phase="decode", tokens_out_so_far=2), waiting)
    assert not run.take(frame("future-event", anything=1), waiting)  # clients ignore what they don't know
    assert run.take(frame("end", tokens_out=2, finish_reason="stop"), waiting)
    assert out.getvalue() == " hello world\n"
    assert run.end["finish_reason"] == "stop"
    assert err.getvalue().splitlines() == [  # a repeat is not printed again; none after the first token
        "queued: 2 ahead, predicted start in 2.0 s",
        "running on p/r (queued 3 ms)",
    ]


def test_a_run_ending_in_an_error_raises_it_after_a_newline() -> None:
    out = io.StringIO()
    run = Run("t", out)
    waiting = Waiting(Console(file=io.StringIO()))
    run.take(frame("token", t="partial\n", i=0), waiting)
    with pytest.raises(ApiError) as raised:
        run.take(
            frame("error", code="WORKER_RESET", message="engine died", retriable=True, tokens_out=1), waiting
        )
    assert (raised.value.code, raised.value.message) == ("WORKER_RESET", "engine died")
    assert raised.value.body["tokens_out"] == 1
    assert out.getvalue() == "partial\n"  # it already ended its line
    with pytest.raises(ApiError, match="BAD_ANSWER"):
        run.take(SseFrame("token", "not json"), waiting)


# ---- tasks ----------------------------------------------------------------------------------------------


def test_the_tasks_table_shows_one_row_per_task() -> None:
    tasks: list[dict[str, object]] = [
        {
            "task_id": "t-2",
            "model": "m",
            "state": "failed",
            "priority": "batch",
            "created_ms": NOW_MS - 3000,
            "tokens_out": 0,
            "code": "CANCELED",
        },
        {
            "task_id": "t-1",
            "model": "m",
            "state": "succeeded",
            "priority": "interactive",
            "created_ms": NOW_MS - 90_000,
            "tokens_out": 7,
            "code": None,
        },
    ]
    assert rows(plain(tasks_table(tasks, NOW_MS))) == [
        ["TASK", "MODEL", "STATE", "PRIORITY", "CREATED", "TOKENS", "CODE"],
        ["t-2", "m", "failed", "batch", "3.0", "s", "ago", "0", "CANCELED"],
        ["t-1", "m", "succeeded", "interactive", "1", "min", "30", "s", "ago", "7", "-"],
    ]


# ---- finding the gateway and the token ------------------------------------------------------------------


@pytest.fixture
def no_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home without a config file, and none of the variables that would point at one."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("LLORCH_CONFIG", "LLORCH_API_TOKEN", "LLORCH_API_BIND", "LLORCH_STATE_DIR"):
        monkeypatch.delenv(var, raising=False)
    return tmp_path


def test_without_a_config_the_defaults_and_the_env_token_are_used(
    no_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLORCH_API_TOKEN", "from-env")
    assert resolve_target(None, None, None) == Target("http://127.0.0.1:8080", "from-env")
    monkeypatch.setenv("LLORCH_API_BIND", "0.0.0.0:9090")
    assert resolve_target(None, None, None).url == "http://127.0.0.1:9090"


def test_without_a_config_or_env_the_state_dirs_token_file_is_read(
    no_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = no_config / ".local" / "state" / "llorch" / "api.token"
    with pytest.raises(CliError, match=f"NO_TOKEN: .*{default}"):
        resolve_target(None, "http://gw:1", None)
    default.parent.mkdir(parents=True)
    default.write_text("from-default-dir\n")
    assert resolve_target(None, "http://gw:1/", None) == Target("http://gw:1", "from-default-dir")
    moved = no_config / "elsewhere"
    moved.mkdir()
    (moved / "api.token").write_text("from-state-dir-env")
    monkeypatch.setenv("LLORCH_STATE_DIR", str(moved))
    assert resolve_target(None, None, None).token == "from-state-dir-env"


def test_a_config_found_at_the_default_path_or_named_is_used(
    no_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = no_config / ".config" / "llorch" / "config.yaml"
    config.parent.mkdir(parents=True)
    state = no_config / "state"
    state.mkdir()
    (state / "api.token").write_text("from-config-state-dir")
    config.write_text(
        f"version: 1\nstate_dir: {state}\napi: {{bind: '127.0.0.1:7001'}}\n"
        "pools: [{id: p, engine: mock, model: m, devices: cpu, ctx: 512}]\n"
    )
    assert resolve_target(None, None, None) == Target("http://127.0.0.1:7001", "from-config-state-dir")
    monkeypatch.setenv("LLORCH_CONFIG", str(no_config / "missing.yaml"))  # named: it must exist
    with pytest.raises(ConfigError):
        resolve_target(None, None, None)


# ---- the commands against a canned gateway --------------------------------------------------------------


@pytest.fixture
def gateway() -> Iterator[tuple[str, Canned]]:
    with canned_gateway() as running:
        yield running


@pytest.fixture
def env_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLORCH_API_TOKEN", TOKEN)
    monkeypatch.delenv("LLORCH_CONFIG", raising=False)


def llorch(url: str, *args: str) -> int:
    with pytest.raises(SystemExit) as exited:
        main([*args, "--url", url])
    assert isinstance(exited.value.code, int)
    return exited.value.code


END = {"tokens_out": 2, "first_token_ms": 60, "finish_reason": "length", "pool_id": "p", "replica_id": "r0"}


def test_submit_streams_tokens_to_stdout_and_the_summary_to_stderr(
    gateway: tuple[str, Canned], env_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    url, canned = gateway
    canned.routes["POST /v1/tasks"] = as_json({"queue_position": 1, "predicted_start_ms": 50}, 202)
    canned.routes["GET /v1/tasks/*/stream"] = sse(
        ("started", {"queue_position": 1, "predicted_start_ms": 50}),
        ("metrics", {"phase": "dispatch", "pool_id": "p", "replica_id": "r0", "queue_time_ms": 40}),
        ("token", {"t": " one", "i": 0}),
        ("token", {"t": " two", "i": 1}),
        ("end", END),
    )
    options = ("--max-tokens", "2", "--seed", "7", "--priority", "batch", "--session", "s-1")
    code = llorch(url, "submit", "m", "hi", *options)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.out == " one two\n"
    method, path, body, auth = canned.seen[0]
    assert (method, path, auth) == ("POST", "/v1/tasks", f"Bearer {TOKEN}")
    assert isinstance(body, dict)
    task_id = body.pop("task_id")  # chosen by the client, so a Ctrl-C can always cancel it
    assert body == {
        "model_ref": "m",
        "prompt": "hi",
        "max_tokens": 2,
        "seed": 7,
        "priority": "batch",
        "session_id": "s-1",
    }
    assert canned.seen[1][:2] == ("GET", f"/v1/tasks/{task_id}/stream")
    assert captured.err.splitlines() == [
        "queued: 1 ahead, predicted start in 50 ms",
        "running on p/r0 (queued 40 ms)",
        f"task {task_id}: 2 tokens, first token after 60 ms, finish length on p/r0",
    ]


def test_submit_reports_a_stream_error_and_a_refused_admission(
    gateway: tuple[str, Canned], env_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    url, canned = gateway
    canned.routes["POST /v1/tasks"] = as_json({"queue_position": 0, "predicted_start_ms": 0}, 202)
    error = {"code": "WORKER_RESET", "message": "the engine exited", "retriable": True, "tokens_out": 1}
    canned.routes["GET /v1/tasks/*/stream"] = sse(("token", {"t": "a", "i": 0}), ("error", error))
    assert llorch(url, "submit", "m", "hi") == 1
    captured = capsys.readouterr()
    assert captured.out == "a\n"
    assert captured.err.splitlines()[-2:] == [
        "llorch submit: WORKER_RESET: the engine exited",
        "  tokens_out: 1",
    ]

    canned.routes["GET /v1/tasks/*/stream"] = sse(("token", {"t": "a", "i": 0}))
    assert llorch(url, "submit", "m", "hi") == 1
    assert "llorch submit: STREAM_ENDED: the stream of task" in capsys.readouterr().err

    refusal = {"code": "INVALID_PARAMS", "message": "unknown model_ref", "served_models": ["m1"]}
    canned.routes["POST /v1/tasks"] = as_json(refusal, 400)
    assert llorch(url, "submit", "nope", "hi") == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "llorch submit: INVALID_PARAMS: unknown model_ref",
        "  served_models: m1",
    ]


def test_status_once_json_and_a_followed_stream(
    gateway: tuple[str, Canned], env_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    url, canned = gateway
    canned.routes["GET /v1/status"] = as_json(SNAPSHOT)
    assert llorch(url, "status", "--json") == 0
    assert json.loads(capsys.readouterr().out) == SNAPSHOT
    assert llorch(url, "status", "--once") == 0
    assert rows(capsys.readouterr().out)[0][:2] == ["llama-orch", "0.1.0"]

    later = {**SNAPSHOT, "generated_at_ms": NOW_MS + 1000}
    changed = {**later, "running": [], "generated_at_ms": NOW_MS + 2000}
    canned.routes["GET /v1/status/stream"] = sse(("status", SNAPSHOT), ("status", later), ("status", changed))
    assert llorch(url, "status") == 1  # the canned stream ends, as a gateway going away would
    captured = capsys.readouterr()
    # Not a terminal: a snapshot is printed when it changed, not when only its time did.
    assert captured.out.count("llama-orch 0.1.0") == 2
    assert captured.out.count("t-run") == 1 and "  no running tasks" in captured.out
    assert "llorch status: STREAM_ENDED" in captured.err


def test_status_polls_a_gateway_without_the_stream_route(gateway: tuple[str, Canned]) -> None:
    url, canned = gateway
    canned.routes["GET /v1/status"] = as_json(SNAPSHOT)
    slept: list[float] = []
    polled = snapshots(Api(Target(url, TOKEN)), slept.append)
    assert [next(polled)["version"], next(polled)["version"]] == ["0.1.0", "0.1.0"]
    assert slept == [1.0]
    assert [s[:2] for s in canned.seen] == [
        ("GET", "/v1/status/stream"),
        ("GET", "/v1/status"),
        ("GET", "/v1/status"),
    ]
    canned.routes["GET /v1/status/stream"] = as_json({"code": "FORBIDDEN", "message": "bad token"}, 403)
    with pytest.raises(ApiError, match="FORBIDDEN: bad token"):  # only a missing route falls back
        next(snapshots(Api(Target(url, TOKEN))))


def test_tasks_as_json_and_as_a_table(
    gateway: tuple[str, Canned], env_token: None, capsys: pytest.CaptureFixture[str]
) -> None:
    url, canned = gateway
    listed = {
        "tasks": [
            {
                "task_id": "t-1",
                "model": "m",
                "state": "succeeded",
                "priority": "interactive",
                "created_ms": 1,
                "tokens_out": 3,
                "code": None,
            }
        ]
    }
    canned.routes["GET /v1/tasks?limit=5"] = as_json(listed)
    assert llorch(url, "tasks", "--limit", "5", "--json") == 0
    assert json.loads(capsys.readouterr().out) == listed
    assert llorch(url, "tasks", "--limit", "5") == 0
    assert rows(capsys.readouterr().out)[1][:4] == ["t-1", "m", "succeeded", "interactive"]
    canned.routes["GET /v1/tasks?limit=0"] = as_json(
        {"code": "INVALID_PARAMS", "message": "limit must be 1..200", "field": "limit"}, 400
    )
    assert llorch(url, "tasks", "--limit", "0") == 1
    assert capsys.readouterr().err.splitlines() == [
        "llorch tasks: INVALID_PARAMS: limit must be 1..200",
        "  field: limit",
    ]
