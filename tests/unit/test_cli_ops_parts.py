"""The pieces of the operator commands: the API client and its one-line errors against a canned HTTP
server, the pid file of `llorch up`, and the small pure helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llorch_cli import pidfile
from llorch_cli.api import gateway_url, resolve_target
from llorch_cli.display import table
from llorch_cli.drain import PoolRow
from tests.support.canned_gateway import TOKEN, Canned, canned_gateway, run_cli


@pytest.fixture
def gateway() -> Iterator[tuple[str, Canned]]:
    with canned_gateway() as running:
        yield running


def _llorch(url: str, tmp_path: Path, *args: str) -> int:
    return run_cli(url, tmp_path, *args)


def test_reload_waits_and_reports_the_new_model(
    gateway: tuple[str, Canned], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, canned = gateway
    body = json.dumps(
        {
            "pool_id": "p/1",
            "state": "Ready",
            "model_ref": "m2",
            "model_digest": "sha256:ab",
            "engine_version": "v2",
        }
    ).encode()
    canned.answer_all(200, body)
    assert _llorch(url, tmp_path, "pools", "reload", "p/1", "m2") == 0
    assert canned.seen == [
        ("POST", "/v1/pools/p%2F1/reload?wait=true", {"new_model_ref": "m2"}, f"Bearer {TOKEN}")
    ]
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "p/1: Ready on m2 (digest sha256:ab, engine v2)"


def test_a_failed_reload_is_one_line_with_its_context(
    gateway: tuple[str, Canned], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, canned = gateway
    body = json.dumps(
        {
            "code": "RELOAD_FAILED",
            "message": "the new engine failed its self-test; the old model serves again",
            "retriable": False,
            "rolled_back": True,
            "last_error": {"code": "SELFTEST_FAILED", "message": "no token", "at_ms": 1},
        }
    ).encode()
    canned.answer_all(409, body)
    assert _llorch(url, tmp_path, "pools", "reload", "mock-a", "m2") == 1
    assert capsys.readouterr().err.splitlines() == [
        "llorch pools reload: RELOAD_FAILED: the new engine failed its self-test; the old model serves again",
        "  rolled_back: True",
        "  last_error: SELFTEST_FAILED: no token",
    ]


def test_reload_without_wait_and_an_answer_that_is_not_json(
    gateway: tuple[str, Canned], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url, canned = gateway
    canned.answer_all(202, b'{"pool_id": "mock-a", "state": "reloading", "reload_id": "r-1"}')
    assert _llorch(url, tmp_path, "pools", "reload", "mock-a", "m2", "--no-wait") == 0
    assert canned.seen[-1][1] == "/v1/pools/mock-a/reload"
    assert capsys.readouterr().out == "mock-a: reloading (reload id r-1)\n"
    canned.answer_all(502, b"<html>bad gateway</html>")
    assert _llorch(url, tmp_path, "pools", "list") == 1
    assert capsys.readouterr().err == "llorch pools list: HTTP_502: <html>bad gateway</html>\n"


def test_target_from_url_and_token_file_needs_no_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLORCH_CONFIG", str(tmp_path / "missing.yaml"))
    token = tmp_path / "token"
    token.write_text(f" {TOKEN}\n")
    target = resolve_target(None, "http://example.test:1/", str(token))
    assert (target.url, target.token) == ("http://example.test:1", TOKEN)


def test_gateway_url_reaches_a_wildcard_bind_on_loopback() -> None:
    assert gateway_url("127.0.0.1:8080") == "http://127.0.0.1:8080"
    assert gateway_url("0.0.0.0:8080") == "http://127.0.0.1:8080"
    assert gateway_url("[::]:8080") == "http://[::1]:8080"
    assert gateway_url("[fd00::1]:9") == "http://[fd00::1]:9"


def test_table_aligns_columns() -> None:
    assert table(["A", "LONG"], [["xyz", "1"], ["q", "22"]]).splitlines() == [
        "A    LONG",
        "xyz  1",
        "q    22",
    ]


def test_a_pool_settles_when_it_serves_nothing_and_runs_nothing() -> None:
    def row(state: str, running: int) -> PoolRow:
        return PoolRow.of({"pool_id": "p", "state": state, "metrics": {"tasks_running": running}})

    assert row("Drained", 0).settled and row("Backoff", 0).settled and row("Stopped", 0).settled
    assert not row("Draining", 0).settled and not row("Ready", 0).settled and not row("Drained", 1).settled
    assert PoolRow.of({}).state == "?"


def test_the_pid_file_names_a_live_llorch_process_and_tells_a_stale_one(tmp_path: Path) -> None:
    path = pidfile.claim(tmp_path)
    owner = pidfile.read(path)
    assert (
        owner is not None and owner.pid == os.getpid() and owner.started == pidfile.start_ticks(os.getpid())
    )
    pidfile.release(path)
    assert not path.exists()

    sleeper = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)", "llorch", "up"],
        stdout=subprocess.PIPE,
    )
    try:
        assert sleeper.stdout is not None
        assert sleeper.stdout.readline() == b"up\n"  # it runs its own command line now, not ours
        ticks = pidfile.start_ticks(sleeper.pid)
        assert ticks is not None
        path.write_text(json.dumps({"pid": sleeper.pid, "started": ticks}))
        live = pidfile.read(path)
        assert live is not None and live.running()
        with pytest.raises(pidfile.AlreadyRunning, match=f"pid {sleeper.pid}"):
            pidfile.claim(tmp_path)
        assert not pidfile.Owner(sleeper.pid, ticks + 1).running()  # the pid, reused by another process
    finally:
        sleeper.kill()
        sleeper.wait()
        if sleeper.stdout is not None:
            sleeper.stdout.close()
    assert not live.running()
    assert pidfile.claim(tmp_path) == path  # a stale file does not block
    pidfile.release(path)
    path.write_text("garbage")
    assert pidfile.read(path) is None
