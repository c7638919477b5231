"""A small synchronous client of the public HTTP API for the operator commands (`llorch models`,
`llorch pools`, `llorch down`) and for the drain of `llorch up` on stop, on the standard library.

Where the gateway is and which token to send follow the gateway's own rules, so a shell with the same
environment and config always matches it: the URL is ``--url``, else ``http://<api.bind>`` (a wildcard
bind is reached on loopback); the token is read from ``--token-file``, else the config's first
``api.tokens`` entry, else ``$LLORCH_API_TOKEN``, else ``<state_dir>/api.token``. The token is never
printed. Every failure is an :class:`ApiError` carrying the API's ``{code, message}`` (or a local code
such as ``UNREACHABLE``), so commands can report it on one line.
"""

from __future__ import annotations

import http.client
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from llorch.config import LlorchConfig, load_config

TOKEN_ENV: Final = "LLORCH_API_TOKEN"
DEFAULT_TIMEOUT_S: Final = 30.0

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
    """The gateway and token from the command line, the config filling in what is not given.

    Raises :class:`llorch.config.ConfigError` when the config is needed and invalid."""
    if url is not None and token_file is not None:
        return Target(url.rstrip("/"), _read_token(Path(token_file), "--token-file"))
    if url is not None and config is None and os.environ.get(TOKEN_ENV):
        return Target(url.rstrip("/"), os.environ[TOKEN_ENV])
    return target_from_config(load_config(config), url, token_file)


def target_from_config(cfg: LlorchConfig, url: str | None = None, token_file: str | None = None) -> Target:
    token = _read_token(Path(token_file), "--token-file") if token_file else config_token(cfg)
    return Target((url or gateway_url(cfg.api.bind)).rstrip("/"), token)


class Api:
    """One JSON request per call; non-2xx answers raise :class:`ApiError` with the envelope's fields."""

    def __init__(self, target: Target, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.target = target
        self.timeout_s = timeout_s

    def call(
        self,
        method: str,
        path: str,
        body: JsonObject | None = None,
        query: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> object:
        """The decoded JSON answer (None for an empty one)."""
        url = self.target.url + path + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, method=method)
        request.add_header("Authorization", f"Bearer {self.target.token}")
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=timeout_s or self.timeout_s) as resp:
                return _decode(resp.read())
        except urllib.error.HTTPError as exc:
            raise _api_error(exc.code, exc.read()) from None
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise self._timeout(method, path, timeout_s) from None
            reason = exc.reason.strerror if isinstance(exc.reason, OSError) else exc.reason
            raise ApiError(
                "UNREACHABLE", f"cannot reach the gateway at {self.target.url}: {reason}"
            ) from None
        except TimeoutError:
            raise self._timeout(method, path, timeout_s) from None
        except (OSError, http.client.HTTPException) as exc:
            raise ApiError("UNREACHABLE", f"the gateway at {self.target.url} went away: {exc!r}") from None

    def _timeout(self, method: str, path: str, timeout_s: float | None) -> ApiError:
        return ApiError("TIMEOUT", f"{method} {path} got no answer within {timeout_s or self.timeout_s:g} s")

    def obj(
        self,
        method: str,
        path: str,
        body: JsonObject | None = None,
        query: dict[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> JsonObject:
        """Like :meth:`call`, for routes that answer one JSON object."""
        answer = self.call(method, path, body, query, timeout_s)
        if not isinstance(answer, dict):
            raise ApiError("BAD_ANSWER", f"{method} {path} did not answer a JSON object")
        return answer

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
