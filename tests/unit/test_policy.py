"""The policy hook's decisions (SPEC §5.9): rule order, matching, plugins, the private-network check."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from llorch import policy
from llorch.config import POLICY_BUILTIN_RULES, PolicyConfig, PolicyRule
from llorch.policy import (
    PolicyDecision,
    PolicyEngine,
    PolicyLoadError,
    PolicyRequest,
    load_plugins,
    parse_request,
    redact_url,
)

RELEASE = threading.Event()  # lets the hanging plugin's worker thread end after its test


class AllowPlugin:
    api_version = 1

    def decide(self, req: PolicyRequest) -> PolicyDecision | None:
        return (
            PolicyDecision("allow", "lab-allow", "the lab plugin allows it")
            if req.host.endswith(".lab")
            else None
        )


class DenyPostPlugin:
    api_version = 1

    async def decide(self, req: PolicyRequest) -> PolicyDecision | None:
        return PolicyDecision("deny", "no-post", "no POST") if req.method == "POST" else None


class RaisingPlugin:
    api_version = 1

    def decide(self, req: PolicyRequest) -> PolicyDecision | None:
        raise RuntimeError("boom")


class HangingPlugin:
    api_version = 1

    def decide(self, req: PolicyRequest) -> PolicyDecision | None:
        RELEASE.wait(30)
        return PolicyDecision("allow", "late")


class WrongAnswerPlugin:
    api_version = 1

    def decide(self, req: PolicyRequest) -> object:
        return {"decision": "allow"}


class OldPlugin:
    api_version = 0

    def decide(self, req: PolicyRequest) -> None:
        return None


@pytest.fixture(autouse=True)
def _release() -> Iterator[None]:
    RELEASE.clear()
    yield
    RELEASE.set()


def rule(rule_id: str, action: str, *hosts: str, **extra: Any) -> PolicyRule:
    return PolicyRule.model_validate({"id": rule_id, "action": action, "hosts": list(hosts), **extra})


def engine(*rules: PolicyRule, plugins: list[tuple[str, Any]] | None = None, **cfg: Any) -> PolicyEngine:
    return PolicyEngine(PolicyConfig.model_validate({"rules": list(rules), **cfg}), plugins or [])


async def decide(e: PolicyEngine, url: str, method: str = "GET") -> tuple[str, str]:
    verdict = await e.decide(parse_request(url, method, "http-fetch"))
    assert verdict.decision_id.startswith("pd-")
    return verdict.decision, verdict.rule


async def test_deny_rules_win_over_allow_rules_and_the_default() -> None:
    e = engine(rule("ok", "allow", "*.example.com"), rule("no-admin", "deny", "admin.example.com"))
    assert await decide(e, "https://admin.example.com/x") == ("deny", "no-admin")
    assert await decide(e, "https://www.example.com/x") == ("allow", "ok")
    assert await decide(e, "https://other.org/") == ("allow", "default")
    strict = engine(rule("ok", "allow", "*.example.com"), default="deny")
    assert await decide(strict, "https://other.org/") == ("deny", "default")


async def test_rules_match_on_scheme_method_port_and_host_case_insensitively() -> None:
    e = engine(
        rule("tls-get", "allow", "API.example.com", schemes=["https"], methods=["GET"], ports=[443, 8443]),
        default="deny",
    )
    assert await decide(e, "https://api.EXAMPLE.com./v1") == ("allow", "tls-get")
    assert await decide(e, "https://api.example.com:8443/v1") == ("allow", "tls-get")
    assert await decide(e, "http://api.example.com/v1") == ("deny", "default")
    assert await decide(e, "https://api.example.com/v1", "POST") == ("deny", "default")
    assert await decide(e, "https://api.example.com:444/v1") == ("deny", "default")


async def test_only_http_and_https_and_valid_hosts_are_ever_allowed() -> None:
    e = engine(rule("all", "allow", "*"))
    for url in ("file:///etc/passwd", "gopher://example.com/", "ftp://example.com/", "javascript:alert(1)"):
        assert await decide(e, url) == ("deny", "scheme"), url
    assert await decide(e, "http://ex%41mple.com/") == ("deny", "invalid-host")
    assert await decide(e, "http://256.0.0.1/") == ("deny", "invalid-host")
    for url in ("/relative", "http:///nohost", "http://example.com:99999/"):
        with pytest.raises(ValueError):
            parse_request(url, "GET", "http-fetch")


async def test_ip_rules_match_every_encoding_of_the_address() -> None:
    e = engine(rule("no-loop", "deny", "127.0.0.1"))
    for url in ("http://127.1/", "http://0x7f.1/", "http://2130706433/", "http://0177.0.0.1/"):
        assert await decide(e, url) == ("deny", "no-loop"), url


async def test_rule_limits_override_the_policys() -> None:
    e = engine(rule("small", "allow", "small.example", max_bytes=10, timeout_ms=500), max_bytes=99)
    small = await e.decide(parse_request("http://small.example/", "GET", "t"))
    other = await e.decide(parse_request("http://other.example/", "GET", "t"))
    assert (small.max_bytes, small.timeout_ms, other.max_bytes, other.timeout_ms) == (10, 500, 99, 10_000)


async def test_plugins_run_in_order_after_deny_rules_and_before_allow_rules() -> None:
    plugins = [("deny-post", DenyPostPlugin()), ("lab", AllowPlugin())]
    e = engine(
        rule("never", "deny", "secret.lab"), rule("posts", "allow", "*"), plugins=plugins, default="deny"
    )
    assert await decide(e, "http://secret.lab/") == ("deny", "never")  # deny rule before plugins
    assert await decide(e, "http://x.lab/", "POST") == ("deny", "no-post")  # first plugin's answer
    assert await decide(e, "http://x.lab/") == ("allow", "lab-allow")  # second plugin
    assert await decide(e, "http://x.org/") == ("allow", "posts")  # both abstain: the allow rule
    verdict = await e.decide(parse_request("http://x.lab/", "GET", "t"))
    assert (verdict.plugin, verdict.metric_rule) == ("lab", "plugin:lab")


@pytest.mark.parametrize("plugin", [RaisingPlugin(), HangingPlugin(), WrongAnswerPlugin()])
async def test_a_failing_or_slow_plugin_is_a_deny(plugin: Any) -> None:
    e = engine(plugins=[("bad", plugin)], plugin_timeout_ms=100)
    try:
        verdict = await asyncio.wait_for(e.decide(parse_request("http://x.org/", "GET", "t")), 30)
    finally:
        RELEASE.set()
        await e.aclose()
    assert (verdict.decision, verdict.rule, verdict.plugin) == ("deny", "plugin-error", "bad")
    await e.aclose()  # idempotent


def _entry_points(**targets: str) -> Any:
    def entry_points(group: str) -> list[metadata.EntryPoint]:
        assert group == "llorch.policy"
        return [metadata.EntryPoint(name, f"{__name__}:{target}", group) for name, target in targets.items()]

    return entry_points


def test_load_plugins_loads_only_the_named_ones_in_config_order() -> None:
    eps = _entry_points(lab="AllowPlugin", posts="DenyPostPlugin", broken="Missing")
    loaded = load_plugins(["posts", "lab"], eps)
    assert [(n, type(p).__name__) for n, p in loaded] == [("posts", "DenyPostPlugin"), ("lab", "AllowPlugin")]
    with pytest.raises(PolicyLoadError, match="no entry point 'nope'"):
        load_plugins(["nope"], eps)
    with pytest.raises(PolicyLoadError, match="'broken' failed to load"):
        load_plugins(["broken"], eps)
    with pytest.raises(PolicyLoadError, match="api_version = 1"):
        load_plugins(["old"], _entry_points(old="OldPlugin"))


def test_a_plugin_registered_by_a_dist_info_loads_in_a_real_process(tmp_path: Path) -> None:
    """No mocks: a distribution's entry_points.txt on sys.path, read by importlib.metadata."""
    (tmp_path / "lab_policy.py").write_text(
        textwrap.dedent(
            """
            from llorch.policy import PolicyDecision

            class Lab:
                api_version = 1

                def decide(self, req):
                    if req.host == "x.lab":
                        return PolicyDecision("deny", "lab-deny", "the lab says no")
                    return None
            """
        )
    )
    dist = tmp_path / "lab_policy-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lab-policy\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[llorch.policy]\nlab = lab_policy:Lab\n")
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        sys.path.insert(0, {str(tmp_path)!r})
        from llorch.config import PolicyConfig
        from llorch.policy import PolicyEngine, load_plugins, parse_request

        async def main():
            engine = PolicyEngine(PolicyConfig(plugins=["lab"]), load_plugins(["lab"]))
            for url in ("http://x.lab/", "http://y.lab/"):
                v = await engine.decide(parse_request(url, "GET", "http-fetch"))
                print(v.decision, v.rule, v.plugin)
            await engine.aclose()

        asyncio.run(main())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["deny lab-deny lab", "allow default None"]


