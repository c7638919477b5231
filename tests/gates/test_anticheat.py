"""Anti-cheat for the Haiku gate (SPEC §9); always runs, needs no stack.

Scanned: every file git tracks or would add, i.e. ``git ls-files --cached --others --exclude-standard``
in this repository, so a new file counts before it is committed. Ignored paths (``.venv/``, state dirs,
``gate-out/``) are not scanned; the shared docs outside the repository are not either.

Rules:

1. **Prompt text.** No file outside ``tests/`` contains ``Write a haiku`` (any case). Everything outside
   ``tests/`` is non-test source: code, scripts, configs, docs and the Makefile alike. The gate builds its
   prompt inside ``tests/gates/test_haiku.py``.
2. **Prompt parts.** No line of any scanned file (``tests/`` included) contains both ``minute_words`` and
   ``nonce`` (any case). There is no exception: the gate names its parts ``minute_in_words`` and
   ``fresh_code``, and this module builds the two words at run time so it does not match itself.
3. **Fixtures.** No path has a ``fixtures`` directory followed by a name starting with ``haiku``.
4. **Hard-coded outputs.** The only scanned paths whose file name contains ``haiku`` (any case) are the
   gate's own code, :data:`HAIKU_NAMES_ALLOWED`. So there is no ``haiku.txt``, ``haiku*.json`` or similar
   anywhere in the repository.
5. **Where outputs go.** ``gate-out/``, where the gate writes its text when the artifact route is not
   served, is ignored by git, so a run's output is never scanned as source or committed by accident.
6. **Public API only.** ``gates/`` imports only the standard library, aiohttp and itself, and the gate
   module imports nothing from ``llorch*`` (checked on the import statements, not by running them).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterable, Mapping
from itertools import pairwise
from pathlib import Path, PurePosixPath

import pytest

REPO = Path(__file__).resolve().parents[2]
PROMPT_NEEDLE = b"write a haiku"
PART_NEEDLES = (b"minute" + b"_words", b"non" + b"ce")  # built, so this file has no line with both
HAIKU_NAMES_ALLOWED = frozenset({"tests/gates/test_haiku.py", "scripts/gate-haiku.sh"})


def repo_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore, as repository-relative POSIX paths."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"the anti-cheat scan needs a git checkout: {exc}", pytrace=False)
    return sorted({p for p in out.decode("utf-8", "surrogateescape").split("\0") if p})


def read_contents(paths: Iterable[str]) -> dict[str, bytes]:
    """Each regular file's bytes; paths listed by git but gone from the tree are left out."""
    contents = {}
    for rel in paths:
        path = REPO / rel
        if path.is_file() and not path.is_symlink():
            contents[rel] = path.read_bytes()
    return contents


def prompt_text_violations(contents: Mapping[str, bytes]) -> list[str]:
    """Rule 1."""
    return [
        rel
        for rel, data in contents.items()
        if not rel.startswith("tests/") and PROMPT_NEEDLE in data.lower()
    ]


def prompt_part_violations(contents: Mapping[str, bytes]) -> list[str]:
    """Rule 2: ``path:line`` for each line holding both words."""
    found = []
    for rel, data in contents.items():
        lowered = data.lower()
        if not all(needle in lowered for needle in PART_NEEDLES):
            continue
        for number, line in enumerate(lowered.split(b"\n"), 1):
            if all(needle in line for needle in PART_NEEDLES):
                found.append(f"{rel}:{number}")
    return found


def fixture_violations(paths: Iterable[str]) -> list[str]:
    """Rule 3."""
    found = []
    for rel in paths:
        parts = PurePosixPath(rel).parts
        if any(a == "fixtures" and b.lower().startswith("haiku") for a, b in pairwise(parts)):
            found.append(rel)
    return found


def output_name_violations(paths: Iterable[str]) -> list[str]:
    """Rule 4."""
    return [p for p in paths if "haiku" in PurePosixPath(p).name.lower() and p not in HAIKU_NAMES_ALLOWED]


# ---- the repository ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files() -> list[str]:
    return repo_files()


@pytest.fixture(scope="module")
def contents(files: list[str]) -> dict[str, bytes]:
    return read_contents(files)


def test_the_scan_sees_the_repository(files: list[str], contents: dict[str, bytes]) -> None:
    # Guards the other tests against scanning nothing: the gate itself and its sources must be seen.
    assert "tests/gates/test_haiku.py" in contents
    assert "gates/client.py" in contents
    assert len(contents) > 50


def test_no_non_test_source_contains_the_prompt(contents: dict[str, bytes]) -> None:
    assert prompt_text_violations(contents) == []


def test_no_line_holds_both_prompt_parts(contents: dict[str, bytes]) -> None:
    assert prompt_part_violations(contents) == []


def test_no_haiku_fixtures(files: list[str]) -> None:
    assert fixture_violations(files) == []


def test_no_hard_coded_haiku_outputs(files: list[str]) -> None:
    assert output_name_violations(files) == []


def test_gate_output_dir_is_ignored_by_git() -> None:
    probe = subprocess.run(
        ["git", "check-ignore", "-q", "gate-out/haiku.txt"], cwd=REPO, capture_output=True, check=False
    )
    assert probe.returncode == 0, "add `gate-out/` to .gitignore: the Haiku gate writes its output there"


# ---- the rules catch what they are meant to catch ------------------------------------------------


def test_rules_catch_planted_violations() -> None:
    words, code = PART_NEEDLES
    contents = {
        "services/x.py": b'P = "WRITE A HAIKU about GPUs"\n',
        "tests/gates/test_haiku.py": b"Write a haiku (allowed in tests)\n",
        "tests/y.py": b"ok = 1\nprompt = f'{" + words.upper() + b"} ... {" + code + b"}'\n",
        "docs/z.md": words + b" on one line\n" + code + b" on the next\n",
    }
    assert prompt_text_violations(contents) == ["services/x.py"]
    assert prompt_part_violations(contents) == ["tests/y.py:2"]
    paths = [
        "tests/fixtures/haiku-1.txt",
        "tests/fixtures/mock-model.bin",
        "out/Haiku.json",
        *HAIKU_NAMES_ALLOWED,
    ]
    assert fixture_violations(paths) == ["tests/fixtures/haiku-1.txt"]
    assert output_name_violations(paths) == ["tests/fixtures/haiku-1.txt", "out/Haiku.json"]


# ---- rule 6: the gates talk to the stack only over HTTP ------------------------------------------


def imported_modules(source: str) -> set[str]:
    """Top-level names of the modules a source file imports (relative imports count as its package)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." if node.level else (node.module or "").split(".")[0])
    return names


def test_gates_import_only_stdlib_and_aiohttp(contents: dict[str, bytes]) -> None:
    allowed = set(sys.stdlib_module_names) | {"aiohttp", "gates", ".", "__future__"}
    sources = {
        rel: data for rel, data in contents.items() if rel.startswith("gates/") and rel.endswith(".py")
    }
    assert "gates/determinism.py" in sources
    foreign = {rel: sorted(imported_modules(data.decode()) - allowed) for rel, data in sources.items()}
    assert {rel: names for rel, names in foreign.items() if names} == {}


def test_the_haiku_gate_imports_nothing_from_llorch(contents: dict[str, bytes]) -> None:
    names = imported_modules(contents["tests/gates/test_haiku.py"].decode())
    assert "gates" in names
    assert not {n for n in names if n.startswith("llorch") or n == "tests"}


def test_import_rule_catches_llorch() -> None:
    assert imported_modules("from llorch.store import Store\nimport llorch_gateway.app\n") == {
        "llorch",
        "llorch_gateway",
    }
