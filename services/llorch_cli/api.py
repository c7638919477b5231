"""A small synchronous client of the public HTTP API for the client commands (`llorch status|submit|
tasks`, `llorch models|pools|down`) and for the drain of `llorch up` on stop, on the standard library.

:func:`resolve_target` is the one place every command finds the gateway and its token. They follow the
gateway's own rules, so a shell with the same environment and config always matches it: the URL is
``--url``, else ``http://<api.bind>`` (a wildcard bind is reached on loopback); the token is read from
``--token-file``, else the config's first ``api.tokens`` entry, else ``$LLORCH_API_TOKEN``, else
``<state_dir>/api.token``. Without a config file (none given and none at the default path) the
defaults stand in for it: ``http://127.0.0.1:8080`` and the default state dir (both as overridden by
``LLORCH_API_BIND`` and ``LLORCH_STATE_DIR``). The token is never printed. Every failure is an
:class:`ApiError` carrying the API's ``{code, message}`` (or a local code such as ``UNREACHABLE``), so
commands can report it on one line.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypedDict, Unpack

from llorch.config import CONFIG_ENV, ApiConfig, LlorchConfig, load_config, resolve_config_path

from .sse import SseFrame, sse_frames

TOKEN_ENV: Final = "LLORCH_API_TOKEN"
BIND_ENV: Final = "LLORCH_API_BIND"
STATE_DIR_ENV: Final = "LLORCH_STATE_DIR"
DEFAULT_TIMEOUT_S: Final = 30.0
STREAM_SILENCE_S: Final = 60.0
"""How long a stream may stay silent: the task stream sends a heartbeat every ``sse.heartbeat_s``
(15 s by default), the status stream a frame about once a second."""

JsonObject = dict[str, object]


class CliError(Exception):
    """A problem to report on one line: ``<code>: <message>``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ApiError(CliError):
    """The API answered with an error envelope, or could not be reached (``status`` None)."""

    def __init__(self, code: str, message: str, status: int | None = None, body: JsonObject | None = None):
        super().__init__(code, message)
        self.status = status
        self.body = body or {}


@dataclass(frozen=True)
class Target:
    url: str
    token: str


def gateway_url(bind: str) -> str:
    """``http://host:port`` for a bind address; a wildcard bind is reached on loopback."""
    host, _, port = bind.rpartition(":")
    host = host.strip("[]")
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _read_token(path: Path, what: str) -> str:
    try:
        token = path.expanduser().read_text().strip()
    except OSError as exc:
        raise CliError("NO_TOKEN", f"cannot read the API token from {what} {path}: {exc.strerror}") from None
    if not token:
        raise CliError("NO_TOKEN", f"the API token file {path} is empty")
    return token


def config_token(cfg: LlorchConfig) -> str:
    """The token the gateway of ``cfg`` accepts, found the way the gateway finds it (read only)."""
    if cfg.api.tokens:
        first = cfg.api.tokens[0]
        if first.token_env is not None:
            value = os.environ.get(first.token_env, "")
            if not value:
                raise CliError("NO_TOKEN", f"api.tokens[{first.name}]: env var {first.token_env} is unset")
            return value
        assert first.token_file is not None  # the config validates exactly one source
        return _read_token(Path(first.token_file), f"api.tokens[{first.name}].token_file")
    from_env = os.environ.get(TOKEN_ENV, "")
    if from_env:
        return from_env
    return _read_token(cfg.state_dir / "api.token", "the state dir:")


def resolve_target(config: str | None, url: str | None, token_file: str | None) -> Target:
    """The gateway and token from the command line, the config (or its defaults) filling in the rest.

    The config is ``config``, else ``$LLORCH_CONFIG``, else the default path when a file is there.
    Raises :class:`llorch.config.ConfigError` when a config is given (or found) and invalid, and
    :class:`CliError` ``NO_TOKEN`` when no token can be found."""
    if url is not None and token_file is not None:
        return Target(url.rstrip("/"), _read_token(Path(token_file), "--token-file"))
    if url is not None and config is None and os.environ.get(TOKEN_ENV):
        return Target(url.rstrip("/"), os.environ[TOKEN_ENV])
    if config is None and not os.environ.get(CONFIG_ENV) and not resolve_config_path().is_file():
        return _target_without_config(url, token_file)
    return target_from_config(load_config(config), url, token_file)


def target_from_config(cfg: LlorchConfig, url: str | None = None, token_file: str | None = None) -> Target:
    """The gateway of ``cfg`` (or ``url``) and the token it accepts (or the one in ``token_file``)."""
    token = _read_token(Path(token_file), "--token-file") if token_file else config_token(cfg)
    return Target((url or gateway_url(cfg.api.bind)).rstrip("/"), token)


