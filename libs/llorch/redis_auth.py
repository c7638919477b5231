"""How a service reaches Redis: the URL, the password (from env or a file, never from the URL or the
logs), an ACL user, and the CA of a ``rediss://`` server; and a clear refusal when Redis will not let us in.
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from redis.exceptions import AuthenticationError, ConnectionError, ResponseError

from llorch.config import RedisConfig
from llorch.store import Store

PASSWORD_ENV: Final = "LLORCH_REDIS_PASSWORD"
_AUTH_WORDS: Final = ("NOAUTH", "WRONGPASS", "AUTH", "NOPERM")


def redis_password(cfg: RedisConfig, env: Mapping[str, str] | None = None) -> str | None:
    """``LLORCH_REDIS_PASSWORD``, else the first line of ``redis.password_file``, else None."""
    env = os.environ if env is None else env
    from_env = env.get(PASSWORD_ENV)
    if from_env:
        return from_env
    if cfg.password_file is None:
        return None
    return read_password_file(cfg.password_file)


def read_password_file(path: Path) -> str:
    """The password in ``path``, a file of mode 0600 or stricter (SPEC §5.10); SystemExit (naming the
    file, never its content) when it is not."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise SystemExit(
                f"the Redis password file {path} is readable by group or others (mode {mode:o}); chmod 600 it"
            )
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"cannot read the Redis password file {path}: {type(exc).__name__}") from None
    if not lines or not lines[0].strip():
        raise SystemExit(f"the Redis password file {path} is empty")
    return lines[0].strip()


def redacted(url: str) -> str:
    """``url`` without user info or query (the config refuses passwords there; this is belt and braces)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@asynccontextmanager
async def connect_store(cfg: RedisConfig, url: str | None = None) -> AsyncIterator[Store]:
    """:meth:`Store.connect` with the config's credentials (``url`` overrides ``cfg.url``).

    Redis that refuses our credentials is a configuration error, not an outage: it exits with one clear
    line. Redis that does not answer yet is left to the services' outage handling."""
    target = url or cfg.url
    if target is None:
        raise SystemExit("redis.url is null: start the stack with `llorch up` or set LLORCH_REDIS_URL")
    ca = str(cfg.tls_ca_file) if cfg.tls_ca_file is not None else None
    password = redis_password(cfg)
    async with Store.connect(
        target,
        cfg.key_prefix,
        password=password,
        cluster=cfg.cluster,
        username=cfg.username,
        ssl_ca_certs=ca,
    ) as store:
        await _check_auth(store, target, password is not None)
        yield store


async def _check_auth(store: Store, url: str, with_password: bool) -> None:
    try:
        await store.client.ping()
    except ConnectionError as exc:
        if "CERTIFICATE_VERIFY_FAILED" in str(exc):
            raise SystemExit(
                f"cannot trust Redis at {redacted(url)}: its TLS certificate is not signed by "
                "redis.tls_ca_file (or does not name the host of redis.url)"
            ) from None
        if not isinstance(exc, AuthenticationError):
            return  # not up yet: the services ride out an outage
        _refuse(url, with_password)
    except ResponseError as exc:
        if any(word in str(exc).upper() for word in _AUTH_WORDS):
            _refuse(url, with_password)
        raise


def _refuse(url: str, with_password: bool) -> None:
    why = "the password (or user) was refused" if with_password else "it requires a password"
    raise SystemExit(
        f"Redis at {redacted(url)} refused the connection: {why}; "
        f"set {PASSWORD_ENV} or redis.password_file (and redis.username for an ACL user)"
    )