def test_redacted_urls_carry_no_userinfo_and_no_query_values() -> None:
    redacted = redact_url("https://user:s3cret@example.com:8443/p/a?token=abc&x=1&flag#frag")
    assert redacted == "https://example.com:8443/p/a?token=REDACTED&x=REDACTED&flag=REDACTED"
    assert "s3cret" not in redacted and "abc" not in redacted


async def test_pin_refuses_a_host_with_any_private_address_and_resolves_once() -> None:
    calls: list[str] = []
    answers = {"mixed.test": ["93.184.216.34", "10.0.0.5"], "public.test": ["93.184.216.34"]}

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        return answers[host]

    e = PolicyEngine(PolicyConfig(), resolve=resolve)
    req = parse_request("http://mixed.test/", "GET", "t")
    first = await e.decide(req)
    verdict, addresses = await e.pin(req, first)
    assert (verdict.decision, verdict.rule, verdict.decision_id) == (
        "deny",
        "private-network",
        first.decision_id,
    )
    assert "private address (10.0.0.5)" in verdict.reason and addresses == answers["mixed.test"]
    req = parse_request("http://public.test/", "GET", "t")
    verdict, addresses = await e.pin(req, await e.decide(req))
    assert (verdict.decision, addresses, calls) == ("allow", ["93.184.216.34"], ["mixed.test", "public.test"])
    literal = parse_request("http://0x7f.1/", "GET", "t")
    verdict, addresses = await e.pin(literal, await e.decide(literal))
    assert (verdict.rule, addresses, len(calls)) == ("private-network", ["127.0.0.1"], 2)  # no lookup


