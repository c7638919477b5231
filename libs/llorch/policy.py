"""The outbound policy hook (SPEC §5.9): may a tool call reach this URL?

A decision takes the first match in this order: built-in refusals (a scheme other than http/https,
a host that is no valid name or IP); the config's ``deny`` rules; the plugins, in ``policy.plugins``
order (the first that does not abstain wins); the config's ``allow`` rules; ``policy.default``.

Then, under ``policy.deny_private_networks`` (the default), :meth:`PolicyEngine.pin` resolves the host
once and refuses it if any of its addresses is not public (:mod:`llorch.netguard`), unless the
deciding rule is an allow rule that *names* the host (a pattern without glob characters). The
addresses it returns are the ones a fetch must connect to, so that a second resolution cannot swap in
another address (DNS rebinding).

Plugins are entry points in the group ``llorch.policy``; only those named in config are loaded. Each
is an object (or a class, instantiated without arguments) with ``api_version = 1`` and
``decide(req: PolicyRequest) -> PolicyDecision | None``; ``decide`` may be a coroutine function. A
plugin that raises, answers something else, or takes longer than ``plugin_timeout_ms`` counts as a
deny with rule ``plugin-error``, logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import fnmatch
import inspect
import logging
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from typing import Final, Literal, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from yarl import URL

from llorch.config import PolicyConfig, PolicyRule
from llorch.netguard import HostError, IPAddress, Resolve, blocked_reason, parse_host_ip, system_resolve

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP: Final = "llorch.policy"
PLUGIN_API_VERSION: Final = 1
SCHEMES: Final = ("http", "https")
DEFAULT_PORTS: Final = {"http": 80, "https": 443}
_GLOB_CHARS: Final = frozenset("*?[")
_PLUGIN_WORKERS: Final = 4

# Built-in rule names (config.POLICY_BUILTIN_RULES): what `rule` says when no config rule or plugin decided.
RULE_DEFAULT: Final = "default"
RULE_SCHEME: Final = "scheme"
RULE_INVALID_HOST: Final = "invalid-host"
RULE_PLUGIN_ERROR: Final = "plugin-error"
RULE_PRIVATE_NETWORK: Final = "private-network"

Decision = Literal["allow", "deny"]


@dataclass(frozen=True)
class PolicyRequest:
    """The facts of one outbound call a decision may use. ``host`` is lower case, without the
    trailing dot; an IP literal in any encoding is given in its canonical form."""

    url: str
    scheme: str
    host: str
    port: int
    method: str
    tool: str
    ip: IPAddress | None = None


@dataclass(frozen=True)
class PolicyDecision:
    """A plugin's answer: ``rule`` names what decided (shown to the caller), ``reason`` says why."""

    decision: Decision
    rule: str
    reason: str = ""


@runtime_checkable
class PolicyPlugin(Protocol):
    """An entry point of group ``llorch.policy``; ``decide`` returns None to abstain."""

    api_version: int

    def decide(self, req: PolicyRequest) -> PolicyDecision | None: ...


@dataclass(frozen=True)
class Verdict:
    """The engine's decision on one request, with the fetch limits the deciding rule sets."""

    decision_id: str
    decision: Decision
    rule: str
    reason: str
    plugin: str | None
    max_bytes: int
    timeout_ms: int
    names_host: bool = False  # an allow rule that names the host decided: its private addresses are fine

    @property
    def allowed(self) -> bool:
        return self.decision == "allow"

    @property
    def metric_rule(self) -> str:
        """The rule as a metric label: a plugin's own rule names are not bounded, its name is."""
        return f"plugin:{self.plugin}" if self.plugin else self.rule


class PolicyLoadError(Exception):
    """A plugin named in config cannot be loaded; the gateway must not start without it."""


