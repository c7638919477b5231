"""The http-fetch tool in process (SPEC §5.9): real HTTP servers on loopback addresses, a resolver the
test controls (DNS pinning), header hygiene, redirects and the byte and time bounds."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from llorch.config import PolicyConfig
from llorch.policy import PolicyEngine
from llorch_gateway import policy_api
from llorch_gateway.edge import METRICS, edge
from llorch_gateway.metrics import GatewayMetrics
from tests.support.procs import free_port

UPSTREAM_HOST = "127.0.0.2"  # any 127/8 address is local on Linux; the rules below allow it by name


@dataclass
class Upstream:
    url: str
    port: int
    seen: list[web.Request] = field(default_factory=list)
    hang: asyncio.Event = field(default_factory=asyncio.Event)


async def _upstream_app(up: Upstream) -> web.Application:
    async def echo(request: web.Request) -> web.Response:
        up.seen.append(request)
        body = await request.read()
        response = web.json_response(
            {"method": request.method, "headers": dict(request.headers), "body": body.decode()}
        )
        response.set_cookie("session", "upstream-secret")
        return response

    async def big(request: web.Request) -> web.Response:
        up.seen.append(request)
        return web.Response(body=b"x" * 5000)

    async def binary(request: web.Request) -> web.Response:
        return web.Response(body=bytes(range(256)))

    async def slow(request: web.Request) -> web.Response:
        await up.hang.wait()  # released at teardown; the fetch's own timeout ends the call first
        return web.Response(text="late")

    async def loop(request: web.Request) -> web.Response:
        up.seen.append(request)
        raise web.HTTPFound("/loop")

    async def hop(request: web.Request) -> web.Response:
        raise web.HTTPSeeOther("/echo")

    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/big", big)
    app.router.add_get("/binary", binary)
    app.router.add_get("/slow", slow)
    app.router.add_get("/loop", loop)
    app.router.add_post("/hop", hop)
    return app


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    port = free_port()
    up = Upstream(f"http://pinned.test:{port}", port)
    runner = web.AppRunner(await _upstream_app(up))
    await runner.setup()
    await web.TCPSite(runner, UPSTREAM_HOST, port).start()
    yield up
    up.hang.set()
    await runner.cleanup()


Fetch = Callable[..., Awaitable[tuple[int, dict[str, Any]]]]


@dataclass(frozen=True)
class Cert:
    cert: Path
    key: Path


def _self_signed(directory: Path, name: str) -> Cert:
    """A self-signed certificate for the DNS name ``name`` (its own trust anchor); the same name
    gives the same files within a test."""
    cert, key_path = directory / f"{name}.pem", directory / f"{name}.key"
    if cert.exists():
        return Cert(cert, key_path)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return Cert(cert, key_path)


@pytest.fixture
async def gateway(
    upstream: Upstream, tmp_path: Path
) -> AsyncIterator[tuple[Fetch, list[str], GatewayMetrics]]:
    """A gateway app with only the policy routes; `pinned.test` resolves to the upstream's address."""
    lookups: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        if host == "nxdomain.test":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [UPSTREAM_HOST]

    cfg = PolicyConfig.model_validate(
        {
            "max_redirects": 2,
            "rules": [
                {
                    "id": "small",
                    "action": "allow",
                    "hosts": ["pinned.test"],
                    "methods": ["GET"],
                    "max_bytes": 1000,
                },
                {"id": "lab", "action": "allow", "hosts": ["pinned.test"], "timeout_ms": 300},
            ],
        }
    )
    metrics = GatewayMetrics(CollectorRegistry())
    app = web.Application(middlewares=[edge])
    app[METRICS] = metrics
    trust = ssl.create_default_context(cadata=_self_signed(tmp_path, "pinned.test").cert.read_text())
    policy_api.add_routes(app, PolicyEngine(cfg, resolve=resolve), metrics, trust)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    async with aiohttp.ClientSession() as http:

        async def fetch(**body: Any) -> tuple[int, dict[str, Any]]:
            lookups.clear()
            async with http.post(f"http://127.0.0.1:{port}/v1/tools/http-fetch", json=body) as r:
                return r.status, await r.json()

        yield fetch, lookups, metrics
    await runner.cleanup()


async def test_the_connection_goes_to_the_checked_address_with_the_name_in_host(
    upstream: Upstream, gateway: tuple[Fetch, list[str], GatewayMetrics]
) -> None:
    fetch, lookups, metrics = gateway
    status, body = await fetch(url=f"{upstream.url}/echo?q=1")
    assert status == 200 and body["status"] == 200, body
    echoed = json.loads(body["body"])
    assert echoed["headers"]["Host"] == f"pinned.test:{upstream.port}"
    assert lookups == ["pinned.test"]  # resolved once: the rebinding answer was never asked for
    assert body["decision_id"].startswith("pd-") and body["final_url"] == f"{upstream.url}/echo?q=1"
    assert (body["body_encoding"], body["truncated"], body["redirects"]) == ("utf-8", False, 0)
    assert (
        metrics.registry.get_sample_value("policy_decisions_total", {"decision": "allow", "rule": "small"})
        == 1
    )


