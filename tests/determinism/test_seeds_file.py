"""SPEC §9: `tests/determinism/seeds.txt` holds exactly the 64 integers 1001..1064, one per line."""

from __future__ import annotations

from pathlib import Path

SEEDS = Path(__file__).resolve().parent / "seeds.txt"


def test_seeds_file_holds_exactly_1001_to_1064_one_per_line() -> None:
    text = SEEDS.read_text(encoding="ascii")
    assert text.endswith("\n") and not text.endswith("\n\n"), "one seed per line, a single final newline"
    lines = text.splitlines()
    assert len(lines) == 64
    assert all(line == line.strip() and line.isdigit() for line in lines), "bare decimal integers only"
    assert [int(line) for line in lines] == list(range(1001, 1065))
