"""A canned HTTP gateway for the CLI's unit tests: answers by route pattern, records what it was asked."""

from __future__ import annotations

import fnmatch
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


@dataclass
class Route:
    status: int
    body: bytes
    content_type: str = "application/json"


@dataclass
class Canned:
    """Routes by ``"METHOD /path?query"`` pattern (fnmatch); what was asked, in order:
    ``(method, path, JSON body, Authorization)``."""

    routes: dict[str, Route] = field(default_factory=dict)
    seen: list[tuple[str, str, object, str | None]] = field(default_factory=list)

    def route(self, key: str) -> Route:
        for pattern, route in self.routes.items():
            if fnmatch.fnmatchcase(key, pattern):
                return route
        return Route(404, b'{"code": "NOT_FOUND", "message": "no route", "retriable": false}')

    def answer_all(self, status: int, body: bytes) -> None:
        """Answer every request with ``status`` and ``body`` (JSON or not) from now on."""
        self.routes = {"*": Route(status, body)}


@contextmanager
def canned_gateway() -> Iterator[tuple[str, Canned]]:
    """``(base URL, Canned)`` of a gateway that runs on a thread until the block ends."""
    canned = Canned()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            canned.seen.append((self.command, self.path, body, self.headers.get("Authorization")))
            route = canned.route(f"{self.command} {self.path}")
            self.send_response(route.status)
            self.send_header("Content-Type", route.content_type)
            self.send_header("Content-Length", str(len(route.body)))
            self.end_headers()
            self.wfile.write(route.body)

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", canned
    finally:
        server.shutdown()
        server.server_close()


def sse(*frames: tuple[str, dict[str, object]]) -> Route:
    """A complete SSE answer: a heartbeat, then ``(event, data)`` frames with ids 0, 1, ..."""
    text = ": hb\n\n" + "".join(
        f"id: {i}\nevent: {name}\ndata: {json.dumps(data)}\n\n" for i, (name, data) in enumerate(frames)
    )
    return Route(200, text.encode(), "text/event-stream")


def as_json(value: object, status: int = 200) -> Route:
    return Route(status, json.dumps(value).encode())


TOKEN = "unit-test-token"


def run_cli(url: str, tmp_path: Path, *args: str) -> int:
    """Run ``llorch ARGS --url URL --token-file F`` in-process against a canned gateway; its exit code."""
    from llorch_cli.main import main

    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    with pytest.raises(SystemExit) as exited:
        main([*args, "--url", url, "--token-file", str(token)])
    assert isinstance(exited.value.code, int)
    return exited.value.code