async def test_credentials_and_hop_by_hop_headers_never_leave_and_cookies_never_return(
    upstream: Upstream, gateway: tuple[Fetch, list[str], GatewayMetrics]
) -> None:
    fetch, _, _ = gateway
    sent = {
        "Authorization": "Bearer ours",
        "X-API-Key": "ours",
        "Cookie": "a=b",
        "Proxy-Authorization": "Basic x",
        "Connection": "X-Private-Hop",
        "X-Private-Hop": "1",
        "Transfer-Encoding": "chunked",
        "X-Keep": "yes",
    }
    status, body = await fetch(url=f"{upstream.url}/echo", method="POST", headers=sent, body="hello")
    assert status == 200 and body["status"] == 200, body
    echoed = json.loads(body["body"])
    got = {k.lower() for k in echoed["headers"]}
    assert echoed["headers"]["X-Keep"] == "yes" and echoed["body"] == "hello"
    for name in ("authorization", "x-api-key", "cookie", "proxy-authorization", "x-private-hop"):
        assert name not in got, name
    assert echoed["headers"]["Accept-Encoding"] == "identity"
    assert "set-cookie" not in body["headers"] and "content-type" in body["headers"]


async def test_bodies_are_cut_at_the_rules_max_bytes_and_binary_comes_as_base64(
    upstream: Upstream, gateway: tuple[Fetch, list[str], GatewayMetrics]
) -> None:
    fetch, _, _ = gateway
    _, body = await fetch(url=f"{upstream.url}/big")
    assert (body["bytes"], body["truncated"], len(body["body"])) == (1000, True, 1000)
    _, body = await fetch(url=f"{upstream.url}/binary")
    assert body["body_encoding"] == "base64" and base64.b64decode(body["body"]) == bytes(range(256))


async def test_the_rules_timeout_bounds_the_call(
    upstream: Upstream, gateway: tuple[Fetch, list[str], GatewayMetrics]
) -> None:
    fetch, _, _ = gateway
    status, body = await fetch(url=f"{upstream.url}/slow", method="HEAD")  # HEAD: the `lab` rule, 300 ms
    assert status == 200 and body["error"] == "timeout" and body["decision_id"].startswith("pd-"), body


async def test_redirects_are_followed_within_the_bound(
    upstream: Upstream, gateway: tuple[Fetch, list[str], GatewayMetrics]
) -> None:
    fetch, lookups, _ = gateway
    status, body = await fetch(url=f"{upstream.url}/hop", method="POST", body="x")
    assert status == 200 and body["status"] == 200 and body["redirects"] == 1, body
    assert json.loads(body["body"])["method"] == "GET"  # 303: GET without the body
    assert body["final_url"] == f"{upstream.url}/echo"
    upstream.seen.clear()
    status, body = await fetch(url=f"{upstream.url}/loop")
    assert status == 200 and body["error"] == "too_many_redirects", body
    assert len(upstream.seen) == 3  # the first request and max_redirects (2) more
    assert lookups == ["pinned.test"] * 3  # every hop is decided and resolved again


async def test_a_host_that_does_not_resolve_is_a_connect_error(
    gateway: tuple[Fetch, list[str], GatewayMetrics],
) -> None:
    fetch, lookups, metrics = gateway
    status, body = await fetch(url="http://nxdomain.test/x")
    assert status == 200 and body["error"] == "connect" and body["decision_id"].startswith("pd-"), body
    assert lookups == ["nxdomain.test"]
    assert (
        metrics.registry.get_sample_value("policy_decisions_total", {"decision": "allow", "rule": "default"})
        == 1
    )


@pytest.mark.parametrize(("name", "outcome"), [("pinned.test", 200), ("other.test", "tls")])
async def test_tls_goes_to_the_pinned_address_with_the_name_in_sni_and_checks_the_name(
    gateway: tuple[Fetch, list[str], GatewayMetrics], tmp_path: Path, name: str, outcome: object
) -> None:
    """The gateway trusts only pinned.test's certificate: a server on the pinned address that shows
    another name's certificate is a `tls` error. Either way the ClientHello named pinned.test."""
    fetch, lookups, _ = gateway
    served = _self_signed(tmp_path, name)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(served.cert, served.key)
    sni: list[str | None] = []

    def record_sni(sock: ssl.SSLObject, server_name: str | None, ctx: ssl.SSLContext) -> None:
        sni.append(server_name)

    context.sni_callback = record_sni

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"tls hello, host {request.host}")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, UPSTREAM_HOST, port, ssl_context=context).start()
    try:
        status, body = await fetch(url=f"https://pinned.test:{port}/")
    finally:
        await runner.cleanup()
    assert status == 200 and lookups == ["pinned.test"] and sni == ["pinned.test"], (body, sni)
    if outcome == 200:
        assert (body["status"], body["body"]) == (200, f"tls hello, host pinned.test:{port}"), body
    else:
        assert body["error"] == outcome, body