def _target_without_config(url: str | None, token_file: str | None) -> Target:
    """What a config of defaults would give, with the env overrides `load_config` applies."""
    bind = os.environ.get(BIND_ENV) or ApiConfig().bind
    if token_file:
        token = _read_token(Path(token_file), "--token-file")
    elif os.environ.get(TOKEN_ENV):
        token = os.environ[TOKEN_ENV]
    else:
        default_dir = LlorchConfig.model_fields["state_dir"].default
        state_dir = Path(os.environ.get(STATE_DIR_ENV) or default_dir).expanduser()
        token = _read_token(state_dir / "api.token", f"${TOKEN_ENV} (unset) or the state dir:")
    return Target((url or gateway_url(bind)).rstrip("/"), token)


class RequestOptions(TypedDict, total=False):
    """What a request may add to its method, path and body."""

    query: dict[str, str] | None
    timeout_s: float | None  # the longest wait for the answer (for a stream: for its next line)


class Api:
    """One JSON request per call, or one SSE stream; non-2xx answers raise :class:`ApiError` with the
    envelope's fields."""

    def __init__(self, target: Target, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.target = target
        self.timeout_s = timeout_s

    def call(
        self, method: str, path: str, body: JsonObject | None = None, **options: Unpack[RequestOptions]
    ) -> object:
        """The decoded JSON answer (None for an empty one)."""
        with self._exchange(method, path, body, "application/json", options) as resp:
            return _decode(resp.read())

    def obj(
        self, method: str, path: str, body: JsonObject | None = None, **options: Unpack[RequestOptions]
    ) -> JsonObject:
        """Like :meth:`call`, for routes that answer one JSON object."""
        answer = self.call(method, path, body, **options)
        if not isinstance(answer, dict):
            raise ApiError("BAD_ANSWER", f"{method} {path} did not answer a JSON object")
        return answer

    def stream(self, path: str, **options: Unpack[RequestOptions]) -> Iterator[SseFrame]:
        """``GET path`` as Server-Sent Events, frame by frame until the gateway ends the stream.

        Closing the iterator closes the connection. ``timeout_s`` (default :data:`STREAM_SILENCE_S`)
        bounds the silence between two lines, heartbeats included."""
        options.setdefault("timeout_s", STREAM_SILENCE_S)
        with self._exchange("GET", path, None, "text/event-stream", options) as resp:
            yield from sse_frames(resp)

    @contextlib.contextmanager
    def _exchange(
        self, method: str, path: str, body: JsonObject | None, accept: str, options: RequestOptions
    ) -> Iterator[http.client.HTTPResponse]:
        """The open response; failures while opening or reading it become :class:`ApiError`."""
        query = options.get("query")
        timeout_s = options.get("timeout_s") or self.timeout_s
        url = self.target.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.target.token}")
        request.add_header("Accept", accept)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as resp:
                yield resp
        except urllib.error.HTTPError as exc:
            raise _api_error(exc.code, exc.read()) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise _timeout(method, path, timeout_s) from None
            reason = exc.reason.strerror if isinstance(exc.reason, OSError) else exc.reason
            raise ApiError(
                "UNREACHABLE", f"cannot reach the gateway at {self.target.url}: {reason}"
            ) from None
        except TimeoutError:
            raise _timeout(method, path, timeout_s) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError("UNREACHABLE", f"the gateway at {self.target.url} went away: {exc!r}") from None

    def objects(
        self, path: str, key: str | None = None, query: dict[str, str] | None = None
    ) -> list[JsonObject]:
        """``GET path``: a JSON list of objects, or the list under ``key``."""
        answer = self.call("GET", path, query=query)
        if key is not None and isinstance(answer, dict):
            answer = answer.get(key)
        if not isinstance(answer, list) or not all(isinstance(item, dict) for item in answer):
            raise ApiError("BAD_ANSWER", f"GET {path} did not answer a list of objects")
        return list(answer)


def quoted(segment: str) -> str:
    """A path segment, escaped (ids come from the command line)."""
    return urllib.parse.quote(segment, safe="")


def _timeout(method: str, path: str, timeout_s: float) -> ApiError:
    return ApiError("TIMEOUT", f"{method} {path} got no answer within {timeout_s:g} s")


def _decode(raw: bytes) -> object:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ApiError("BAD_ANSWER", "the gateway answered something that is not JSON") from None


def _api_error(status: int, raw: bytes) -> ApiError:
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("code"), str):
        return ApiError(body["code"], str(body.get("message", "")), status, body)
    return ApiError(f"HTTP_{status}", raw.decode(errors="replace").strip()[:200] or "no body", status)
