"""gRPC over TLS between hosts (SPEC §10): the scheduler, the gateway and a local pool manager on
127.0.0.1 with mTLS from the config, a second pool manager "on another host" (127.0.0.2) given its
certificate by `--tls-ca/--tls-cert/--tls-key`; a task is served there. A pool manager whose certificate
another CA signed is refused at the handshake (logged by the pool manager: grpc never calls the
scheduler's code for it), and one with a good certificate and a wrong internal token is refused by the
scheduler, which logs `poolmgr_refused`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llorch.config import GrpcTlsConfig, load_config
from llorch.grpc_tls import open_channel, tls_refusal
from llorch.lifecycle import grpc_server
from tests.support.certs import CertFiles, TestCa
from tests.support.procs import Proc, free_port, python_module, wait_until
from tests.support.stack import MOCK_MODEL, Client, Stack, mock_pool

REMOTE_HOST = "gpu-box-2"
REMOTE_IP = "127.0.0.2"
READY_S = 60.0


def _events(text: str, event: str) -> list[dict[str, Any]]:
    found = []
    for raw in text.splitlines():
        if raw.startswith("{"):
            try:
                line = json.loads(raw)
            except json.JSONDecodeError:
                continue
            if line.get("event") == event:
                found.append(line)
    return found


def _tls(ca: TestCa, cert: CertFiles) -> dict[str, Any]:
    return {
        "ca_file": str(ca.ca_file),
        "cert_file": str(cert.cert),
        "key_file": str(cert.key),
        "require_client_cert": True,
    }


def _their_config(stack: Stack, tmp_path: Path) -> Path:
    """gpu-box-2's copy of the config: no TLS files of ours (its flags give its own), and a scheduler
    address that is not there (--scheduler is what it dials)."""
    theirs = yaml.safe_load(stack.config_path.read_text())
    del theirs["grpc"]["tls"]
    theirs["grpc"]["scheduler"] = f"127.0.0.1:{free_port()}"
    path = tmp_path / "gpu-box-2.yaml"
    path.write_text(yaml.safe_dump(theirs))
    return path


def _flags(ca: TestCa, cert: CertFiles, index: int, scheduler: str) -> list[str]:
    return [
        *("--host", REMOTE_HOST, "--listen", REMOTE_IP, "--advertise", REMOTE_IP),
        *("--scheduler", scheduler, "--index", str(index)),
        *("--tls-ca", str(ca.ca_file), "--tls-cert", str(cert.cert), "--tls-key", str(cert.key)),
    ]


async def _logged(proc: Proc, event: str, what: str) -> dict[str, Any]:
    async def seen() -> bool:
        return bool(_events(proc.log_text(), event))

    await wait_until(seen, READY_S, what)
    return _events(proc.log_text(), event)[0]


async def test_pool_managers_on_another_host_over_mtls(
    stack_factory: Any, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    ca, rogue_ca = TestCa(tmp_path / "ca"), TestCa(tmp_path / "rogue-ca", "another CA")
    local, remote, rogue = ca.issue("local"), ca.issue("gpu-box-2"), rogue_ca.issue("rogue")
    pools = [mock_pool("mock-a"), mock_pool("mock-remote", host=REMOTE_HOST, model="mock-remote", ctx=4096)]
    models = [{"id": "mock-tiny", "path": str(MOCK_MODEL)}, {"id": "mock-remote", "path": str(MOCK_MODEL)}]
    stack: Stack = stack_factory(pools=pools, models=models, extra={"grpc": {"tls": _tls(ca, local)}})
    cfg = load_config(stack.config_path, env={})
    their_config = _their_config(stack, tmp_path)
    await stack.start(ready=False)  # scheduler, gateway and the local pool manager: all over mTLS
    stack.start_pool_manager(
        _flags(ca, remote, 1, cfg.grpc.scheduler), name="pool-manager-gpu-box-2", config=their_config
    )
    await stack.wait_ready(READY_S)
    await stack.wait_pools_ready("mock-a", "mock-remote", timeout_s=READY_S)

    client = Client(stack, http)
    task_id = await client.admit(model_ref="mock-remote", max_tokens=3)
    events = await client.events(task_id)
    assert events[-1].event == "end", [e.event for e in events]
    status = await client.status(task_id)
    assert status["state"] == "succeeded" and status["pool_id"] == "mock-remote", status

    # A certificate from another CA: the scheduler's TLS layer refuses it before any of our code runs,
    # so the pool manager's log is where it shows.
    wrong_cert = stack.start_pool_manager(
        _flags(ca, rogue, 2, cfg.grpc.scheduler), name="pool-manager-rogue-cert", config=their_config
    )
    refused = await _logged(wrong_cert, "register_refused", "the rogue certificate to be refused")
    assert "TLS handshake with the scheduler failed" in refused["reason"], refused
    # A good certificate and a wrong internal token: the scheduler refuses the call and logs it.
    wrong_token = stack.start_pool_manager(
        _flags(ca, remote, 3, cfg.grpc.scheduler),
        name="pool-manager-wrong-token",
        config=their_config,
        env={"LLORCH_INTERNAL_TOKEN": "not-the-internal-token"},
    )
    refused = await _logged(wrong_token, "register_refused", "the wrong token to be refused")
    assert refused["reason"] == "the scheduler refused the internal token", refused
    logged = await _logged(stack.procs["scheduler"], "poolmgr_refused", "the scheduler to log the refusal")
    assert logged["reason"] == "internal token wrong" and "127.0.0.1" in logged["address"], logged
    assert logged["path"] == "/llorch.v1.Scheduler/RegisterPoolManager", logged

    registered = {
        e["address"] for e in _events(stack.procs["scheduler"].log_text(), "pool_manager_registered")
    }
    rogue_addresses = {f"{REMOTE_IP}:{cfg.grpc.pool_manager_base_port + n}" for n in (2, 3)}
    assert f"{REMOTE_IP}:{cfg.grpc.pool_manager_base_port + 1}" in registered, registered
    assert not registered & rogue_addresses, registered
    logs = stack.logs()
    assert "not-the-internal-token" not in logs and stack.env["LLORCH_INTERNAL_TOKEN"] not in logs


async def test_a_tls_server_refuses_plaintext_and_unknown_clients(tmp_path: Path) -> None:
    """Under require_client_cert a server answers only a TLS client with a certificate our CA signed;
    a plaintext client, one without a certificate, one with another CA's and one that does not trust
    the server's CA get nothing."""
    ca, rogue_ca = TestCa(tmp_path / "ca"), TestCa(tmp_path / "rogue-ca", "another CA")
    server_cert, client_cert, rogue = ca.issue("server"), ca.issue("client"), rogue_ca.issue("rogue")
    server_tls = GrpcTlsConfig.model_validate(_tls(ca, server_cert), strict=False)
    address = f"127.0.0.1:{free_port()}"
    clients = {
        "plaintext": None,
        "no certificate": GrpcTlsConfig(ca_file=ca.ca_file),
        "another CA's certificate": GrpcTlsConfig(
            ca_file=ca.ca_file, cert_file=rogue.cert, key_file=rogue.key
        ),
        "untrusted server": GrpcTlsConfig(
            ca_file=rogue_ca.ca_file, cert_file=client_cert.cert, key_file=client_cert.key
        ),
        "ours": GrpcTlsConfig(ca_file=ca.ca_file, cert_file=client_cert.cert, key_file=client_cert.key),
    }
    answered = set()
    async with grpc_server(address, "internal-token", lambda _server: None, server_tls):
        for name, tls in clients.items():
            async with open_channel(address, tls) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                try:
                    reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, (name, exc.code())
                    continue
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                answered.add(name)
            if tls is not None and name != "ours":  # what the pool manager logs in this case
                assert await tls_refusal(address, tls) is not None, name
        assert await tls_refusal(address, clients["ours"]) is None
    assert answered == {"ours"}


async def test_a_certificate_without_its_key_is_refused(stack_factory: Any) -> None:
    flags = ["--tls-cert", "c.pem"]
    message = "grpc.tls.key_file: cert_file and key_file go together"
    stack: Stack = stack_factory(pools=[mock_pool()])
    argv = python_module("llorch_cli.main", "pool-manager", *flags, "--config", str(stack.config_path))
    proc = await asyncio.create_subprocess_exec(
        *argv, env={**os.environ, **stack.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _out, err = await asyncio.wait_for(proc.communicate(), READY_S)
    assert proc.returncode == 2 and message in err.decode(), err.decode()
    assert "Traceback" not in err.decode()


async def test_plaintext_grpc_beyond_loopback_is_logged(caplog: Any) -> None:
    for address, warned in (("127.0.0.2:0", False), ("0.0.0.0:0", True)):
        caplog.clear()
        async with grpc_server(address, "internal-token", lambda _server: None):
            pass
        events = [getattr(r, "event", None) for r in caplog.records]
        assert ("grpc_plaintext" in events) == warned, (address, events)
