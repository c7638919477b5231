"""The policy routes (SPEC §2.3, §5.9): ``POST /v1/policy/evaluate`` and ``POST /v1/tools/http-fetch``.

``evaluate`` answers ``{decision, rule, decision_id, reason}``: the decision of the rules and plugins
and, where they allow, the private-network check on the host's addresses (an unresolvable host keeps
the rules' decision, and ``reason`` says its addresses were not checked).

``http-fetch`` performs the call only when the policy allows it, else 403 ``POLICY_DENIED`` with
``decision_id`` and ``rule``. The host is resolved once and the connection goes to a checked address
(:class:`PinnedResolver`; the Host header and TLS SNI stay on the name). Redirects are followed by
hand, each hop decided and checked again, at most ``policy.max_redirects``. Our own credentials never
leave: the client's ``Authorization``, ``Proxy-Authorization``, ``X-API-Key`` and ``Cookie`` headers
and hop-by-hop headers are dropped; no proxy from the environment is used. The answer is
``{decision_id, status, headers, body, body_encoding: utf-8|base64, bytes, truncated, elapsed_ms,
final_url, redirects}``, or, when the fetch itself fails, ``{decision_id, error:
timeout|connect|tls|too_many_redirects}`` (both 200). The body is cut at ``max_bytes`` (``truncated``);
the whole call, redirects included, is bounded by ``timeout_ms``; both come from the deciding rule or
the policy. Bodies are asked for uncompressed (``Accept-Encoding: identity``), so the byte bound is a
bound on what we read.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Annotated, Final, Literal

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from pydantic import BaseModel, ConfigDict, Field, StringConstraints
from yarl import URL

from llorch.errors import Code, OrchestratorError, invalid
from llorch.policy import PolicyEngine, PolicyRequest, Verdict, parse_request, redact_url

from .metrics import GatewayMetrics
from .models import parse_json_object, parse_model

log = logging.getLogger(__name__)

TOOL: Final = "http-fetch"
MAX_FETCH_BODY_BYTES: Final = 65_536
REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
# Never forwarded: our own or the caller's credentials, and what belongs to one connection (RFC 9110 §7.6.1).
_DROPPED_REQUEST: Final = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "cookie", "host", "content-length"}
    | {"connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-connection"}
    | {"accept-encoding", "x-correlation-id", "traceparent", "tracestate"}
)
_DROPPED_RESPONSE: Final = frozenset({"set-cookie", "set-cookie2", "authorization"})
_TOKEN: Final = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}$")


class EvaluateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: Annotated[str, StringConstraints(min_length=1, max_length=8192)]
    method: Literal["GET", "HEAD", "POST"] = "GET"
    tool: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")] = TOOL


class FetchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    url: Annotated[str, StringConstraints(min_length=1, max_length=8192)]
    method: Literal["GET", "HEAD", "POST"] = "GET"
    headers: Annotated[dict[str, str], Field(max_length=64)] = {}
    body: str | None = None


class FetchFailed(Exception):
    """The fetch could not complete; ``kind`` is the answer's ``error``."""

    def __init__(self, kind: str, decision_id: str = "") -> None:
        super().__init__(kind)
        self.kind = kind
        self.decision_id = decision_id


class PinnedResolver(AbstractResolver):
    """Answers every lookup with the addresses already checked, so aiohttp connects to exactly those
    (one resolver per request: the session it serves makes that one request, redirects off)."""

    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for address in self.addresses
        ]

    async def close(self) -> None:
        return None


def _json(payload: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, text=json.dumps(payload, separators=(",", ":")), content_type="application/json"
    )


def _facts(url: str, method: str, tool: str) -> PolicyRequest:
    try:
        return parse_request(url, method, tool)
    except ValueError:
        raise invalid("url", "url must be an absolute URL with a valid host and port") from None


def outbound_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The client's headers that may be forwarded; 400 for a header no HTTP message can carry."""
    named = {
        token.strip().lower()
        for key, value in headers.items()
        if key.lower() == "connection"
        for token in value.split(",")
    }
    kept: dict[str, str] = {}
    for key, value in headers.items():
        if not _TOKEN.match(key) or any(c in value for c in "\r\n\0") or len(value) > 8192:
            raise invalid("headers", "headers must be valid HTTP field names and single-line values")
        if key.lower() not in _DROPPED_REQUEST and key.lower() not in named:
            kept[key] = value
    kept["Accept-Encoding"] = "identity"
    return kept