def parse_request(url: str, method: str, tool: str) -> PolicyRequest:
    """The facts of ``url``; raises ValueError for a string that is not an absolute URL.

    The URL is read by yarl, the parser aiohttp connects with, so that the host decided on is the
    host connected to (no parser differential).
    """
    parsed = URL(url)  # ValueError: bad authority, port out of range...
    scheme = parsed.scheme.lower()
    if not scheme or (scheme in SCHEMES and not parsed.absolute):
        raise ValueError("url must be an absolute http or https URL")
    host = (parsed.raw_host or "").rstrip(".")
    ip: IPAddress | None = None
    with contextlib.suppress(HostError):  # kept as written; decide() refuses it as an invalid host
        ip = parse_host_ip(host) if host else None
    return PolicyRequest(
        url=url,
        scheme=scheme,
        host=str(ip) if ip is not None else host.lower(),
        port=parsed.explicit_port or DEFAULT_PORTS.get(scheme, 0),
        method=method.upper(),
        tool=tool,
        ip=ip,
    )


def redact_url(url: str) -> str:
    """``url`` for logs: no userinfo, every query value replaced with ``REDACTED``, no fragment."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        query = urlencode(
            [(k, "REDACTED") for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*"
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))
    except ValueError:
        return "<unparsable url>"


def _names(pattern: str, req: PolicyRequest) -> bool:
    """Whether a plain (glob-free) host pattern names the request's host."""
    if _GLOB_CHARS & set(pattern):
        return False
    try:
        ip = parse_host_ip(pattern)
    except HostError:
        return False
    return (str(ip) if ip is not None else pattern.lower().rstrip(".")) == req.host


def _host_matches(pattern: str, req: PolicyRequest) -> bool:
    return _names(pattern, req) or fnmatch.fnmatchcase(req.host, pattern.lower().rstrip("."))


def rule_matches(rule: PolicyRule, req: PolicyRequest) -> bool:
    """Whether ``rule`` matches ``req``: host glob, scheme, method and port all match."""
    return (
        req.scheme in rule.schemes
        and req.method in rule.methods
        and (rule.ports is None or req.port in rule.ports)
        and any(_host_matches(pattern, req) for pattern in rule.hosts)
    )


def load_plugins(
    names: Sequence[str],
    entry_points: Callable[..., Iterable[metadata.EntryPoint]] = metadata.entry_points,
) -> list[tuple[str, PolicyPlugin]]:
    """Load the plugins named in config from group ``llorch.policy``, in config order."""
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    plugins: list[tuple[str, PolicyPlugin]] = []
    for name in names:
        if name not in found:
            raise PolicyLoadError(f"policy.plugins: no entry point {name!r} in group {ENTRY_POINT_GROUP}")
        try:
            obj = found[name].load()
            plugin = obj() if inspect.isclass(obj) else obj
        except Exception as exc:  # a plugin's import is third-party code: any failure is a load error
            raise PolicyLoadError(f"policy.plugins: {name!r} failed to load ({type(exc).__name__})") from exc
        if not isinstance(plugin, PolicyPlugin) or plugin.api_version != PLUGIN_API_VERSION:
            raise PolicyLoadError(
                f"policy.plugins: {name!r} must have api_version = {PLUGIN_API_VERSION} and a decide()"
            )
        plugins.append((name, plugin))
    return plugins


