"""Scan what a test stack wrote for its secrets (SPEC §5.10: logs never contain tokens)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from .stack import Stack

PROBE_CHARS = 16
"""Besides each whole secret, its first and last this many characters: a cut-off token is a leak too."""


def stack_secrets(stack: Stack) -> list[str]:
    """The API token and the internal token the stack's processes were given."""
    return [stack.token, stack.env["LLORCH_INTERNAL_TOKEN"]]


def find_secrets(root: Path, secrets: Iterable[str], pattern: str = "*") -> list[str]:
    """``"<file>: <which probe>"`` for every file under ``root`` matching ``pattern`` that contains a
    secret (or its head or tail); by default every file, not only ``*.log``: engine logs, the state
    dir, anything a service wrote."""
    probes: dict[bytes, str] = {}
    for index, secret in enumerate(secrets):
        assert len(secret) >= 2 * PROBE_CHARS, "a short secret would match by chance"
        probes[secret.encode()] = f"secret {index}"
        probes[secret[:PROBE_CHARS].encode()] = f"head of secret {index}"
        probes[secret[-PROBE_CHARS:].encode()] = f"tail of secret {index}"
    found = []
    for path in sorted(p for p in root.rglob(pattern) if p.is_file()):
        data = path.read_bytes()
        found += [f"{path.relative_to(root)}: {what}" for probe, what in probes.items() if probe in data]
    return found


def assert_no_secrets(stack: Stack, extra: Iterable[str] = ()) -> int:
    """Fail when any file under the stack's workdir holds one of its secrets (or ``extra`` ones);
    returns how many bytes were scanned, so a caller can tell the scan saw the logs."""
    found = find_secrets(stack.workdir, [*stack_secrets(stack), *extra])
    assert not found, f"secrets in the stack's files: {found}"
    return sum(p.stat().st_size for p in stack.workdir.rglob("*") if p.is_file())


def assert_logs_clean(stack: Stack) -> None:
    """The check every test's stacks get at teardown (tests/conftest.py): no process log (``*.log``:
    the services' and the engines') holds the stack's tokens. Other files may hold them on purpose
    (a test's token file), so only logs are read here; test_log_scan.py reads everything."""
    secrets = [
        s for s in (stack.token, stack.env.get("LLORCH_INTERNAL_TOKEN", "")) if len(s) >= 2 * PROBE_CHARS
    ]
    found = find_secrets(stack.workdir, secrets, "*.log")
    assert not found, f"secrets in the stack's logs: {found}"