def _response_headers(headers: Mapping[str, str]) -> dict[str, str]:
    joined: dict[str, str] = {}
    for key, value in headers.items():
        name = key.lower()
        if name not in _DROPPED_RESPONSE:
            joined[name] = f"{joined[name]}, {value}" if name in joined else value
    return joined


class PolicyApi:
    def __init__(
        self, engine: PolicyEngine, metrics: GatewayMetrics, tls: ssl.SSLContext | None = None
    ) -> None:
        self.engine = engine
        self.metrics = metrics
        self.tls = tls  # trust for upstream TLS; None: the system's roots, with hostname checks

    def record(
        self, facts: PolicyRequest, verdict: Verdict, started: float, bytes_in: int = 0, bytes_out: int = 0
    ) -> None:
        """Log and count one decision (the URL redacted; no header or body ever logged)."""
        url = redact_url(facts.url)
        latency_ms = int((time.monotonic() - started) * 1000)
        self.metrics.policy_decisions.labels(verdict.decision, verdict.metric_rule).inc()
        log.info(
            "policy %s: %s %s %s (rule %s, decision_id %s)",
            verdict.decision,
            facts.tool,
            facts.method,
            url,
            verdict.rule,
            verdict.decision_id,
            extra={
                "event": "policy_decision",
                "decision_id": verdict.decision_id,
                "tool": facts.tool,
                "method": facts.method,
                "url_redacted": url,
                "decision": verdict.decision,
                "rule": verdict.rule,
                "plugin": verdict.plugin,
                "bytes_in": bytes_in,
                "bytes_out": bytes_out,
                "latency_ms": latency_ms,
            },
        )

    async def evaluate(self, request: web.Request) -> web.Response:
        started = time.monotonic()
        body = parse_model(EvaluateRequest, parse_json_object(await request.read()))
        facts = _facts(body.url, body.method, body.tool)
        verdict = await self.engine.decide(facts)
        reason = verdict.reason
        if verdict.allowed:
            try:
                verdict, _ = await self.engine.pin(facts, verdict)
                reason = verdict.reason
            except OSError:
                reason = f"{reason}; the host does not resolve, so its addresses were not checked"
        self.record(facts, verdict, started)
        return _json(
            {
                "decision": verdict.decision,
                "rule": verdict.rule,
                "decision_id": verdict.decision_id,
                "reason": reason,
            }
        )

    async def fetch(self, request: web.Request) -> web.Response:
        body = parse_model(FetchRequest, parse_json_object(await request.read()))
        payload = body.body.encode() if body.body is not None else None
        if payload is not None and len(payload) > MAX_FETCH_BODY_BYTES:
            raise invalid("body", f"body must be at most {MAX_FETCH_BODY_BYTES} bytes (UTF-8)")
        if payload is not None and body.method != "POST":
            raise invalid("body", "only a POST carries a body")
        headers = outbound_headers(body.headers)
        facts = _facts(body.url, body.method, TOOL)
        return _json(await self._follow(facts, headers, payload))

    async def _decide(self, facts: PolicyRequest, started: float) -> tuple[Verdict, list[str]]:
        verdict = await self.engine.decide(facts)
        addresses: list[str] = []
        if verdict.allowed:
            try:
                verdict, addresses = await self.engine.pin(facts, verdict)
            except OSError as exc:  # TimeoutError included
                self.record(facts, verdict, started)
                kind = "timeout" if isinstance(exc, TimeoutError) else "connect"
                raise FetchFailed(kind, verdict.decision_id) from None
        if not verdict.allowed:
            self.record(facts, verdict, started)
            raise OrchestratorError(
                Code.POLICY_DENIED,
                f"the policy denied {facts.method} {redact_url(facts.url)}: {verdict.reason}",
                decision_id=verdict.decision_id,
                rule=verdict.rule,
            )
        return verdict, addresses

    async def _follow(
        self, facts: PolicyRequest, headers: dict[str, str], payload: bytes | None
    ) -> dict[str, object]:
        started = time.monotonic()
        first_id: str | None = None
        deadline: float | None = None
        for hop in range(self.engine.cfg.max_redirects + 1):
            hop_started = time.monotonic()
            try:
                verdict, addresses = await self._decide(facts, hop_started)
            except FetchFailed as exc:
                return {"decision_id": first_id or exc.decision_id, "error": exc.kind}
            first_id = first_id or verdict.decision_id
            deadline = deadline or started + verdict.timeout_ms / 1000
            try:
                answer = await self._one(facts, addresses, headers, payload, verdict, deadline)
            except FetchFailed as exc:
                self.record(facts, verdict, hop_started, bytes_out=len(payload or b""))
                return {"decision_id": first_id, "error": exc.kind}
            status, got_headers, data, truncated = answer
            self.record(facts, verdict, hop_started, bytes_in=len(data), bytes_out=len(payload or b""))
            location = got_headers.get("location")
            if status not in REDIRECTS or location is None:
                return _answer(first_id, status, got_headers, data, truncated, started, facts, hop)
            try:
                target = URL(facts.url).join(URL(location))
                if target.user is not None:  # credentials in a Location are the upstream's: drop them
                    target = target.with_user(None)
            except ValueError:
                return {"decision_id": first_id, "error": "connect"}
            method = facts.method
            if status == 303 or (status in (301, 302) and method == "POST"):
                method, payload = ("HEAD" if method == "HEAD" else "GET"), None
            next_facts = parse_request_or_refusal(str(target), method)
            if next_facts is None:
                return {"decision_id": first_id, "error": "connect"}
            facts = next_facts
        return {"decision_id": first_id or "", "error": "too_many_redirects"}

    async def _one(
        self,
        facts: PolicyRequest,
        addresses: list[str],
        headers: dict[str, str],
        payload: bytes | None,
        verdict: Verdict,
        deadline: float,
    ) -> tuple[int, dict[str, str], bytes, bool]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchFailed("timeout")
        url = URL(facts.url)
        if facts.ip is not None:  # an encoded literal (0x7f.1) is sent as the address it was checked as
            url = url.with_host(str(facts.ip))
        connector = aiohttp.TCPConnector(
            resolver=PinnedResolver(addresses),
            use_dns_cache=False,
            force_close=True,
            limit=1,
            ssl=self.tls if self.tls is not None else True,
        )
        try:
            async with (
                aiohttp.ClientSession(
                    connector=connector,
                    trust_env=False,  # no proxy from the environment: it would see the request first
                    cookie_jar=aiohttp.DummyCookieJar(),
                    auto_decompress=False,
                    timeout=aiohttp.ClientTimeout(total=remaining),
                ) as session,
                session.request(
                    facts.method, url, headers=headers, data=payload, allow_redirects=False
                ) as response,
            ):
                data = bytearray()
                truncated = False
                async for chunk in response.content.iter_chunked(65_536):
                    data += chunk
                    if len(data) > verdict.max_bytes:
                        del data[verdict.max_bytes :]
                        truncated = True
                        break
                return response.status, _response_headers(response.headers), bytes(data), truncated
        except TimeoutError:
            raise FetchFailed("timeout") from None
        except (aiohttp.ClientSSLError, aiohttp.ServerFingerprintMismatch):
            raise FetchFailed("tls") from None
        except (aiohttp.ClientError, OSError, ValueError):
            raise FetchFailed("connect") from None