class PolicyEngine:
    """Decides outbound calls from the config's rules and the loaded plugins; see the module doc."""

    def __init__(
        self,
        cfg: PolicyConfig,
        plugins: Sequence[tuple[str, PolicyPlugin]] = (),
        resolve: Resolve = system_resolve,
    ) -> None:
        self.cfg = cfg
        self._plugins = list(plugins)
        self._resolve = resolve
        self._deny = [r for r in cfg.rules if r.action == "deny"]
        self._allow = [r for r in cfg.rules if r.action == "allow"]
        # Sync plugins run here, so that one that hangs holds a worker, not the event loop.
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def _verdict(
        self,
        decision: Decision,
        rule: str,
        reason: str,
        plugin: str | None = None,
        source: PolicyRule | None = None,
        names_host: bool = False,
    ) -> Verdict:
        return Verdict(
            decision_id=f"pd-{uuid.uuid4().hex}",
            decision=decision,
            rule=rule,
            reason=reason,
            plugin=plugin,
            max_bytes=(source.max_bytes if source and source.max_bytes else None) or self.cfg.max_bytes,
            timeout_ms=(source.timeout_ms if source and source.timeout_ms else None) or self.cfg.timeout_ms,
            names_host=names_host,
        )

    async def decide(self, req: PolicyRequest) -> Verdict:
        """The decision on ``req`` by rules and plugins (no name resolution)."""
        if req.scheme not in SCHEMES:
            return self._verdict("deny", RULE_SCHEME, "only http and https URLs may be fetched")
        try:
            parse_host_ip(req.host)
        except HostError as exc:
            return self._verdict("deny", RULE_INVALID_HOST, str(exc))
        for rule in self._deny:
            if rule_matches(rule, req):
                return self._verdict("deny", rule.id, "a deny rule matches", source=rule)
        for name, plugin in self._plugins:
            answer = await self._ask(name, plugin, req)
            if answer is not None:
                return answer
        for rule in self._allow:
            if rule_matches(rule, req):
                named = any(_names(p, req) for p in rule.hosts)
                return self._verdict("allow", rule.id, "an allow rule matches", source=rule, names_host=named)
        return self._verdict(
            self.cfg.default, RULE_DEFAULT, f"no rule matches; policy.default is {self.cfg.default}"
        )

    async def _ask(self, name: str, plugin: PolicyPlugin, req: PolicyRequest) -> Verdict | None:
        timeout_s = self.cfg.plugin_timeout_ms / 1000
        try:
            async with asyncio.timeout(timeout_s):
                if inspect.iscoroutinefunction(plugin.decide):
                    answer: object = await plugin.decide(req)
                else:
                    if self._executor is None:
                        self._executor = concurrent.futures.ThreadPoolExecutor(
                            _PLUGIN_WORKERS, thread_name_prefix="policy-plugin"
                        )
                    loop = asyncio.get_running_loop()
                    answer = await loop.run_in_executor(self._executor, plugin.decide, req)
        except TimeoutError:
            log.warning(
                "policy plugin timed out",
                extra={"event": "policy_plugin_error", "what": name, "reason": "timeout"},
            )
            return self._verdict("deny", RULE_PLUGIN_ERROR, f"plugin {name} timed out", plugin=name)
        except Exception as exc:  # third-party code: whatever it raises is a deny, never a 500
            log.warning(
                "policy plugin failed",
                extra={"event": "policy_plugin_error", "what": name, "error": type(exc).__name__},
            )
            return self._verdict("deny", RULE_PLUGIN_ERROR, f"plugin {name} failed", plugin=name)
        if answer is None:
            return None
        if not isinstance(answer, PolicyDecision) or answer.decision not in ("allow", "deny"):
            log.warning(
                "policy plugin answered no PolicyDecision",
                extra={"event": "policy_plugin_error", "what": name, "error": type(answer).__name__},
            )
            return self._verdict(
                "deny", RULE_PLUGIN_ERROR, f"plugin {name} gave no valid answer", plugin=name
            )
        return self._verdict(
            answer.decision, str(answer.rule)[:64] or name, str(answer.reason)[:256], plugin=name
        )

    async def pin(self, req: PolicyRequest, verdict: Verdict) -> tuple[Verdict, list[str]]:
        """The addresses an allowed request may connect to, resolved once, and the verdict after the
        private-network check (a deny naming the first refused address). Raises OSError when the
        host does not resolve, TimeoutError (an OSError) when that takes over ``policy.timeout_ms``."""
        if req.ip is not None:
            addresses = [str(req.ip)]
        else:
            async with asyncio.timeout(self.cfg.timeout_ms / 1000):  # a system resolver can hang
                addresses = await self._resolve(req.host, req.port)
        if not addresses:
            raise OSError("the host has no address")
        if not verdict.allowed or not self.cfg.deny_private_networks or verdict.names_host:
            return verdict, addresses
        for address in addresses:
            try:
                reason = blocked_reason(parse_host_ip(address) or _never(address))
            except HostError:
                reason = "reserved"
            if reason is not None:
                refused = self._verdict(
                    "deny",
                    RULE_PRIVATE_NETWORK,
                    f"the host resolves to a {reason} address ({address})",
                )
                return replace(refused, decision_id=verdict.decision_id), addresses
        return verdict, addresses

    async def aclose(self) -> None:
        """Stop the plugin workers (a hung plugin's thread is abandoned, not waited for). Idempotent;
        safe before any decision."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


def _never(address: str) -> IPAddress:
    raise HostError(f"the resolver gave a non-IP address {address!r}")