async def test_only_an_allow_rule_naming_the_host_opens_its_private_addresses() -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["192.168.1.10"]

    cfg = PolicyConfig(
        rules=[rule("nas", "allow", "nas.home", "10.0.0.7"), rule("all-home", "allow", "*.home")]
    )
    e = PolicyEngine(cfg, resolve=resolve)
    for url, expected in [
        ("http://nas.home/", ("allow", "nas")),
        ("http://10.0.0.7/", ("allow", "nas")),
        ("http://printer.home/", ("deny", "private-network")),  # a glob names no host
        ("http://10.0.0.8/", ("deny", "private-network")),
    ]:
        req = parse_request(url, "GET", "t")
        verdict, _ = await e.pin(req, await e.decide(req))
        assert (verdict.decision, verdict.rule) == expected, url
    off = PolicyEngine(PolicyConfig(deny_private_networks=False), resolve=resolve)
    req = parse_request("http://printer.home/", "GET", "t")
    assert (await off.pin(req, await off.decide(req)))[0].allowed


@pytest.mark.parametrize("rule_id", ["default", "private-network", "plugin:lab"])
def test_rule_ids_may_not_take_a_built_in_name(rule_id: str) -> None:
    with pytest.raises(ValueError, match="reserved for a built-in rule"):
        PolicyConfig.model_validate({"rules": [{"id": rule_id, "action": "allow", "hosts": ["x"]}]})


def test_the_reserved_rule_names_are_the_engines_built_in_rules() -> None:
    built_in = {policy.RULE_DEFAULT, policy.RULE_SCHEME, policy.RULE_INVALID_HOST}
    built_in |= {policy.RULE_PLUGIN_ERROR, policy.RULE_PRIVATE_NETWORK}
    assert set(POLICY_BUILTIN_RULES) == built_in
