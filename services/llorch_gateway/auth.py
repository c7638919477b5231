"""API tokens (SPEC §2.5): loaded once, compared in memory with hmac.compare_digest against all."""

from __future__ import annotations

import hmac
import logging
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from llorch.config import LlorchConfig
from llorch.errors import Code, OrchestratorError
from llorch.throttle import BackoffClamp, TokenBucket

from .edge import Handler, route_template

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
_TOKEN_CHARS = re.compile(r"[\x21-\x7e]+")
"""What an offered token may consist of: visible ASCII (RFC 6750 b64token is a subset)."""


@dataclass(frozen=True, slots=True)
class ApiToken:
    name: str
    value: bytes
    rps: float | None = None
    tokens_per_min: int | None = None


def read_token_file(path: Path) -> str:
    """A token file must be 0600 or stricter (SPEC §5.10)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SystemExit(f"token file {path} is readable by group or others (mode {mode:o}); chmod 600 it")
    return path.read_text().strip()


def ensure_token_file(path: Path) -> None:
    """Create ``path`` with 32 random bytes (urlsafe base64), mode 0600, unless it exists."""
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secrets.token_urlsafe(32))


def load_tokens(cfg: LlorchConfig) -> list[ApiToken]:
    """api.tokens[] first; else LLORCH_API_TOKEN; else <state_dir>/api.token (created when missing)."""
    tokens: list[ApiToken] = []
    for entry in cfg.api.tokens:
        if entry.token_env is not None:
            value = os.environ.get(entry.token_env, "")
            if not value:
                raise SystemExit(f"api.tokens[{entry.name}]: env var {entry.token_env} is empty or unset")
        else:
            assert entry.token_file is not None
            value = read_token_file(Path(entry.token_file))
        tokens.append(ApiToken(entry.name, value.encode(), entry.rps, entry.tokens_per_min))
    if tokens:
        return tokens
    from_env = os.environ.get("LLORCH_API_TOKEN")
    if from_env:
        return [ApiToken("default", from_env.encode())]
    path = cfg.state_dir / "api.token"
    ensure_token_file(path)
    return [ApiToken("default", read_token_file(path).encode())]


class Authenticator:
    """Auth, then the caller's `rps` throttle (SPEC §5.1 checks 1 and 2), for every /v1 route.

    Buckets live in this gateway's memory: with several gateways each enforces the limit on its own.
    """

    def __init__(self, tokens: list[ApiToken], probes_require_auth: bool, clamp: BackoffClamp) -> None:
        self.tokens = tokens
        self.probes_require_auth = probes_require_auth
        self.clamp = clamp
        self._buckets = {t.name: TokenBucket(t.rps) for t in tokens if t.rps}

    def limits(self, client: str) -> dict[str, float | int | None]:
        """The caller's token limits as Capabilities shows them (null: unlimited)."""
        token = next((t for t in self.tokens if t.name == client), None)
        return {
            "requests_per_s": token.rps if token else None,
            "tokens_per_min": token.tokens_per_min if token else None,
        }

    def client(self, request: web.Request) -> str:
        """The matching token's name; raises 401/403 otherwise."""
        header = request.headers.get("Authorization")
        offered = ""
        if header is not None:
            scheme, _, value = header.partition(" ")
            offered = value.strip() if scheme.lower() == "bearer" else ""
        else:
            offered = request.headers.get("X-API-Key", "").strip()
        if not offered:
            log.info(
                "auth failed",
                extra={"event": "auth_failed", "reason": "missing", "route": route_template(request)},
            )
            raise OrchestratorError(
                Code.UNAUTHENTICATED, "send the API token as Authorization: Bearer <token>"
            )
        if not _TOKEN_CHARS.fullmatch(offered):
            # Bytes that are not visible ASCII (non-UTF-8 arrives as surrogate escapes) can match no
            # token; refuse them as a malformed credential, and never echo or encode them.
            log.info(
                "auth failed",
                extra={"event": "auth_failed", "reason": "malformed", "route": route_template(request)},
            )
            raise OrchestratorError(
                Code.UNAUTHENTICATED, "the API token must be visible ASCII: Authorization: Bearer <token>"
            )
        candidate = offered.encode("ascii")
        matched = ""
        for token in self.tokens:  # compare against every token; no early exit
            if hmac.compare_digest(candidate, token.value) and not matched:
                matched = token.name
        if not matched:
            log.info(
                "auth failed",
                extra={"event": "auth_failed", "reason": "mismatch", "route": route_template(request)},
            )
            raise OrchestratorError(Code.FORBIDDEN, "the API token is not valid")
        return matched

    def throttle(self, client: str) -> None:
        """The caller's `rps` token bucket: 429 ADMISSION_REJECT (rate-limit) when it is empty."""
        bucket = self._buckets.get(client)
        wait_ms = bucket.take() if bucket is not None else 0
        if bucket is None or not wait_ms:
            return
        backoff = self.clamp(wait_ms)
        raise OrchestratorError(
            Code.ADMISSION_REJECT,
            f"this API token is limited to {bucket.rps:g} requests/s; retry after {backoff} ms",
            policy_label="rate-limit",
            retry_after_ms=backoff,
            engine="none",
        )

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/") or (self.probes_require_auth and request.path in OPEN_PATHS):
            request["client"] = client = self.client(request)
            self.throttle(client)
        return await handler(request)