def parse_request_or_refusal(url: str, method: str) -> PolicyRequest | None:
    """The facts of a redirect target, or None when the Location is no usable URL."""
    try:
        return parse_request(url, method, TOOL)
    except ValueError:
        return None


def _answer(
    decision_id: str,
    status: int,
    headers: dict[str, str],
    data: bytes,
    truncated: bool,
    started: float,
    facts: PolicyRequest,
    redirects: int,
) -> dict[str, object]:
    try:
        text, encoding = data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        text, encoding = base64.b64encode(data).decode("ascii"), "base64"
    return {
        "decision_id": decision_id,
        "status": status,
        "headers": headers,
        "body": text,
        "body_encoding": encoding,
        "bytes": len(data),
        "truncated": truncated,
        "elapsed_ms": int((time.monotonic() - started) * 1000),
        "final_url": facts.url,
        "redirects": redirects,
    }


def add_routes(
    app: web.Application,
    engine: PolicyEngine,
    metrics: GatewayMetrics,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Register the two routes; the engine is closed with the app. ``tls``: the trust for upstream
    TLS (None: the system's roots)."""
    api = PolicyApi(engine, metrics, tls)
    app.router.add_post("/v1/policy/evaluate", api.evaluate)
    app.router.add_post("/v1/tools/http-fetch", api.fetch)

    async def close(_: web.Application) -> None:
        await engine.aclose()

    app.on_cleanup.append(close)
