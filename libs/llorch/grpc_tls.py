"""TLS for the internal gRPC servers and channels (SPEC §10): pool managers on other hosts.

One :class:`~llorch.config.GrpcTlsConfig` describes a process's side of every connection: the servers it
runs present ``cert_file``/``key_file`` (and, with ``require_client_cert``, accept only clients whose
certificate ``ca_file`` signed); the channels it opens check the server against ``ca_file`` and present
the same certificate for mTLS. ``None`` keeps plaintext gRPC. TLS adds transport security; the internal
bearer token is still checked on every call (:class:`llorch.rpc.AuthInterceptor`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from pathlib import Path
from typing import Final

import grpc
import grpc.aio

from llorch.config import GrpcTlsConfig

log = logging.getLogger(__name__)


def _read(path: Path | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return path.read_bytes()
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise SystemExit(f"cannot read grpc.tls.{what} {path}: {why}") from None


def server_credentials(tls: GrpcTlsConfig) -> grpc.ServerCredentials:
    """The credentials of a TLS server; SystemExit when the config gives it no certificate."""
    cert = _read(tls.cert_file, "cert_file")
    key = _read(tls.key_file, "key_file")
    if cert is None or key is None:
        raise SystemExit("grpc.tls needs cert_file and key_file on a process that serves gRPC")
    roots = _read(tls.ca_file, "ca_file")  # read even when unused here: a bad path fails at start
    return grpc.ssl_server_credentials(
        [(key, cert)],
        root_certificates=roots if tls.require_client_cert else None,
        require_client_auth=tls.require_client_cert,
    )


def channel_credentials(tls: GrpcTlsConfig) -> grpc.ChannelCredentials:
    """The credentials of a TLS channel: ``ca_file`` roots, and our certificate for mTLS when set."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file, "ca_file"),
        private_key=_read(tls.key_file, "key_file"),
        certificate_chain=_read(tls.cert_file, "cert_file"),
    )


def open_channel(address: str, tls: GrpcTlsConfig | None) -> grpc.aio.Channel:
    """A channel to ``address``: TLS when ``tls`` is set, plaintext otherwise."""
    if tls is None:
        return grpc.aio.insecure_channel(address)
    return grpc.aio.secure_channel(address, channel_credentials(tls))


def add_port(server: grpc.aio.Server, address: str, tls: GrpcTlsConfig | None) -> int:
    """Bind ``address`` on ``server``, with TLS when ``tls`` is set; returns the bound port. Plaintext
    beyond loopback is allowed (a trusted LAN) but logged: the internal token then crosses it in clear."""
    if tls is None:
        if not _is_loopback(address):
            fields = {"event": "grpc_plaintext", "address": address, "reason": "grpc.tls is not set"}
            log.warning("gRPC served without TLS beyond loopback", extra=fields)
        return server.add_insecure_port(address)
    return server.add_secure_port(address, server_credentials(tls))


def _is_loopback(address: str) -> bool:
    host = address.rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


PROBE_TIMEOUT_S: Final = 5.0


async def tls_refusal(address: str, tls: GrpcTlsConfig, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why a TLS connection to ``address`` fails, or None when it does not (or the peer is unreachable).

    grpc reports a handshake refused by the server only as "Socket closed", and never calls the server's
    code, so neither side's log would say why. This repeats the handshake with the same files and reads
    the server's first bytes, where a refused client certificate shows up as a TLS alert."""
    context = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file is not None else None)
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    context.set_alpn_protocols(["h2"])
    host, _, port = address.rpartition(":")
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host.strip("[]"), int(port), ssl=context)
    except ssl.SSLCertVerificationError as exc:
        return f"the server's certificate is not trusted by ca_file ({exc.verify_message})"
    except ssl.SSLError as exc:
        return f"the TLS handshake failed ({exc.reason})"
    except (OSError, TimeoutError, ValueError):
        return None  # unreachable: an outage, not a TLS problem
    try:
        async with asyncio.timeout(timeout_s):
            first = await reader.read(1)  # an HTTP/2 server speaks first (its SETTINGS)
    except ssl.SSLError as exc:
        return f"the server refused our certificate ({exc.reason})"
    except (OSError, TimeoutError):
        return None
    finally:
        writer.transport.abort()  # no close_notify exchange: a server that said nothing may not answer
    if not first:  # TLS 1.3: the server checks our certificate after our side is done, then hangs up
        return "the server closed the connection after the handshake: it refused our certificate"
    return None


def with_overrides(
    tls: GrpcTlsConfig | None, ca_file: Path | None, cert_file: Path | None, key_file: Path | None
) -> GrpcTlsConfig | None:
    """``tls`` with the CLI's ``--tls-ca/--tls-cert/--tls-key`` applied (any of them turns TLS on);
    raises ``pydantic.ValidationError`` when the result is incomplete."""
    given = {"ca_file": ca_file, "cert_file": cert_file, "key_file": key_file}
    update = {key: value for key, value in given.items() if value is not None}
    if not update:
        return tls
    base = tls.model_dump() if tls is not None else {}
    return GrpcTlsConfig.model_validate({**base, **update}, strict=False)
